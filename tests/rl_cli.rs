//! `temper train` with `rl = "grpo"` / `"ppo"` end to end on the tiny fixture model with the
//! character-level ChatML tokenizer: both train and log TRL's metric names (reward, per-function
//! reward, kl, clip ratios, completion lengths; PPO's objective/*), evaluate held-out prompts
//! greedily, write the adapter and the reward plot; bad configs are errors naming the key.

mod common;

use common::{fixture, scratch_dir, temper};
use std::path::{Path, PathBuf};

fn write_prompts(dir: &Path, n: usize) -> PathBuf {
    common::write_jsonl(dir, "prompts.jsonl", (0..n).map(|i| serde_json::json!({"prompt": [{"role": "user", "content": format!("say {}", i % 7)}], "answer": (i % 7).to_string()})))
}

fn write_config(dir: &Path, data: &Path, head: &str) -> PathBuf {
    let cfg = format!(
        r#"base_model = "{base}"
tokenizer = "{tok}"
sequence_len = 48
micro_batch_size = 8
max_steps = 4
learning_rate = 1e-2
val_set_size = 0.2
eval_steps = 2
output_dir = "{out}"
seed = 3
max_new_tokens = 6
{head}

[adapter]
kind = "lora"
r = 4
alpha = 8

[[datasets]]
path = "{data}"
type = "prompt"

[[rewards]]
name = "regex"
pattern = "[0-9]"
label = "digit"

[[rewards]]
name = "exact_answer"
weight = 0.5
"#,
        base = fixture("models/llama_gqa_llama3rope").display(),
        tok = fixture("tokenizers/tiny_chat").display(),
        out = dir.join("out").display(),
        data = data.display(),
    );
    let p = dir.join("train.toml");
    std::fs::write(&p, cfg).unwrap();
    p
}

