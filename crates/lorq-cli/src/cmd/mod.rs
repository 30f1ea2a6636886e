pub mod bench;
pub mod generate;
pub mod import_gguf;
pub mod inspect;
pub mod pull;
pub mod score;
