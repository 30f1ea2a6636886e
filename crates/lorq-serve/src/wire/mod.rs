//! The JSON shapes on the wire, exactly as the LoRAX, TGI and OpenAI clients send and parse them.

pub mod native;
pub mod openai;