fn rows(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn grpo_trains_logs_trl_metrics_and_evaluates_held_out_prompts() {
    let dir = scratch_dir("rl-grpo");
    let cfg = write_config(&dir, &write_prompts(&dir, 30), "rl = \"grpo\"\nnum_generations = 4\nbeta = 0.04\nepsilon_high = 0.28\nloss_type = \"grpo\"\neval_on_start = true\ntemperature = 1.5");
    let (ok, _, err) = temper(&["train", cfg.to_str().unwrap(), "--progress", "lines"]);
    assert!(ok, "{err}");
    let rows = rows(&dir.join("out"));
    let train: Vec<&serde_json::Value> = rows.iter().filter(|r| r.get("loss").is_some()).collect();
    assert_eq!(train.len(), 4, "{rows:?}");
    for k in ["reward", "reward_std", "rewards/digit/mean", "rewards/exact_answer/std", "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio", "entropy"] {
        assert!(train.iter().all(|r| r[k].as_f64().is_some_and(f64::is_finite)), "{k} missing: {:?}", train[0]);
    }
    // Steps whose groups had a reward spread trained: their KL and clip ratios are logged.
    let trained: Vec<&&serde_json::Value> = train.iter().filter(|r| r.get("kl").is_some()).collect();
    assert!(!trained.is_empty(), "no step trained: {rows:?}");
    for k in ["kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "loss/policy"] {
        assert!(trained.iter().all(|r| r[k].as_f64().is_some_and(f64::is_finite)), "{k} missing: {:?}", trained[0]);
    }
    // Held-out evaluation before training and at steps 2 and 4: greedy, mean reward per function.
    let evals: Vec<u64> = rows.iter().filter(|r| r.get("eval_reward").is_some()).map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(evals, vec![0, 2, 4], "{rows:?}");
    assert!(dir.join("out/adapter_model.safetensors").exists() && dir.join("out/rewards.png").exists());
    let acfg = std::fs::read_to_string(dir.join("out/adapter_config.json")).unwrap();
    assert!(acfg.contains("CAUSAL_LM"), "{acfg}");
    // The prompts as the model sees them, with the fields the rewards read.
    let (ok, stdout, err) = temper(&["data", "preview", cfg.to_str().unwrap(), "--n", "1"]);
    assert!(ok, "{err}");
    assert!(stdout.contains("<|im_start|>user\nsay 0<|im_end|>\n<|im_start|>assistant\n") && stdout.contains("\"answer\":\"0\""), "{stdout}");
}

#[test]
fn ppo_trains_a_value_head_and_logs_trl_metrics() {
    let dir = scratch_dir("rl-ppo");
    let cfg = write_config(&dir, &write_prompts(&dir, 30), "rl = \"ppo\"\nkl_coef = 0.05\nkl_estimator = \"k3\"\nnum_ppo_epochs = 2\nnum_mini_batches = 2\nmissing_eos_penalty = 1.0\nsave_steps = 2");
    let (ok, _, err) = temper(&["train", cfg.to_str().unwrap(), "--progress", "lines"]);
    assert!(ok, "{err}");
    let rows = rows(&dir.join("out"));
    let train: Vec<&serde_json::Value> = rows.iter().filter(|r| r.get("loss").is_some()).collect();
    assert!(!train.is_empty());
    for k in ["objective/kl", "objective/scores", "objective/rlhf_reward", "objective/non_score_reward", "loss/policy", "loss/value", "val/clipfrac", "reward"] {
        assert!(train.iter().all(|r| r[k].as_f64().is_some_and(f64::is_finite)), "{k} missing: {:?}", train[0]);
    }
    // Two epochs × two mini-batches: four optimizer steps per rollout batch.
    assert_eq!(train.last().unwrap()["step"].as_u64(), Some(4), "{rows:?}");
    let acfg = std::fs::read_to_string(dir.join("out/adapter_config.json")).unwrap();
    assert!(acfg.contains("CAUSAL_LM") && !acfg.contains("score"), "the value head is not a reward head: {acfg}");
    assert!(dir.join("out/value_head.safetensors").exists() && dir.join("out/checkpoint-4/value_head.safetensors").exists());
    // The run resumes from its checkpoint, value head included.
    let text = std::fs::read_to_string(&cfg).unwrap().replace("max_steps = 4", "max_steps = 8");
    std::fs::write(&cfg, text).unwrap();
    let (ok, _, err) = temper(&["train", cfg.to_str().unwrap(), "--resume", "--progress", "lines"]);
    assert!(ok, "{err}");
    assert_eq!(rows_of(&dir).iter().filter(|r| r.get("loss").is_some()).last().unwrap()["step"].as_u64(), Some(8));
}

fn rows_of(dir: &Path) -> Vec<serde_json::Value> {
    rows(&dir.join("out"))
}

#[test]
fn bad_rl_configs_name_the_key() {
    let dir = scratch_dir("rl-bad");
    let data = write_prompts(&dir, 10);
    let cases = [
        ("rl = \"grpo\"\nnum_generations = 1", "num_generations"),
        ("rl = \"ppo\"\nbeta = 0.1", "beta"),
        ("rl = \"grpo\"\nkl_coef = 0.1", "kl_coef"),
        ("rl = \"grpo\"\nloss_type = \"sigmoid\"", "loss_type"),
        ("rl = \"grpo\"\nscale_rewards = \"sometimes\"", "scale_rewards"),
        ("rl = \"grpo\"\ntemperature = 0.0", "temperature"),
        ("rl = \"dpo\"", "max_new_tokens"),
        ("", "rewards"),
    ];
    for (head, key) in cases {
        let cfg = write_config(&dir, &data, head);
        let (ok, _, err) = temper(&["train", cfg.to_str().unwrap()]);
        assert!(!ok && err.contains(key), "{head:?}: expected an error naming `{key}`, got {err}");
    }
    // An unknown reward name, and a record without the field exact_answer reads.
    let cfg = write_config(&dir, &data, "rl = \"grpo\"");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("name = \"regex\"", "name = \"regexp\"");
    std::fs::write(&cfg, text).unwrap();
    let (ok, _, err) = temper(&["train", cfg.to_str().unwrap()]);
    assert!(!ok && err.contains("rewards[0].name") && err.contains("exact_answer"), "{err}");
    let no_answer = dir.join("no_answer.jsonl");
    std::fs::write(&no_answer, "{\"prompt\": \"say 1\"}\n".repeat(10)).unwrap();
    let cfg = write_config(&dir, &no_answer, "rl = \"grpo\"");
    let (ok, _, err) = temper(&["train", cfg.to_str().unwrap()]);
    assert!(!ok && err.contains("no_answer.jsonl:") && err.contains("`answer`"), "{err}");
}
