//! Training data: JSONL rows (`text`, Alpaca `instruction`/`input`/`output`, chat `messages`) to token ids and loss masks.
