//! Checkpoints: `output_dir/checkpoint-N/` holding what training needs to continue exactly.
//!
//! - the trained weights: an adapter folder in PEFT's format (`adapter_config.json`,
//!   `adapter_model.safetensors`) or, for full fine-tuning, a Hugging Face model folder;
//! - `optimizer.safetensors`: the optimizer's state;
//! - `trainer_state.json`: step, data position (epoch, micro-batch), the dropout stream, the schedule.
//!
//! A checkpoint is written into `checkpoint-N.tmp` and renamed into place, so a crash (or a full
//! disk) leaves either the previous checkpoints or a complete new one, never a half-written one.

use crate::adapters::host::peft_key;
use crate::adapters::{AdapterFormat, AdapterHost};
use crate::error::{Error, Result};
use crate::formats::safetensors::{self as st, SafetensorsFiles};
use crate::models::Llama;
use crate::module::{Module, ParamRole};
use crate::optim::Optimizer;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where training stands, saved beside the weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps taken.
    pub step: u64,
    /// The epoch and micro-batch the next step starts from.
    pub epoch: u64,
    pub batch_index: usize,
    /// The dropout stream position.
    pub dropout_state: u64,
    pub total_steps: u64,
    pub seed: u64,
}

/// `output_dir/checkpoint-N` directories present, sorted by N.
pub fn list(output_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(output_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io(output_dir, e)),
    };
    for e in rd {
        let e = e.map_err(|e| Error::io(output_dir, e))?;
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(n) = name.strip_prefix("checkpoint-").and_then(|n| n.parse::<u64>().ok()) {
            if e.path().join("trainer_state.json").exists() {
                out.push((n, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Writes the trained weights of `model`: adapter `adapter` as a PEFT folder, or the whole model.
pub fn save_weights<A: AdapterFormat>(model: &Llama<A>, adapter: Option<&str>, dir: &Path, base_model: Option<&str>) -> Result<()> {
    match adapter {
        Some(name) => model.save_adapter::<A>(name, dir, base_model)?,
        None => model.save_pretrained(dir)?,
    }
    // PPO's value head is no part of the causal LM or its adapter: it is kept beside them.
    if let Some(v) = &model.v_head {
        st::save(&dir.join(VALUE_HEAD_FILE), &[(VALUE_HEAD_KEY.to_string(), v.clone())], None)?;
    }
    Ok(())
}

/// Where [`save_weights`] keeps PPO's value head, and its key there (TRL's name).
pub const VALUE_HEAD_FILE: &str = "value_head.safetensors";
pub const VALUE_HEAD_KEY: &str = "v_head.summary.weight";

/// Writes `output_dir/checkpoint-{state.step}` atomically and keeps only the last `keep` (0 = all).
pub fn save<A: AdapterFormat, O: Optimizer>(
    output_dir: &Path,
    model: &Llama<A>,
    adapter: Option<&str>,
    optimizer: &O,
    state: &TrainerState,
    keep: usize,
    base_model: Option<&str>,
) -> Result<PathBuf> {
    let fin = output_dir.join(format!("checkpoint-{}", state.step));
    let tmp = output_dir.join(format!("checkpoint-{}.tmp", state.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    save_weights(model, adapter, &tmp, base_model)?;
    st::save(&tmp.join("optimizer.safetensors"), &optimizer.state()?, None)?;
    let json = serde_json::to_string_pretty(state).map_err(|e| Error::Input(format!("trainer_state.json: {e}")))?;
    st::write_atomic(&tmp.join("trainer_state.json"), json.as_bytes())?;
    if fin.exists() {
        std::fs::remove_dir_all(&fin).map_err(|e| Error::io(&fin, e))?;
    }
    std::fs::rename(&tmp, &fin).map_err(|e| Error::io(&fin, e))?;
    if keep > 0 {
        let all = list(output_dir)?;
        for (_, old) in all.iter().take(all.len().saturating_sub(keep)) {
            std::fs::remove_dir_all(old).map_err(|e| Error::io(old, e))?;
        }
    }
    Ok(fin)
}

/// Restores the trainable parameters, the optimizer and the trainer state from `dir`.
pub fn load<A: AdapterFormat, O: Optimizer>(dir: &Path, model: &mut Llama<A>, adapter: Option<&str>, optimizer: &mut O) -> Result<TrainerState> {
    let sp = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&sp).map_err(|e| Error::io(&sp, e))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| Error::format(&sp, format!("{e}")))?;
    let weights = match adapter {
        Some(_) => dir.join("adapter_model.safetensors"),
        None => dir.join("model.safetensors"),
    };
    let files = SafetensorsFiles::open_files(std::slice::from_ref(&weights))?;
    let value_head = dir.join(VALUE_HEAD_FILE);
    model.visit_mut("", &mut |name, t, role| {
        if !t.requires_grad_flag() {
            return Ok(());
        }
        if name == VALUE_HEAD_KEY {
            let v = SafetensorsFiles::open_files(std::slice::from_ref(&value_head))?.load_as(VALUE_HEAD_KEY, t.shape(), t.dtype())?;
            *t.storage_mut() = v.contiguous_storage()?.clone();
            return Ok(());
        }
        let key = match role {
            // A base parameter trained beside an adapter (a reward model's score head) is saved
            // in the adapter file under PEFT's prefix (modules_to_save).
            ParamRole::Base if adapter.is_some() => format!("{}{name}", crate::adapters::host::PEFT_PREFIX),
            ParamRole::Base => name.to_string(),
            ParamRole::Adapter { adapter: a, module, key } if Some(a) == adapter => peft_key(module, key),
            ParamRole::Adapter { .. } | ParamRole::Quantized { .. } => return Ok(()),
        };
        // Values are written in place so the optimizer, which holds these tensors, sees them.
        let v = files.load_as(&key, t.shape(), t.dtype())?;
        *t.storage_mut() = v.contiguous_storage()?.clone();
        Ok(())
    })?;
    let opt = SafetensorsFiles::open_files(&[dir.join("optimizer.safetensors")])?;
    optimizer.load_state(&|n| if opt.contains(n) { opt.load(n).map(Some) } else { Ok(None) })?;
    let _ = AdapterHost::adapter_names(model);
    Ok(state)
}
