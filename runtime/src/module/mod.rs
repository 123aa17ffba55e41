//! Modules: trees of named parameters whose names are the Hugging Face checkpoint keys.
//!
//! A module knows how to walk its parameters ([`Module::visit`], [`Module::visit_mut`]) and its
//! linear layers ([`Module::visit_linears_mut`]); everything else — loading and saving safetensors,
//! freezing by name pattern, parameter counts, dtype and device moves — is written once on top of
//! that walk in [`ModuleExt`]. `#[derive(Module)]` writes the walk for a struct from its fields.

mod ext;

pub use ext::{ModuleExt, ParamCounts};

use crate::error::Result;
use crate::tensor::Tensor;
use std::any::Any;

/// Where a parameter sits: in the base model, or in a named adapter attached to a linear layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamRole<'a> {
    /// A weight of the model itself (what a Hugging Face checkpoint holds).
    Base,
    /// A weight of adapter `adapter` on linear layer `module`; `key` is its name relative to the
    /// layer in PEFT's saved form (`lora_A.weight`, `lora_magnitude_vector`).
    Adapter { adapter: &'a str, module: &'a str, key: &'a str },
    /// Part of a frozen quantised base weight as its checkpoint stores it (bitsandbytes'
    /// `weight` codes, `weight.absmax`, `weight.quant_state.…`): saved and counted, never trained,
    /// converted or replaced. `numel` is how many weight values the tensor stands for (the packed
    /// codes: all of them; the state tensors: 0).
    Quantized { numel: usize },
}

/// Callback of [`Module::visit`]: full name, tensor, role.
pub type Visit<'v> = dyn FnMut(&str, &Tensor, ParamRole<'_>) + 'v;
/// Callback of [`Module::visit_mut`]: may replace the tensor in place.
pub type VisitMut<'v> = dyn FnMut(&str, &mut Tensor, ParamRole<'_>) -> Result<()> + 'v;
/// Callback of [`Module::visit_linears_mut`]: module path and the layer as `&mut dyn Any`
/// (a [`crate::models::Linear<A>`]; downcast to the adapter type you expect).
pub type VisitLinear<'v> = dyn FnMut(&str, &mut dyn Any) -> Result<()> + 'v;
/// Callback of [`Module::visit_linears`].
pub type VisitLinearRef<'v> = dyn FnMut(&str, &dyn Any) + 'v;

/// A tree of parameters with Hugging Face names.
///
/// Implemented for [`Tensor`] (a leaf named by its prefix), `Option<M>`, `Vec<M>` (children
/// `prefix.0`, `prefix.1`, …), `Box<M>`, [`crate::models::Linear`], and for structs by
/// `#[derive(Module)]`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a module: it holds no named parameters",
    label = "this field is walked for parameters",
    note = "fields of a `#[derive(Module)]` struct must be tensors, modules, or `Option`/`Vec`/`Box` of them; mark other fields `#[module(skip)]`"
)]
pub trait Module {
    /// Calls `f` on every parameter below `prefix` with its full name.
    fn visit(&self, prefix: &str, f: &mut Visit<'_>);
    /// Calls `f` on every parameter below `prefix`, which may replace it.
    fn visit_mut(&mut self, prefix: &str, f: &mut VisitMut<'_>) -> Result<()>;
    /// Calls `f` on every linear layer below `prefix` with its module path.
    fn visit_linears(&self, _prefix: &str, _f: &mut VisitLinearRef<'_>) {}
    /// Calls `f` on every linear layer below `prefix` with its module path, mutably.
    fn visit_linears_mut(&mut self, _prefix: &str, _f: &mut VisitLinear<'_>) -> Result<()> {
        Ok(())
    }
}

/// `prefix.key`, or `key` at the root. Used by generated code.
pub fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else if key.is_empty() {
        prefix.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

impl Module for Tensor {
    fn visit(&self, prefix: &str, f: &mut Visit<'_>) {
        f(prefix, self, ParamRole::Base)
    }
    fn visit_mut(&mut self, prefix: &str, f: &mut VisitMut<'_>) -> Result<()> {
        f(prefix, self, ParamRole::Base)
    }
}

impl<M: Module> Module for Option<M> {
    fn visit(&self, prefix: &str, f: &mut Visit<'_>) {
        if let Some(m) = self {
            m.visit(prefix, f)
        }
    }
    fn visit_mut(&mut self, prefix: &str, f: &mut VisitMut<'_>) -> Result<()> {
        match self {
            Some(m) => m.visit_mut(prefix, f),
            None => Ok(()),
        }
    }
    fn visit_linears(&self, prefix: &str, f: &mut VisitLinearRef<'_>) {
        if let Some(m) = self {
            m.visit_linears(prefix, f)
        }
    }
    fn visit_linears_mut(&mut self, prefix: &str, f: &mut VisitLinear<'_>) -> Result<()> {
        match self {
            Some(m) => m.visit_linears_mut(prefix, f),
            None => Ok(()),
        }
    }
}

impl<M: Module> Module for Box<M> {
    fn visit(&self, prefix: &str, f: &mut Visit<'_>) {
        (**self).visit(prefix, f)
    }
    fn visit_mut(&mut self, prefix: &str, f: &mut VisitMut<'_>) -> Result<()> {
        (**self).visit_mut(prefix, f)
    }
    fn visit_linears(&self, prefix: &str, f: &mut VisitLinearRef<'_>) {
        (**self).visit_linears(prefix, f)
    }
    fn visit_linears_mut(&mut self, prefix: &str, f: &mut VisitLinear<'_>) -> Result<()> {
        (**self).visit_linears_mut(prefix, f)
    }
}

/// Elements are named `prefix.0`, `prefix.1`, … (Hugging Face's `layers.{i}`).
impl<M: Module> Module for Vec<M> {
    fn visit(&self, prefix: &str, f: &mut Visit<'_>) {
        for (i, m) in self.iter().enumerate() {
            m.visit(&join(prefix, &i.to_string()), f)
        }
    }
    fn visit_mut(&mut self, prefix: &str, f: &mut VisitMut<'_>) -> Result<()> {
        for (i, m) in self.iter_mut().enumerate() {
            m.visit_mut(&join(prefix, &i.to_string()), f)?
        }
        Ok(())
    }
    fn visit_linears(&self, prefix: &str, f: &mut VisitLinearRef<'_>) {
        for (i, m) in self.iter().enumerate() {
            m.visit_linears(&join(prefix, &i.to_string()), f)
        }
    }
    fn visit_linears_mut(&mut self, prefix: &str, f: &mut VisitLinear<'_>) -> Result<()> {
        for (i, m) in self.iter_mut().enumerate() {
            m.visit_linears_mut(&join(prefix, &i.to_string()), f)?
        }
        Ok(())
    }
}
