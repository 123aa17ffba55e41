//! The [`Adapter`] trait: what `#[adapter]` implements for a struct, and what the model calls.
//!
//! An adapter wraps one linear layer `y = x·Wᵀ + b` and adds a delta: `y' = y + delta(x)`.
//! One instance lives on each adapted layer, holding that layer's parameters and hyper-parameters
//! (ranks may differ per layer through patterns).

use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::models::LinearWeight;
use crate::tensor::{DType, Tensor};
use crate::{ops, Device};

/// What an adapter sees of the linear layer it wraps.
#[derive(Clone, Copy)]
pub struct BaseLayer<'a> {
    /// Module path, `model.layers.0.self_attn.q_proj`.
    pub module: &'a str,
    /// `[out_features, in_features]`, dense or quantised ([`LinearWeight::dense`] dequantises).
    pub weight: &'a LinearWeight,
    pub bias: Option<&'a Tensor>,
    /// The base layer's output `x·Wᵀ + b` for the current input (in [`Adapter::forward`]).
    pub out: Option<&'a Tensor>,
    /// Training mode: dropout is active.
    pub training: bool,
}

impl BaseLayer<'_> {
    pub fn in_features(&self) -> usize {
        self.weight.shape()[1]
    }
    pub fn out_features(&self) -> usize {
        self.weight.shape()[0]
    }
    /// The base output, or an error naming the module when the caller did not provide it.
    pub fn out(&self) -> Result<&Tensor> {
        self.out.ok_or_else(|| Error::Input(format!("adapter on `{}` needs the base layer's output", self.module)))
    }
}

/// What a parameter initialiser is given.
pub struct InitCx<'a> {
    pub base: BaseLayer<'a>,
    /// The parameter's key (`lora_A.weight`).
    pub key: &'a str,
    /// The shape the adapter declared, with hyper-parameters substituted.
    pub shape: &'a [usize],
    pub dtype: DType,
    pub rng: &'a mut Rng,
}

/// A parameter initialiser: `init = zeros`, `init = kaiming_uniform`, or a user's own function.
pub type InitFn = fn(&mut InitCx<'_>) -> Result<Tensor>;

/// An adapter type. Write it with `#[adapter]`; implement by hand only for unusual cases.
pub trait Adapter: Clone + Send + Sync + 'static {
    /// The hyper-parameters (generated `<Name>Config` struct, one field per `#[hyper]`).
    type Config: Clone + std::fmt::Debug + PartialEq + serde::Serialize + serde::de::DeserializeOwned + Send + Sync + 'static;
    /// The adapter's name (`Lora`, `Dora`, the user's struct name).
    const NAME: &'static str;
    /// Builds this adapter for one layer: hyper-parameters from `config`, each parameter from its
    /// initialiser. `rng` is seeded per layer so results do not depend on traversal order.
    fn init(config: &Self::Config, base: BaseLayer<'_>, rng: &mut Rng) -> Result<Self>;
    /// The hyper-parameters of this instance.
    fn config(&self) -> Self::Config;
    /// Each parameter with its key relative to the layer, in declaration order.
    fn visit_params(&self, f: &mut dyn FnMut(&'static str, &Tensor));
    /// Each parameter, mutably.
    fn visit_params_mut(&mut self, f: &mut dyn FnMut(&'static str, &mut Tensor) -> Result<()>) -> Result<()>;
    /// Learning-rate multiplier of a parameter (LoRA+ trains `lora_B` faster).
    fn lr_scale(&self, _key: &str) -> f64 {
        1.0
    }
    /// The delta added to the base output.
    fn forward(&self, x: &Tensor, base: BaseLayer<'_>) -> Result<Tensor>;
    /// Whether [`Adapter::after_init`] may rewrite the base weight (`#[adapter(after_init = ..)]`
    /// sets it). On a quantised base such an adapter gets the dequantised weight, and a weight it
    /// rewrote is quantised again (as PEFT does for OLoRA/PiSSA on bitsandbytes layers); adapters
    /// without the hook skip the dequantisation.
    const REWRITES_BASE: bool = false;
    /// Runs once after every parameter is initialised; may rewrite the base weight (PiSSA and
    /// OLoRA move the principal part of W into the adapter).
    fn after_init(&mut self, _weight: &mut Tensor) -> Result<()> {
        Ok(())
    }
    /// The base weight with this adapter folded in. Default: `W + ΔW` with `ΔW` read off
    /// `forward` on the identity — right for every adapter whose delta is linear in `x`. A
    /// quantised base merges into its dequantised values.
    fn merge(&mut self, base: BaseLayer<'_>) -> Result<Tensor> {
        ops::add(&base.weight.dense()?, &delta_weight(self, base)?.to_dtype(base.weight.dtype())?)
    }
    /// Undoes [`Adapter::merge`] on `base.weight` (the merged weight).
    fn unmerge(&mut self, base: BaseLayer<'_>) -> Result<Tensor> {
        ops::sub(&base.weight.dense()?, &delta_weight(self, base)?.to_dtype(base.weight.dtype())?)
    }
}

/// `ΔW` `[out, in]` of an adapter whose delta is linear in `x`: `forward(I)ᵀ`.
pub fn delta_weight<A: Adapter + ?Sized>(a: &A, base: BaseLayer<'_>) -> Result<Tensor> {
    let n = base.in_features();
    let mut eye = vec![0f32; n * n];
    for i in 0..n {
        eye[i * n + i] = 1.0;
    }
    crate::autograd::no_grad(|| {
        let eye = Tensor::from_vec(eye, &[n, n], a_device(a, base))?.to_dtype(a_dtype(a, base))?;
        let out = base.weight.linear(&eye, None)?;
        let d = a.forward(&eye, BaseLayer { out: Some(&out), training: false, ..base })?;
        ops::transpose(&d, 0, 1)?.contiguous()
    })
}

/// Where the adapter's parameters live (the base weight's device when it has none).
fn a_device<A: Adapter + ?Sized>(a: &A, base: BaseLayer<'_>) -> Device {
    let mut d = base.weight.as_dense().map(|t| t.device()).unwrap_or_default();
    a.visit_params(&mut |_, t| d = t.device());
    d
}

fn a_dtype<A: Adapter + ?Sized>(a: &A, base: BaseLayer<'_>) -> DType {
    let mut d = base.weight.dtype();
    a.visit_params(&mut |_, t| d = t.dtype());
    d
}

/// An adapter that can be switched off to leave the base model — every real adapter (`#[adapter]`
/// implements it), but not [`super::NoAdapter`]. Loss terms that need a frozen reference policy
/// (`kl()`) require it, so asking for one on a model without an adapter is a compile error.
#[diagnostic::on_unimplemented(
    message = "this loss needs a reference policy, and a model without an adapter (`{Self}`) has none",
    label = "a loss term here (`kl()`) compares the model with its base with adapters switched off",
    note = "attach an adapter (`base.with_adapter(..)`) or compare with an explicit frozen model: `kl_to(reference_model)`"
)]
pub trait Switchable: Adapter {}
