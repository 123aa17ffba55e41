//! What every module can do, written once on top of the parameter walk.

use super::{Module, ParamRole};
use crate::error::{Error, Result};
use crate::formats::safetensors::{self as st, SafetensorsFiles};
use crate::tensor::{DType, Tensor};
use crate::Device;
use std::path::Path;

/// Trainable and total parameter counts, printed the way PEFT's `print_trainable_parameters` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamCounts {
    pub trainable: usize,
    pub total: usize,
}

impl std::fmt::Display for ParamCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pct = if self.total == 0 { 0.0 } else { 100.0 * self.trainable as f64 / self.total as f64 };
        write!(f, "trainable params: {} || all params: {} || trainable%: {pct:.4}", thousands(self.trainable), thousands(self.total))
    }
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn compile(pattern: &str) -> Result<regex::Regex> {
    regex::Regex::new(pattern).map_err(|e| Error::Input(format!("invalid parameter-name pattern `{pattern}`: {e}")))
}

/// Loading, saving, freezing, counting and moving, for every [`Module`].
pub trait ModuleExt: Module {
    /// Every parameter (base and adapters) with its full name, in declaration order.
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        self.visit("", &mut |n, t, _| out.push((n.to_string(), t.clone())));
        out
    }

    /// The base model's parameters (what a Hugging Face checkpoint holds, quantised layers as
    /// their bitsandbytes tensors), without adapters.
    fn base_parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        self.visit("", &mut |n, t, role| {
            if matches!(role, ParamRole::Base | ParamRole::Quantized { .. }) {
                out.push((n.to_string(), t.clone()))
            }
        });
        out
    }

    /// Replaces every parameter by `f(name, tensor)`.
    fn map_parameters(&mut self, f: &mut dyn FnMut(&str, &Tensor) -> Result<Tensor>) -> Result<()> {
        self.visit_mut("", &mut |n, t, _| {
            *t = f(n, t)?;
            Ok(())
        })
    }

    /// Makes the parameters whose names match the regex `pattern` (anywhere in the name) trainable.
    /// Returns how many matched; matching none is an error that lists a few names.
    fn unfreeze(&mut self, pattern: &str) -> Result<usize> {
        set_requires_grad(self, pattern, true)
    }

    /// Freezes the parameters whose names match the regex `pattern`. Returns how many matched.
    fn freeze(&mut self, pattern: &str) -> Result<usize> {
        set_requires_grad(self, pattern, false)
    }

    /// Freezes everything.
    fn freeze_all(&mut self) -> Result<()> {
        self.map_parameters(&mut |_, t| Ok(t.detach()))
    }

    /// The parameters currently trainable, with names.
    fn trainable_parameters(&self) -> Vec<(String, Tensor)> {
        self.named_parameters().into_iter().filter(|(_, t)| t.requires_grad_flag()).collect()
    }

    /// Trainable and total parameter counts (tied weights counted once; a quantised weight counts
    /// its values, not its packed bytes).
    fn parameter_counts(&self) -> ParamCounts {
        let mut seen = std::collections::HashSet::new();
        let mut c = ParamCounts { trainable: 0, total: 0 };
        self.visit("", &mut |_, t, role| {
            if let ParamRole::Quantized { numel } = role {
                c.total += numel;
            } else if seen.insert(t.id()) {
                c.total += t.elem_count();
                if t.requires_grad_flag() {
                    c.trainable += t.elem_count();
                }
            }
        });
        c
    }

    /// Prints `trainable params: … || all params: … || trainable%: …`.
    fn print_trainable_parameters(&self) {
        println!("{}", self.parameter_counts());
    }

    /// Loads every base parameter from safetensors `files` by name (shape-checked, converted to
    /// the parameter's dtype). A missing name is an error naming it and the file set.
    fn load_safetensors(&mut self, files: &SafetensorsFiles) -> Result<()> {
        self.visit_mut("", &mut |n, t, role| {
            if role == ParamRole::Base {
                let trainable = t.requires_grad_flag();
                let new = files.load_as(n, t.shape(), t.dtype())?;
                *t = if trainable { new.requires_grad() } else { new };
            }
            Ok(())
        })
    }

    /// Writes the base parameters to one safetensors file, atomically.
    fn save_safetensors(&self, path: &Path) -> Result<()> {
        st::save(path, &self.base_parameters(), None)
    }

    /// Converts every parameter to `dtype` (trainability kept).
    fn to_dtype(&mut self, dtype: DType) -> Result<()> {
        self.map_parameters(&mut |_, t| {
            let c = t.to_dtype(dtype)?;
            Ok(if t.requires_grad_flag() { c.detach().requires_grad() } else { c.detach() })
        })
    }

    /// Moves every parameter to `device`.
    fn to_device(&mut self, device: Device) -> Result<()> {
        // A moved parameter stays trainable if it was.
        self.map_parameters(&mut |_, t| {
            let moved = t.to_device(device)?;
            Ok(if t.requires_grad_flag() && !moved.requires_grad_flag() { moved.requires_grad() } else { moved })
        })
    }
}

impl<M: Module + ?Sized> ModuleExt for M {}

fn set_requires_grad<M: Module + ?Sized>(m: &mut M, pattern: &str, on: bool) -> Result<usize> {
    let re = compile(pattern)?;
    let mut n = 0;
    let mut names = Vec::new();
    m.visit_mut("", &mut |name, t, _| {
        if re.is_match(name) {
            n += 1;
            *t = if on { t.detach().requires_grad() } else { t.detach() };
        } else if names.len() < 8 {
            names.push(name.to_string());
        }
        Ok(())
    })?;
    if n == 0 {
        return Err(Error::Input(format!("no parameter name matches `{pattern}`; names look like: {}", names.join(", "))));
    }
    Ok(n)
}
