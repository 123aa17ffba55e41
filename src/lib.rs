//! # temper — LLM post-training in Rust
//!
//! Forging is pre-training; tempering is what makes the blade usable. temper takes a pretrained
//! Hugging Face causal LM (Llama, Mistral, Qwen2/3 families, or a llama GGUF) and post-trains it.
//!
//! This facade re-exports the runtime: tensors with autograd ([`Tensor`], [`ops`]), models
//! ([`models::Llama`]), formats, tokenization and generation. The `temper` binary is the CLI.
//!
//! ```
//! use temper::{ops, Device, Tensor};
//! // y = x·Wᵀ; the gradient of Σy with respect to W is every row of x summed.
//! let x = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0], &[2, 2], Device::Cpu)?;
//! let w = Tensor::from_vec(vec![0.5f32, -1.0], &[1, 2], Device::Cpu)?.requires_grad();
//! let grads = ops::sum(&ops::linear(&x, &w, None)?)?.backward()?;
//! assert_eq!(grads.get(&w).unwrap().to_vec::<f32>()?, vec![4.0, 6.0]);
//! # Ok::<(), temper::Error>(())
//! ```

pub use temper_runtime::*;

/// The names most programs need.
pub mod prelude {
    pub use temper_runtime::adapters::{AdapterConfig, AdapterHost, BaseLayer, Dora, Lora, Targets};
    pub use temper_runtime::generate::{generate, GenerationConfig, Sampling};
    pub use temper_runtime::loss::{ce, kl, kl_to};
    pub use temper_runtime::train::{Batch, Trainer};
    pub use temper_runtime::{adapter, Module, ModuleExt};
    pub use temper_runtime::models::{ForwardInput, Llama};
    pub use temper_runtime::optim::AdamW;
    pub use temper_runtime::tokenizer::Tokenizer;
    pub use temper_runtime::{ops, DType, Device, Error, Result, Tensor};
}

pub mod bench;
pub mod heap;
pub mod config;
pub mod perf_model;
pub mod preference;
pub(crate) mod rl_run;
pub mod sft;
