//! Optimizers (AdamW 32-bit, 8-bit blockwise, paged) and learning-rate schedules.
