//! Models. The Llama family (Llama, Mistral, Qwen2, Qwen3) shares one decoder, [`llama::Llama`].

pub mod kv_cache;
pub mod linear;
pub mod llama;

pub use kv_cache::KvCache;
pub use linear::{AdapterSlot, Linear, LinearWeight, Mode};
pub use llama::{DecoderLayer, ForwardInput, Llama, LoadOptions, Mlp, SelfAttention, WeightSource};
