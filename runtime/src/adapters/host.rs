//! Attaching, switching, merging, saving and loading named adapters on any [`Module`].
//!
//! Written once over the module's walk of its linear layers, so a user's own model gets the same
//! operations as the built-in Llama family. Methods that touch adapter values name the adapter type
//! (`model.merge_adapter::<Lora>("default")`); [`crate::models::Llama`] wraps them without it.

use super::{Adapter, AdapterConfig, AdapterFormat};
use crate::module::ModuleExt;
use crate::error::{Error, Result};
use crate::formats::safetensors::{self as st, SafetensorsFiles};
use crate::models::linear::{AdapterSlot, Linear, LinearWeight};
use crate::module::{Module, ParamRole};
use crate::rng::Rng;
use crate::tensor::Tensor;
use std::collections::BTreeSet;
use std::path::Path;

/// PEFT's prefix of every saved adapter key.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// The classification head of a sequence classifier (reward model), saved beside an adapter.
pub const SCORE_KEY: &str = "score.weight";

/// PEFT's saved key of an adapter parameter: `base_model.model.<module>.<key>`.
pub fn peft_key(module: &str, key: &str) -> String {
    format!("{PEFT_PREFIX}{module}.{key}")
}

/// A per-layer seed: the user's seed mixed with an FNV-1a hash of the module path, so each layer's
/// initialisation does not depend on which other layers are adapted.
fn layer_seed(seed: u64, module: &str) -> u64 {
    module.bytes().fold(0xcbf2_9ce4_8422_2325 ^ seed, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

fn wrong_type<A: Adapter>(module: &str) -> Error {
    Error::Input(format!(
        "linear layer `{module}` does not carry `{}` adapters: the model was built for another adapter type (attach with `with_adapter`)",
        A::NAME
    ))
}

/// Calls `f` on every linear layer as a `Linear<A>`.
pub fn each_linear<A: Adapter, M: Module + ?Sized>(m: &mut M, mut f: impl FnMut(&str, &mut Linear<A>) -> Result<()>) -> Result<()> {
    m.visit_linears_mut("", &mut |name, any| match any.downcast_mut::<Linear<A>>() {
        Some(l) => f(name, l),
        None => Err(wrong_type::<A>(name)),
    })
}

/// Calls `f` on every linear layer as a `&Linear<A>`; errors when the layers carry another type.
pub fn each_linear_ref<A: Adapter, M: Module + ?Sized>(m: &M, mut f: impl FnMut(&str, &Linear<A>)) -> Result<()> {
    let mut bad = None;
    m.visit_linears("", &mut |name, any| match any.downcast_ref::<Linear<A>>() {
        Some(l) => f(name, l),
        None => bad = bad.take().or(Some(name.to_string())),
    });
    match bad {
        Some(name) => Err(wrong_type::<A>(&name)),
        None => Ok(()),
    }
}

fn slot_mut<'a, A: Adapter>(l: &'a mut Linear<A>, name: &str) -> Option<&'a mut AdapterSlot<A>> {
    l.adapters.iter_mut().find(|s| s.name == name)
}

/// Named adapters on a module. Implemented for every [`Module`].
pub trait AdapterHost: Module {
    /// Module paths of every linear layer.
    fn linear_names(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.visit_linears("", &mut |n, _| out.push(n.to_string()));
        out
    }

    /// Names of the attached adapters, in order of first appearance.
    fn adapter_names(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        self.visit("", &mut |_, _, role| {
            if let ParamRole::Adapter { adapter, .. } = role {
                if !out.iter().any(|a| a == adapter) {
                    out.push(adapter.to_string());
                }
            }
        });
        out
    }

    /// Injects adapter `name` into every linear layer `cfg` targets, initialised and trainable
    /// (the rest of the model is left as it is: freeze it with `freeze_all` first, as PEFT does).
    /// Returns the adapted module paths. Fails when no layer matches, listing the layer names.
    fn add_adapter<A: Adapter>(&mut self, name: &str, cfg: &AdapterConfig<A>) -> Result<Vec<String>> {
        if self.adapter_names().iter().any(|a| a == name) {
            return Err(Error::Input(format!("an adapter named `{name}` is already attached")));
        }
        let mut targeted = Vec::new();
        for module in self.linear_names() {
            if cfg.targets_module(&module)? {
                targeted.push(module);
            }
        }
        if targeted.is_empty() {
            return Err(Error::Input(format!(
                "target_modules {:?} (exclude {:?}) match no linear layer; the layers are: {}",
                cfg.targets,
                cfg.exclude,
                self.linear_names().join(", ")
            )));
        }
        each_linear::<A, _>(self, |module, l| {
            if !targeted.iter().any(|t| t == module) {
                return Ok(());
            }
            let hyper = cfg.hyper_for(module)?;
            let mut rng = Rng::new(layer_seed(cfg.seed, module));
            let mut adapter = A::init(hyper, l.base(module, None, false), &mut rng)?;
            run_after_init(&mut adapter, &mut l.weight, module)?;
            l.adapters.push(AdapterSlot { name: name.to_string(), adapter, enabled: true, merged: false });
            Ok(())
        })?;
        Ok(targeted)
    }

