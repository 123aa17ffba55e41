//! temper's procedural macros: modules and adapters declared in Rust syntax.
//!
//! Each macro is parse → check → expand: parsing turns attributes into a typed model, checking
//! collects every error with the user's span (all of them, not just the first), expansion only
//! writes calls into `::temper::…` — the runtime, re-exported by the facade at the same paths.

use proc_macro::TokenStream;

mod adapter;
mod errors;
mod module;

/// `#[derive(Module)]`: the named parameter tree of a struct, with Hugging Face key names.
///
/// Each field is walked under its name, or under `#[module(rename = "…")]` (dotted paths allowed;
/// `{i}` numbers the elements of a `Vec`). Fields must be tensors, modules, or `Option` / `Vec` /
/// `Box` of them; mark anything else `#[module(skip)]`. Loading, saving, freezing, counting and
/// dtype moves then come from `ModuleExt`, adapters from `AdapterHost`.
///
/// ```
/// use temper::prelude::*;
/// use temper::models::Linear;
///
/// #[derive(Module)]
/// struct Block {
///     #[module(rename = "norm.weight")]
///     norm: Tensor,
///     #[module(rename = "experts.{i}")]
///     experts: Vec<Linear>,
///     #[module(skip)]
///     eps: f64,
/// }
///
/// let t = |shape: &[usize]| Tensor::zeros(shape, DType::F32, Device::Cpu);
/// let mut b = Block { norm: t(&[4])?, experts: vec![Linear::new(t(&[2, 4])?, None)], eps: 1e-6 };
/// let names: Vec<String> = b.named_parameters().into_iter().map(|(n, _)| n).collect();
/// assert_eq!(names, ["norm.weight", "experts.0.weight"]);
/// b.unfreeze("^experts")?;
/// assert_eq!(b.parameter_counts().to_string(), "trainable params: 8 || all params: 12 || trainable%: 66.6667");
/// # Ok::<(), temper::Error>(())
/// ```
#[proc_macro_derive(Module, attributes(module))]
pub fn derive_module(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as syn::DeriveInput);
    module::derive(input).unwrap_or_else(|e| e.to_compile_error()).into()
}

/// `#[adapter]`: declares an adapter — a delta added to a wrapped linear layer's output.
///
/// Fields are `#[param(shape = [..], init = .., key = "..", lr_scale = ..)]` tensors,
/// `#[hyper]` / `#[hyper(default = v)]` hyper-parameters, or `#[state]` runtime state. The macro
/// writes `<Name>Config` (the hyper-parameters, serialisable), `<Name>::config(required hypers)`,
/// and the `Adapter` impl: initialisation, the parameter walk (saved under PEFT-style keys),
/// learning-rate multipliers, merge (`W + ΔW` unless `#[adapter(merge = custom)]`). You write
/// `fn delta(&self, x: &Tensor, base: BaseLayer<'_>) -> Result<Tensor>`.
///
/// ```
/// use temper::prelude::*;
///
/// /// y = W x + s · g ∘ B(A x)
/// #[adapter]
/// pub struct GatedLora {
///     #[param(key = "lora_A.weight", shape = [r, in_features], init = kaiming_uniform)]
///     pub lora_a: Tensor,
///     #[param(key = "lora_B.weight", shape = [out_features, r], init = zeros)]
///     pub lora_b: Tensor,
///     #[param(shape = [out_features], init = ones)]
///     pub gate: Tensor,
///     #[hyper] pub r: usize,
///     #[hyper] pub alpha: f64,
/// }
///
/// impl GatedLora {
///     fn delta(&self, x: &Tensor, _base: BaseLayer<'_>) -> Result<Tensor> {
///         let h = ops::linear(&ops::linear(x, &self.lora_a, None)?, &self.lora_b, None)?;
///         ops::scale(&ops::mul_row(&h, &self.gate)?, self.alpha / self.r as f64)
///     }
/// }
///
/// let cfg = GatedLora::config(4, 8.0).targets(Targets::names(["q_proj"]));
/// assert_eq!(cfg.hyper, GatedLoraConfig { r: 4, alpha: 8.0 });
/// # Ok::<(), temper::Error>(())
/// ```
#[proc_macro_attribute]
pub fn adapter(attr: TokenStream, item: TokenStream) -> TokenStream {
    let item = syn::parse_macro_input!(item as syn::DeriveInput);
    adapter::expand(attr.into(), item).unwrap_or_else(|e| e.to_compile_error()).into()
}
