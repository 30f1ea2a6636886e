//! The HTTP routes, grouped by API.

pub mod admin;
pub mod collect;
pub mod native;
pub mod openai;