    /// Switches adapter `name` on or off everywhere.
    fn set_adapter_enabled<A: Adapter>(&mut self, name: &str, enabled: bool) -> Result<()> {
        let mut found = false;
        each_linear::<A, _>(self, |_, l| {
            if let Some(s) = slot_mut(l, name) {
                s.enabled = enabled;
                found = true;
            }
            Ok(())
        })?;
        found.then_some(()).ok_or_else(|| no_adapter(self, name))
    }

    /// Folds adapter `name` into the base weights (`W ← W + ΔW`); it stops costing compute.
    fn merge_adapter<A: Adapter>(&mut self, name: &str) -> Result<()> {
        fold::<A, Self>(self, name, true)
    }

    /// Undoes [`AdapterHost::merge_adapter`].
    fn unmerge_adapter<A: Adapter>(&mut self, name: &str) -> Result<()> {
        fold::<A, Self>(self, name, false)
    }

    /// Removes adapter `name` (unmerging it first if merged).
    fn delete_adapter<A: Adapter>(&mut self, name: &str) -> Result<()> {
        self.unmerge_adapter::<A>(name)?;
        each_linear::<A, _>(self, |_, l| {
            l.adapters.retain(|s| s.name != name);
            Ok(())
        })
    }

    /// The parameters of adapter `name` under PEFT's saved keys (`base_model.model.<module>.lora_A.weight`).
    fn adapter_parameters(&self, name: &str) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        self.visit("", &mut |_, t, role| {
            if let ParamRole::Adapter { adapter, module, key } = role {
                if adapter == name {
                    out.push((peft_key(module, key), t.clone()));
                }
            }
        });
        out
    }

    /// Writes adapter `name` as an adapter folder: `adapter_config.json` and
    /// `adapter_model.safetensors` with PEFT's keys, both written atomically.
    fn save_adapter<A: AdapterFormat>(&self, name: &str, dir: &Path, base_model: Option<&str>) -> Result<()> {
        let mut layers = Vec::new();
        each_linear_ref::<A, _>(self, |module, l| {
            if let Some(s) = l.adapters.iter().find(|s| s.name == name) {
                layers.push((module.to_string(), s.adapter.config()));
            }
        })?;
        if layers.is_empty() {
            return Err(no_adapter(self, name));
        }
        let mut config = A::write_config(&layers, &self.linear_names(), base_model)?;
        let mut tensors = self.adapter_parameters(name);
        // A sequence classifier's head (a reward model's `score`) is trained in full beside the
        // adapter: PEFT's task_type SEQ_CLS keeps it as a module to save, under its plain key.
        if let Some((_, score)) = self.named_parameters().into_iter().find(|(n, t)| n == SCORE_KEY && t.requires_grad_flag()) {
            tensors.push((format!("{PEFT_PREFIX}{SCORE_KEY}"), score));
            config["task_type"] = serde_json::json!("SEQ_CLS");
            config["modules_to_save"] = serde_json::json!(["classifier", "score"]);
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let text = serde_json::to_string_pretty(&config).map_err(|e| Error::Input(format!("adapter_config.json: {e}")))?;
        st::write_atomic(&dir.join("adapter_config.json"), text.as_bytes())?;
        st::save(&dir.join("adapter_model.safetensors"), &tensors, None)
    }

    /// Loads an adapter folder (PEFT's format, or temper's generic one for user adapters) as
    /// adapter `name`, frozen. Returns the adapted module paths. A key for a layer the model
    /// lacks, a missing tensor or a wrong shape is an error naming the key and file.
    fn load_adapter<A: AdapterFormat>(&mut self, dir: &Path, name: &str) -> Result<Vec<String>> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::format(&cfg_path, format!("invalid JSON: {e}")))?;
        let cfg = A::read_config(&v, &cfg_path, &self.linear_names())?;
        let file = dir.join("adapter_model.safetensors");
        if !file.exists() {
            return Err(Error::format(dir, "no adapter_model.safetensors in this adapter folder"));
        }
        let files = SafetensorsFiles::open_files(std::slice::from_ref(&file))?;
        let mut unused: BTreeSet<String> = files.names().map(String::from).collect();
        if self.adapter_names().iter().any(|a| a == name) {
            return Err(Error::Input(format!("an adapter named `{name}` is already attached")));
        }
        let mut adapted = Vec::new();
        each_linear::<A, _>(self, |module, l| {
            let prefix = format!("{PEFT_PREFIX}{module}.");
            if !unused.iter().any(|k| k.starts_with(&prefix)) {
                return Ok(());
            }
            let mut adapter = A::init(cfg.hyper_for(module)?, l.base(module, None, false), &mut Rng::new(0))?;
            // Data-dependent initialisations (OLoRA, PiSSA) rebuild the residual base weight as
            // PEFT does on load; the saved tensors then replace the fresh adapter values.
            run_after_init(&mut adapter, &mut l.weight, module)?;
            adapter.visit_params_mut(&mut |key, t| {
                let k = peft_key(module, key);
                if !files.contains(&k) {
                    return Err(Error::MissingTensor { path: file.clone(), name: k });
                }
                let (shape, _) = files.info(&k)?;
                if shape != t.shape() {
                    return Err(Error::BadTensor {
                        name: k,
                        msg: format!("in {}: shape {:?}, but `{module}` (weight {:?}) with this config needs {:?}", file.display(), shape, l.weight.shape(), t.shape()),
                    });
                }
                *t = files.load_as(&k, t.shape(), t.dtype())?;
                unused.remove(&k);
                Ok(())
            })?;
            l.adapters.push(AdapterSlot { name: name.to_string(), adapter, enabled: true, merged: false });
            adapted.push(module.to_string());
            Ok(())
        })?;
        // The saved head of a sequence classifier (PEFT's modules_to_save) replaces the model's.
        let head = format!("{PEFT_PREFIX}{SCORE_KEY}");
        if unused.remove(&head) {
            let mut found = false;
            self.map_parameters(&mut |n, t| {
                if n != SCORE_KEY {
                    return Ok(t.clone());
                }
                found = true;
                let loaded = files.load_as(&head, t.shape(), t.dtype())?.to_device(t.device())?;
                Ok(if t.requires_grad_flag() { loaded.requires_grad() } else { loaded })
            })?;
            if !found {
                return Err(Error::BadTensor { name: head, msg: format!("in {}: a sequence-classification head, but the model is not a sequence classifier", file.display()) });
            }
        }
        if let Some(k) = unused.iter().next() {
            return Err(Error::BadTensor {
                name: k.clone(),
                msg: format!("in {}: matches no parameter of a `{}` adapter on any linear layer of the model", file.display(), A::NAME),
            });
        }
        Ok(adapted)
    }
}

