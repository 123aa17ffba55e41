//! `temper bench`'s GPU-benchmark workloads run on the CPU too (tiny shape), so the code paths the
//! GPU script (`scripts/gpu-bench.sh`) drives are exercised without a GPU; their numbers here are
//! only checked for sanity, never for speed.

use std::process::Command;

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_temper")).arg("bench").args(args).output().expect("running temper bench")
}

fn json(args: &[&str]) -> serde_json::Value {
    let out = bench(args);
    assert!(out.status.success(), "temper bench {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("temper bench {args:?}: not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn training_workloads_report_throughput_memory_and_a_finite_loss() {
    for w in ["full-sft", "lora-sft"] {
        let j = json(&["--workload", w, "--shape", "tiny", "--steps", "1", "--seq", "32", "--batch", "2"]);
        assert!(j["tokens_per_s"].as_f64().unwrap() > 0.0, "{w}: {j}");
        assert!(j["peak_allocated_bytes"].as_u64().unwrap() > 0, "{w}: {j}");
        assert_eq!(j["seq"], 32, "{w}: {j}");
    }
    let j = json(&["--workload", "full-sft", "--shape", "tiny", "--steps", "1", "--seq", "32", "--batch", "2"]);
    let loss = j["final_loss"].as_f64().unwrap();
    // A random-init model's loss sits near ln(vocab) = ln 512 ≈ 6.24.
    assert!((loss - 512f64.ln()).abs() < 0.5, "{j}");
}

#[test]
fn attention_gemm_and_generation_workloads_run_on_the_cpu() {
    let j = json(&["--workload", "attention", "--shape", "tiny", "--seq", "64", "--batch", "2", "--iters", "2"]);
    assert_eq!((j["heads"].as_u64(), j["kv_heads"].as_u64(), j["head_dim"].as_u64()), (Some(4), Some(2), Some(16)));
    assert!(j["fwd_ms"].as_f64().unwrap() > 0.0 && j["bwd_ms"].as_f64().unwrap() > 0.0, "{j}");
    let j = json(&["--workload", "gemm", "--seq", "96", "--iters", "2"]);
    assert!(j["tflops"].as_f64().unwrap() > 0.0, "{j}");
    let j = json(&["--workload", "generate", "--shape", "tiny", "--batch", "3", "--new-tokens", "5"]);
    assert_eq!(j["batch"], 3);
    assert!(j["tokens_per_s"].as_f64().unwrap() > 0.0, "{j}");
}

#[test]
fn max_seq_probes_up_to_the_limit_when_memory_never_runs_out() {
    // On the CPU no probe fails: the search doubles 256 → 512, stops at the limit, and reports the
    // largest multiple of 256 within it.
    let j = json(&["--workload", "max-seq", "--shape", "tiny", "--seq", "256", "--limit", "700", "--rank", "4"]);
    assert_eq!(j["max_seq"], 512, "{j}");
    assert!(j["first_failed_seq"].is_null(), "{j}");
}

#[test]
fn the_flop_model_prints_every_mode_with_its_memory_plan() {
    let out = bench(&["--workload", "model", "--shape", "llama-1b", "--rank", "16", "--batch", "1"]);
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    for want in ["LoRA (bf16 base)", "QLoRA (NF4 base)", "full fine-tune", "parameters 0.853 B", "memory plan", "attention backward"] {
        assert!(s.contains(want), "missing `{want}` in:\n{s}");
    }
}

#[test]
fn bad_placements_are_refused_with_a_reason() {
    let out = bench(&["--workload", "full-sft", "--shape", "tiny", "--bf16"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--bf16 needs --device cuda"));
    let out = bench(&["--workload", "attention", "--device", "cuda:7"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CUDA") || err.contains("cuda:7"), "{err}");
    let out = bench(&["--workload", "warp-drive"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown workload `warp-drive`"));
}

#[test]
fn a_decoder_layer_saves_what_the_memory_model_says_and_no_more() {
    // The step's extra heap at 3 layers minus at 1 layer is what two layers keep for the backward
    // (measured by the binary's counting allocator). It must match the FLOP/byte model's plan
    // (f32 on the CPU) within 5%: a tensor kept by mistake (an add or scale holding its inputs'
    // values, as they did before `Tensor::edge`) shows up here as tens of percent.
    let extra = |layers: &str| {
        let j = json(&["--workload", "lora-sft", "--quant", "f32", "--shape", "tiny", "--layers", layers, "--steps", "1", "--rank", "8"]);
        (j["step_extra_bytes"].as_f64().unwrap(), j["batch"].as_u64().unwrap() * j["seq"].as_u64().unwrap())
    };
    let ((one, tokens), (three, _)) = (extra("1"), extra("3"));
    let per_layer = (three - one) / 2.0;
    let shape = temper::bench::shape("tiny").unwrap();
    let model = temper::perf_model::StepModel::new(&shape.config, 8, 128, 8);
    let predicted = model.saved_per_token_layer(temper::perf_model::Mode::LoraBf16, 4.0) * tokens as f64;
    let ratio = per_layer / predicted;
    assert!((0.95..1.05).contains(&ratio), "a layer keeps {per_layer} bytes, the model says {predicted} (ratio {ratio:.3})");
}
