//! The multi-adapter HTTP server: routes, validation, continuous-batching scheduler, metrics.
//! Its capabilities arrive with the `lorq serve` issue; the crate exists now so the crate graph
//! (cli -> train/serve -> model -> lora/quant) is fixed from the start.
