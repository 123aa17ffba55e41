//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// A committed fixture path.
pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

/// The SmolLM2 GGUF fetched by scripts/fetch-assets.sh, or None (tests then skip, saying so).
pub fn smollm2() -> Option<PathBuf> {
    let dir = std::env::var_os("TEMPER_ASSETS").map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("assets"));
    let p = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.exists() {
        Some(p)
    } else {
        eprintln!("SKIPPED: {} is absent (run scripts/fetch-assets.sh)", p.display());
        None
    }
}

/// Writes `records` as JSONL lines to `dir/name` and returns the path (the CLI tests' datasets).
pub fn write_jsonl(dir: &Path, name: &str, records: impl IntoIterator<Item = serde_json::Value>) -> PathBuf {
    let p = dir.join(name);
    let lines: Vec<String> = records.into_iter().map(|r| r.to_string()).collect();
    std::fs::write(&p, lines.join("\n") + "\n").expect("write a JSONL dataset");
    p
}

/// A fresh empty folder under the target directory.
pub fn scratch_dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create scratch dir");
    d
}

/// Copies a fixture model folder into a scratch folder (to corrupt it there).
pub fn copy_model(name: &str, to: &str) -> PathBuf {
    let src = fixture(&format!("models/{name}"));
    let dst = scratch_dir(to);
    for e in std::fs::read_dir(&src).expect("fixture dir") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), dst.join(e.file_name())).expect("copy");
    }
    dst
}

/// Runs the temper binary; returns (success, stdout, stderr).
pub fn temper(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_temper")).args(args).output().expect("run temper");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// ‖a − b‖ / ‖b‖: the gradient comparison every parity test uses.
pub fn relative_error(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "compared tensors differ in size");
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
    num / b.iter().map(|y| y * y).sum::<f64>().sqrt().max(1e-30)
}
