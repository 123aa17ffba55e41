//! `metrics.jsonl`: one JSON object per line, appended and handed to the OS row by row.
//!
//! Train rows: `{"step":10,"loss":1.23,"lr":0.0002,"tokens_per_s":1234.5,"grad_norm":0.8,...}`,
//! keys in the order given. Eval rows: `{"step":10,"eval_loss":1.4,"eval_ppl":4.05,...}`.
//! JSON has no NaN or infinity, so a non-finite value is written as `null`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// One row as an ordered list of keys and values, serialized without a map so that key order
/// is what the caller gave (serde_json's map would sort the keys).
pub(crate) fn row_json(step: u64, fields: &[(String, f64)]) -> String {
    let mut line = format!("{{\"step\":{step}");
    for (key, v) in fields {
        // Serializing a &str cannot fail; an f64 gives `null` for NaN and infinities.
        line.push(',');
        line.push_str(&serde_json::to_string(key.as_str()).unwrap_or_default());
        line.push(':');
        line.push_str(&serde_json::to_string(v).unwrap_or_else(|_| "null".into()));
    }
    line.push_str("}\n");
    line
}

pub(crate) struct MetricsFile {
    path: PathBuf,
    file: File,
}

impl MetricsFile {
    pub(crate) fn open_append(path: &Path) -> Result<MetricsFile> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(MetricsFile { path: path.to_path_buf(), file })
    }

    /// One `write_all` per row on an unbuffered file in append mode: the row reaches the OS
    /// whole or the call returns the error.
    pub(crate) fn append(&mut self, line: &str) -> Result<()> {
        self.file.write_all(line.as_bytes()).map_err(|e| Error::io(&self.path, e))
    }

    pub(crate) fn sync(&mut self) -> Result<()> {
        self.file.sync_data().map_err(|e| Error::io(&self.path, e))
    }
}

/// What a resumed run keeps from an earlier `metrics.jsonl`: the rows with `step <= last_step`,
/// parsed again so the final plot covers the whole run.
#[derive(Default)]
pub(crate) struct History {
    pub(crate) train_loss: Vec<(u64, f64)>,
    pub(crate) lr: Vec<(u64, f64)>,
    pub(crate) eval_loss: Vec<(u64, f64)>,
    /// Preference and reward-model metrics (train and `eval_` keys of [`REWARD_KEYS`]), for `rewards.png`.
    pub(crate) rewards: std::collections::BTreeMap<String, Vec<(u64, f64)>>,
}

/// The metrics `rewards.png` plots: implicit-reward margins and accuracies of preference runs
/// (TRL's names), a reward model's margin and accuracy.
pub(crate) const REWARD_KEYS: [&str; 8] = ["rewards/margins", "rewards/accuracies", "margin", "accuracy", "reward", "kl", "objective/kl", "completions/mean_length"];

impl History {
    pub(crate) fn record(&mut self, step: u64, key: &str, v: Option<f64>) {
        let v = v.unwrap_or(f64::NAN);
        match key {
            "loss" => self.train_loss.push((step, v)),
            "lr" => self.lr.push((step, v)),
            "eval_loss" => self.eval_loss.push((step, v)),
            k if REWARD_KEYS.contains(&k.strip_prefix("eval_").unwrap_or(k)) => self.rewards.entry(k.to_string()).or_default().push((step, v)),
            _ => {}
        }
    }
}

/// Rewrites `path` keeping only rows with `step <= last_step`, and returns what they held.
///
/// A line that is not a JSON object with an integer `step` (a row torn by a crash, say) is
/// dropped. The new contents go to a temporary file that is synced and then renamed over the
/// old one, so an error at any point leaves the original file as it was.
pub(crate) fn truncate_after(path: &Path, last_step: u64) -> Result<History> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(History::default()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut kept = String::with_capacity(text.len());
    let mut history = History::default();
    for line in text.lines() {
        let Ok(serde_json::Value::Object(obj)) = serde_json::from_str::<serde_json::Value>(line)
        else {
            continue;
        };
        let Some(step) = obj.get("step").and_then(|s| s.as_u64()) else { continue };
        if step > last_step {
            continue;
        }
        for (key, v) in &obj {
            history.record(step, key, v.as_f64());
        }
        kept.push_str(line);
        kept.push('\n');
    }
    if kept.len() == text.len() && text.ends_with('\n') {
        return Ok(history); // nothing to drop: leave the file untouched
    }
    let tmp = path.with_extension("jsonl.tmp");
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(kept.as_bytes())?;
        f.sync_all()
    };
    write().map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    Ok(history)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_keep_key_order_and_write_non_finite_as_null() {
        let row = row_json(
            3,
            &[("loss".into(), 1.5), ("lr".into(), 2e-4), ("kl".into(), f64::NAN), ("x".into(), f64::INFINITY)],
        );
        assert_eq!(row, "{\"step\":3,\"loss\":1.5,\"lr\":0.0002,\"kl\":null,\"x\":null}\n");
        let v: serde_json::Value = serde_json::from_str(&row).unwrap();
        assert!(v["kl"].is_null());
    }
}
