//! Models. The Llama family (Llama, Mistral, Qwen2, Qwen3) shares one decoder, [`llama::Llama`].

pub mod kv_cache;
pub mod llama;

pub use kv_cache::KvCache;
pub use llama::{ForwardInput, Llama};
