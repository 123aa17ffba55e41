//! `temper train` with `rl = …` and `temper reward`, end to end on the tiny fixture model with
//! the character-level ChatML tokenizer: each loss trains and logs TRL's metric names, the
//! reference sources work, a reward model saves as a sequence classifier and scores pairs, and
//! bad configs are errors naming the key.

mod common;

use common::{fixture, scratch_dir, temper};
use std::path::{Path, PathBuf};

/// Conversational pairs: the chosen reply repeats the number asked for, the rejected one does not.
fn write_pairs(dir: &Path, n: usize) -> PathBuf {
    common::write_jsonl(
        dir,
        "pairs.jsonl",
        (0..n).map(|i| {
            let k = i % 7;
            serde_json::json!({
                "prompt": [{"role": "user", "content": format!("say {k}")}],
                "chosen": [{"role": "assistant", "content": format!("{k} ok")}],
                "rejected": [{"role": "assistant", "content": "no"}],
            })
        }),
    )
}

/// KTO items from the same task: the good reply desirable, the bad one not.
fn write_kto(dir: &Path, n: usize) -> PathBuf {
    common::write_jsonl(
        dir,
        "kto.jsonl",
        (0..n).map(|i| {
            let k = i % 7;
            let good = i % 2 == 0;
            serde_json::json!({"prompt": format!("say {k}"), "completion": if good { format!("{k} ok") } else { "no".to_string() }, "label": good})
        }),
    )
}

fn write_config(dir: &Path, data: &Path, format: &str, head: &str, adapter: &str) -> PathBuf {
    let cfg = format!(
        r#"base_model = "{base}"
tokenizer = "{tok}"
sequence_len = 48
micro_batch_size = 4
max_steps = 8
learning_rate = 1e-2
warmup_steps = 1
val_set_size = 0.2
eval_steps = 4
output_dir = "{out}"
seed = 3
{head}
[adapter]
{adapter}

[[datasets]]
path = "{data}"
type = "{format}"
"#,
        base = fixture("models/llama_gqa_llama3rope").display(),
        tok = fixture("tokenizers/tiny_chat").display(),
        out = dir.join("out").display(),
        data = data.display(),
    );
    // Keys in `head` replace the defaults above.
    let keys: Vec<String> = head.lines().filter_map(|l| l.split_once(" = ").map(|(k, _)| format!("{k} = "))).collect();
    let cfg: String = cfg.lines().enumerate().filter(|(i, l)| *i >= 11 || !keys.iter().any(|k| l.starts_with(k.as_str()))).map(|(_, l)| format!("{l}\n")).collect();
    let p = dir.join("train.toml");
    std::fs::write(&p, cfg).unwrap();
    p
}

const LORA: &str = "kind = \"lora\"\nr = 4\nalpha = 8";

