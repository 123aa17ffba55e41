//! Adapters on linear layers. Today: LoRA deltas and PEFT's on-disk format (load); the `#[adapter]`
//! DSL, training and saving arrive with the adapter issue and build on [`LoraDelta`].

pub mod adapter;
pub mod config;
pub mod init;
pub mod peft;

pub use adapter::{Adapter, BaseLayer, InitCx, InitFn};
pub use config::{AdapterConfig, Targets};

use crate::error::Result;
use crate::ops;
use crate::tensor::Tensor;

pub use peft::{PeftLoraAdapter, PeftLoraConfig};

/// A low-rank update of a linear layer: `delta(x) = scale · (x·Aᵀ)·Bᵀ`, with `lora_a` `[r, in]` and
/// `lora_b` `[out, r]` as PEFT stores them.
#[derive(Clone, Debug)]
pub struct LoraDelta {
    pub lora_a: Tensor,
    pub lora_b: Tensor,
    /// `alpha / r`, or `alpha / sqrt(r)` for rsLoRA.
    pub scale: f64,
}

impl LoraDelta {
    /// The update this adapter adds to the wrapped layer's output.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = ops::linear(x, &self.lora_a, None)?;
        ops::scale(&ops::linear(&h, &self.lora_b, None)?, self.scale)
    }
}
