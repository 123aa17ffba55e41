//! Optimizers, and the settings a trainer turns into one once it knows the trainable parameters.

mod adamw;

pub use adamw::{AdamW, AdamWConfig};

use crate::autograd::Grads;
use crate::error::Result;
use crate::tensor::Tensor;

/// An optimizer over a fixed set of parameters.
pub trait Optimizer {
    /// One update from the gradients.
    fn step(&mut self, grads: &Grads) -> Result<()>;
    /// Sets the base learning rate (schedules).
    fn set_lr(&mut self, lr: f64);
    /// Everything needed to continue exactly (moments, step count), as named tensors.
    fn state(&self) -> Result<Vec<(String, Tensor)>>;
    /// Restores [`Optimizer::state`]; `get` returns a saved tensor by name.
    fn load_state(&mut self, get: &dyn Fn(&str) -> Result<Option<Tensor>>) -> Result<()>;
}

/// Optimizer settings; [`OptimizerConfig::build`] makes the optimizer over `(parameter, lr multiplier)`.
pub trait OptimizerConfig {
    type Optimizer: Optimizer;
    fn build(self, params: Vec<(Tensor, f64)>) -> Self::Optimizer;
}