fn rows(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn train(dir: &Path, cfg: &Path) -> (Vec<serde_json::Value>, String) {
    let (ok, _, err) = temper(&["train", cfg.to_str().unwrap(), "--progress", "lines"]);
    assert!(ok, "{err}");
    (rows(&dir.join("out")), err)
}

#[test]
fn dpo_with_lora_learns_the_preference_and_logs_trl_metrics() {
    let dir = scratch_dir("pref-dpo");
    let cfg = write_config(&dir, &write_pairs(&dir, 40), "preference", "rl = \"dpo\"\nbeta = 0.5", LORA);
    let (rows, err) = train(&dir, &cfg);
    let train: Vec<&serde_json::Value> = rows.iter().filter(|r| r.get("loss").is_some()).collect();
    assert_eq!(train.len(), 8, "{rows:?}");
    for k in ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "loss/sigmoid"] {
        assert!(train.iter().all(|r| r[k].as_f64().is_some()), "{k} missing: {:?}", train[0]);
    }
    // Step 1: the adapter starts at zero, so the policy is the reference: loss ln 2, margins 0.
    assert!((train[0]["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-5, "{:?}", train[0]);
    let last_eval = rows.iter().rev().find(|r| r.get("eval_loss").is_some()).expect("an eval row");
    assert!(last_eval["eval_rewards/margins"].as_f64().unwrap() > 0.0 && last_eval["eval_rewards/accuracies"].as_f64().unwrap() >= 0.75, "{last_eval:?}\n{err}");
    assert!(last_eval["eval_loss"].as_f64().unwrap() < std::f64::consts::LN_2, "{last_eval:?}");
    assert!(dir.join("out/adapter_model.safetensors").exists());
    assert!(dir.join("out/rewards.png").exists(), "the margin/accuracy plot");
    // `temper data preview` shows the pairs as the model sees them: the prompt inside ⟦ ⟧.
    let (ok, stdout, err) = temper(&["data", "preview", cfg.to_str().unwrap(), "--n", "1"]);
    assert!(ok, "{err}");
    assert!(stdout.contains("⟦<|im_start|>user\nsay 0<|im_end|>\n<|im_start|>assistant\n⟧0 ok<|im_end|>") && stdout.contains("-- rejected --"), "{stdout}");
}

#[test]
fn ipo_hinge_mix_orpo_simpo_and_kto_train_and_log_their_terms() {
    let cases = [
        ("rl = \"ipo\"", "loss/ipo"),
        ("rl = \"dpo\"\nloss_type = [\"sigmoid\", \"hinge\", \"sft\"]\nloss_weights = [1.0, 0.5, 0.2]", "loss/hinge"),
        ("rl = \"dpo\"\nlabel_smoothing = 0.1\nrpo_alpha = 0.5", "nll_loss"),
        ("rl = \"orpo\"", "log_odds_ratio"),
        ("rl = \"simpo\"\nbeta = 2.0\ncpo_alpha = 0.5", "loss/simpo"),
    ];
    for (i, (head, key)) in cases.iter().enumerate() {
        let dir = scratch_dir(&format!("pref-mix{i}"));
        let cfg = write_config(&dir, &write_pairs(&dir, 20), "preference", head, LORA);
        let (rows, _) = train(&dir, &cfg);
        let first = rows.iter().find(|r| r.get("loss").is_some()).unwrap();
        assert!(first[*key].as_f64().is_some_and(f64::is_finite), "{head}: {key} missing in {first:?}");
        assert!(first["rewards/accuracies"].as_f64().is_some(), "{head}: {first:?}");
    }
    let dir = scratch_dir("pref-kto");
    let kto_data = write_kto(&dir, 40);
    let cfg = write_config(&dir, &kto_data, "kto", "rl = \"kto\"\ndesirable_weight = 1.0\nundesirable_weight = 1.2", LORA);
    let (rows, _) = train(&dir, &cfg);
    // Precomputed reference log-probs give the same run.
    let dir2 = scratch_dir("pref-kto-pre");
    let cfg2 = write_config(&dir2, &kto_data, "kto", "rl = \"kto\"\ndesirable_weight = 1.0\nundesirable_weight = 1.2\nprecompute_ref_log_probs = true", LORA);
    let (rows2, _) = train(&dir2, &cfg2);
    assert!(dir2.join("out/reference_logps.json").exists());
    let losses = |r: &[serde_json::Value]| r.iter().filter_map(|x| x.get("loss").and_then(|l| l.as_f64())).collect::<Vec<f64>>();
    for (a, b) in losses(&rows).iter().zip(losses(&rows2)) {
        assert!((a - b).abs() < 1e-4 * a.abs().max(1.0), "{:?} vs {:?}", losses(&rows), losses(&rows2));
    }
    let first = rows.iter().find(|r| r.get("loss").is_some()).unwrap();
    assert!(first["kl"].as_f64().is_some() && first["rewards/chosen"].as_f64().is_some(), "{first:?}");
    // At step 1 the policy is the reference: every log-ratio and the KL point are 0, so each item
    // costs w·(1 − σ(0)) = w/2, between 0.5 (all desirable) and 0.6 (all undesirable).
    let l = first["loss"].as_f64().unwrap();
    assert!((0.5 - 1e-6..=0.6 + 1e-6).contains(&l) && first["kl"].as_f64().unwrap().abs() < 1e-9, "{first:?}");
}

#[test]
fn full_fine_tuning_uses_a_frozen_copy_or_precomputed_reference_log_probs() {
    let dir = scratch_dir("pref-full");
    let data = write_pairs(&dir, 20);
    let cfg = write_config(&dir, &data, "preference", "rl = \"dpo\"\nlearning_rate = 1e-3", "kind = \"none\"");
    let (frozen, err) = train(&dir, &cfg);
    assert!(err.contains("frozen copy"), "{err}");
    let dir2 = scratch_dir("pref-full-pre");
    let cfg2 = write_config(&dir2, &data, "preference", "rl = \"dpo\"\nlearning_rate = 1e-3\nprecompute_ref_log_probs = true", "kind = \"none\"");
    let (pre, _) = train(&dir2, &cfg2);
    assert!(dir2.join("out/reference_logps.json").exists());
    // The same reference either way: the same losses, step for step.
    let losses = |r: &[serde_json::Value]| r.iter().filter_map(|x| x.get("loss").and_then(|l| l.as_f64())).collect::<Vec<f64>>();
    let (a, b) = (losses(&frozen), losses(&pre));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-4 * x.abs().max(1.0), "{a:?} vs {b:?}");
    }
}

#[test]
fn a_reward_model_saves_as_a_sequence_classifier_and_temper_reward_scores_pairs() {
    let dir = scratch_dir("pref-reward");
    let data = write_pairs(&dir, 40);
    let cfg = write_config(&dir, &data, "preference", "rl = \"reward\"\ncenter_rewards_coefficient = 0.01\nlearning_rate = 5e-3", "kind = \"none\"");
    let (rows, _) = train(&dir, &cfg);
    let first = rows.iter().find(|r| r.get("loss").is_some()).unwrap();
    for k in ["accuracy", "margin", "min_reward", "mean_reward", "max_reward"] {
        assert!(first[k].as_f64().is_some(), "{k}: {first:?}");
    }
    let out = dir.join("out");
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "LlamaForSequenceClassification");
    assert_eq!(config["num_labels"], 1);
    assert!(config["pad_token_id"].as_u64().is_some());
    let (ok, stdout, err) = temper(&["reward", out.to_str().unwrap(), "--dataset", data.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 41);
    let summary = lines.last().unwrap();
    assert!(summary["accuracy"].as_f64().unwrap() >= 0.9, "{summary}");
    assert!(lines[0]["chosen"].as_f64().unwrap() > lines[0]["rejected"].as_f64().unwrap() || !lines[0]["correct"].as_bool().unwrap());
    // A LoRA reward model is merged into out/reward_model.
    let dir2 = scratch_dir("pref-reward-lora");
    let cfg2 = write_config(&dir2, &data, "preference", "rl = \"reward\"\nmax_steps = 2\nsave_steps = 1", LORA);
    train(&dir2, &cfg2);
    assert!(dir2.join("out/reward_model/model.safetensors").exists());
    // Its checkpoints are PEFT SEQ_CLS adapters carrying the head (modules_to_save), so it resumes.
    let ac: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir2.join("out/checkpoint-2/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(ac["task_type"], "SEQ_CLS");
    let head = temper::formats::safetensors::SafetensorsFiles::open_files(&[dir2.join("out/checkpoint-2/adapter_model.safetensors")]).unwrap();
    assert!(head.contains("base_model.model.score.weight"));
    std::fs::write(&cfg2, std::fs::read_to_string(&cfg2).unwrap().replace("max_steps = 2", "max_steps = 3")).unwrap();
    let (ok, _, err) = temper(&["train", cfg2.to_str().unwrap(), "--resume", "--progress", "lines"]);
    assert!(ok && err.contains("step 3/3"), "{err}");
    let (ok, stdout, err) = temper(&["reward", dir2.join("out/reward_model").to_str().unwrap(), "--dataset", write_kto(&dir2, 3).to_str().unwrap()]);
    assert!(ok && stdout.contains("3 completions: mean reward"), "{stdout}{err}");
    // Not a reward model.
    let (ok, _, err) = temper(&["reward", fixture("models/llama_gqa_llama3rope").to_str().unwrap(), "--dataset", data.to_str().unwrap()]);
    assert!(!ok && err.contains("not a reward model"), "{err}");
}

#[test]
fn bad_preference_configs_name_the_key() {
    let dir = scratch_dir("pref-bad");
    let pairs = write_pairs(&dir, 8);
    let cases = [
        ("rl = \"reinforce\"", "preference", "rl"),
        ("rl = \"ppo\"", "preference", "datasets.type"),
        ("rl = \"kto\"", "preference", "datasets.type"),
        ("beta = 0.1", "chat", "beta"),
        ("rl = \"dpo\"\nloss_type = [\"sigmoid\", \"ipo\"]\nloss_weights = [1.0]", "preference", "loss_weights"),
        ("rl = \"dpo\"\nloss_type = \"nope\"", "preference", "loss_type"),
        ("rl = \"orpo\"\nloss_type = \"ipo\"", "preference", "loss_type"),
        ("rl = \"dpo\"\nbeta = -1.0", "preference", "beta"),
        ("rl = \"simpo\"\nprecompute_ref_log_probs = true", "preference", "precompute_ref_log_probs"),
        ("", "preference", "rl"),
    ];
    for (head, format, key) in cases {
        let cfg = write_config(&dir, &pairs, format, head, LORA);
        let (ok, _, err) = temper(&["train", cfg.to_str().unwrap()]);
        assert!(!ok && err.contains(&format!("`{key}`")), "{head}: {err}");
    }
    // KTO needs two items per micro-batch for its KL reference point.
    let cfg = write_config(&dir, &write_kto(&dir, 8), "kto", "rl = \"kto\"", LORA);
    let text = std::fs::read_to_string(&cfg).unwrap().replace("micro_batch_size = 4", "micro_batch_size = 1");
    std::fs::write(&cfg, text).unwrap();
    let (ok, _, err) = temper(&["train", cfg.to_str().unwrap()]);
    assert!(!ok && err.contains("micro_batch_size"), "{err}");
    // A record without its rejected reply names its line.
    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n{\"prompt\": \"a\", \"chosen\": \"b\"}\n").unwrap();
    let cfg = write_config(&dir, &bad, "preference", "rl = \"dpo\"", LORA);
    let (ok, _, err) = temper(&["train", cfg.to_str().unwrap()]);
    assert!(!ok && err.contains("bad.jsonl:2") && err.contains("`rejected`"), "{err}");
}
