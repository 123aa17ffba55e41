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
pub mod linalg;
pub mod loss;
pub mod train;
pub mod module;
pub mod monitor;

// Generated code names everything `::temper::…`; inside the runtime that is the runtime itself,
// in users' crates it is the facade, which re-exports the runtime at the same paths.
extern crate self as temper;

#[doc(hidden)]
pub mod __private {
    pub use serde;
}

pub use module::{Module, ModuleExt};
pub use temper_macros::{adapter, Module};
pub mod data;
pub mod quant;
pub mod rl;