impl<M: Module + ?Sized> AdapterHost for M {}

/// [`Adapter::after_init`] on a layer's weight. A quantised base is handed over dequantised only to
/// adapters that may rewrite it ([`Adapter::REWRITES_BASE`]), and if the hook did rewrite it, it is
/// quantised again with its own parameters, as PEFT does for OLoRA/PiSSA on bitsandbytes layers.
fn run_after_init<A: Adapter>(adapter: &mut A, weight: &mut LinearWeight, module: &str) -> Result<()> {
    match weight {
        LinearWeight::Dense(t) => adapter.after_init(t),
        LinearWeight::Quantized(_) if !A::REWRITES_BASE => Ok(()),
        LinearWeight::Quantized(q) => {
            // One layer dequantised at a time; most hooks (plain LoRA's) leave it untouched.
            let mut dense = q.dequantize()?;
            let before = dense.id();
            adapter.after_init(&mut dense)?;
            if dense.id() != before {
                let cfg = q.bnb_config().ok_or_else(|| {
                    Error::Input(format!("`{module}`: this `{}` initialisation rewrites the base weight, which a GGUF-quantised base cannot take (use the default initialisation)", A::NAME))
                })?;
                *weight = LinearWeight::Quantized(std::sync::Arc::new(crate::quant::QuantizedWeight::quantize_bnb(&dense, cfg)?));
            }
            Ok(())
        }
    }
}

/// Merges (`merge`) or unmerges adapter `name` on every layer that carries it; layers already in
/// the requested state are left alone.
fn fold<A: Adapter, M: AdapterHost + ?Sized>(m: &mut M, name: &str, merge: bool) -> Result<()> {
    let mut found = false;
    crate::autograd::no_grad(|| {
        each_linear::<A, M>(m, |module, l| {
            let Some(i) = l.adapters.iter().position(|s| s.name == name) else { return Ok(()) };
            found = true;
            if l.adapters[i].merged == merge {
                return Ok(());
            }
            let (w, b) = (l.weight.clone(), l.bias.clone());
            let base = crate::adapters::BaseLayer { module, weight: &w, bias: b.as_ref(), out: None, training: false };
            let slot = &mut l.adapters[i];
            let new = if merge { slot.adapter.merge(base)? } else { slot.adapter.unmerge(base)? };
            let trainable = w.as_dense().is_some_and(|t| t.requires_grad_flag());
            l.weight = LinearWeight::Dense(if trainable { new.requires_grad() } else { new });
            l.adapters[i].merged = merge;
            Ok(())
        })
    })?;
    found.then_some(()).ok_or_else(|| no_adapter(m, name))
}

fn no_adapter<M: Module + ?Sized>(m: &M, name: &str) -> Error {
    Error::Input(format!("no adapter named `{name}`; attached: {:?}", m.adapter_names()))
}
