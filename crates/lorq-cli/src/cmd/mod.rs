pub mod bench;
pub mod eval;
pub mod generate;
pub mod import_gguf;
pub mod inspect;
pub mod pull;
pub mod quant_report;
pub mod score;
