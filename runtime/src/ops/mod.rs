//! Differentiable ops. Each file holds one op: its forward (shape checks, a backend call) and its
//! backward (a [`crate::autograd::GradFn`]) side by side, with the math in a comment on top.

mod attention;
mod checkpoint;
mod clipped_surrogate;
mod clipped_value;
mod dropout;
mod elementwise;
mod embedding;
mod kl_div;
mod linear;
mod linear_cross_entropy;
mod linear_quantized;
pub mod lora_linear;
mod mul_row;
mod pointwise;
mod rms_norm;
mod rope;
mod shape;
mod swiglu;
mod token_nll;

pub use attention::{attention, AttentionMask};
pub use checkpoint::checkpoint;
pub use clipped_surrogate::clipped_surrogate;
pub use clipped_value::clipped_value;
pub use dropout::{dropout, dropout_state, set_dropout_seed};
pub use elementwise::{add, add_scalar, mul, scale, sub, sum};
pub use embedding::embedding;
pub use kl_div::token_kl;
pub use linear::{linear, matmul};
pub use linear_cross_entropy::{default_chunk as linear_ce_default_chunk, linear_cross_entropy, linear_cross_entropy_chunked, linear_token_logprobs};
pub use linear_quantized::linear_quantized;
pub use lora_linear::{lora_linear, LoraBase};
pub use mul_row::mul_row;
pub use pointwise::{pointwise, Pointwise};
pub use rms_norm::rms_norm;
pub use rope::{rope, rope_inv_freq, RopeScaling, RopeTable};
pub use shape::{copy_contiguous, narrow, reshape, transpose};
pub use swiglu::swiglu;
pub use token_nll::{cross_entropy, token_logprobs, token_nll, IGNORE_INDEX};

use crate::backend::Storage;
use crate::error::Result;
use crate::tensor::Tensor;
use std::sync::Arc;

/// Makes a tensor from an op's output storage, recording `grad_fn` when any input needs gradients.
pub(crate) fn output(storage: Storage, shape: &[usize], inputs: &[&Tensor], grad_fn: impl FnOnce() -> Arc<dyn crate::autograd::GradFn>) -> Tensor {
    let needs = crate::autograd::is_grad_enabled() && inputs.iter().any(|t| t.requires_grad_flag());
    Tensor::from_op(storage, shape, if needs { Some(grad_fn()) } else { None })
}

/// Fails unless `t` has exactly `rank` dimensions; names the op and the argument.
pub(crate) fn expect_rank(op: &'static str, what: &str, t: &Tensor, rank: usize) -> Result<()> {
    crate::error::ensure_shape!(t.rank() == rank, op, "{what} must have rank {rank}, got shape {:?}", t.shape());
    Ok(())
}
