//! File formats of the ecosystem, read and written byte for byte: safetensors (single and sharded),
//! Hugging Face `config.json`, and GGUF.

pub mod gguf;
pub mod hf_config;
pub mod safetensors;
