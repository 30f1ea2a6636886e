//! QLoRA fine-tuning over lorq's model code: datasets, LoRA-only backward, optimizers, checkpoints.
//! Its capabilities arrive with the `lorq train` issue; the crate exists now so the crate graph
//! (cli -> train/serve -> model -> lora/quant) is fixed from the start.
