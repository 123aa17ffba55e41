//! temper's runtime: tensors with reverse-mode autograd, backends (CPU now, CUDA behind a feature),
//! Hugging Face and GGUF model formats, the Llama family, tokenization and generation.

pub mod autograd;
pub mod backend;
pub mod error;
pub mod ops;
pub mod tensor;

pub use backend::Device;
pub use error::{Error, Result};
pub use tensor::{DType, Tensor};
pub mod formats;
pub mod models;
pub mod generate;
pub mod tokenizer;
pub mod optim;
pub mod chat_template;
pub mod rng;
pub mod adapters;
