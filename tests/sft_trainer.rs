//! The SFT loop: gradient accumulation equals one big batch, checkpoints resume bit-identically,
//! a non-finite loss stops the run with the last checkpoint intact, old checkpoints are pruned.

mod common;

use common::{fixture, scratch_dir};
use temper::adapters::{Lora, Targets};
use temper::loss::ce;
use temper::models::{ForwardInput, Llama};
use temper::optim::AdamW;
use temper::train::sft::{self, MemoryLogger, SftOptions};
use temper::train::{Batch, Schedule, ScheduleKind, Trainer};
use temper::{DType, Device, ModuleExt, Tensor};

fn model() -> Llama<Lora> {
    let base = Llama::load(&fixture("models/llama_gqa_llama3rope"), DType::F32).unwrap();
    base.with_adapter("default", &Lora::config(4, 8.0).with(|h| h.lora_dropout = 0.1).targets(Targets::AllLinear).seed(9)).unwrap()
}

/// Rows of different lengths, right-padded, with some labels masked.
fn batch(rows: &[(u64, usize)], width: usize) -> Batch {
    let (mut ids, mut mask, mut labels) = (vec![], vec![], vec![]);
    for &(seed, len) in rows {
        let mut r = temper::rng::Rng::new(seed);
        for t in 0..width {
            let real = t < len;
            let id = if real { 3 + r.below(120) as i64 } else { 0 };
            ids.push(id);
            mask.push(real as i64);
            labels.push(if real && t >= 2 { id } else { -100 });
        }
    }
    let shape = [rows.len(), width];
    Batch {
        input: ForwardInput { input_ids: Tensor::from_vec(ids, &shape, Device::Cpu).unwrap(), attention_mask: Some(Tensor::from_vec(mask, &shape, Device::Cpu).unwrap()), position_ids: None, segment_ids: None },
        labels: Tensor::from_vec(labels, &shape, Device::Cpu).unwrap(),
    }
}

#[test]
fn accumulation_over_micro_batches_equals_one_big_batch() {
    let rows = [(1, 9), (2, 5), (3, 12), (4, 7)];
    let mut one = Trainer::new(model(), ce(), AdamW::lr(1e-2));
    one.model.training = false; // no dropout, so both see the same function
    let mut acc = Trainer::new(model(), ce(), AdamW::lr(1e-2));
    acc.model.training = false;
    let a = one.step_accumulated(&[batch(&rows, 12)], Some(1e-2), None).unwrap();
    let b = acc.step_accumulated(&[batch(&rows[..1], 9), batch(&rows[1..], 12)], Some(1e-2), None).unwrap();
    assert_eq!(a.trained_tokens, b.trained_tokens);
    assert!((a.loss - b.loss).abs() < 1e-6, "{} vs {}", a.loss, b.loss);
    assert!((a.grad_norm - b.grad_norm).abs() < 1e-5 * a.grad_norm, "{} vs {}", a.grad_norm, b.grad_norm);
    // After the update the two models are the same.
    for ((n, x), (_, y)) in one.model.trainable_parameters().iter().zip(acc.model.trainable_parameters()) {
        let (x, y) = (x.to_vec::<f32>().unwrap(), y.to_vec::<f32>().unwrap());
        assert!(x.iter().zip(&y).all(|(a, b)| (a - b).abs() < 1e-6), "{n}");
    }
}

fn opts(dir: &std::path::Path, total: u64, resume: bool) -> SftOptions {
    SftOptions {
        output_dir: dir.into(),
        gradient_accumulation_steps: 2,
        total_steps: total,
        schedule: Schedule { kind: ScheduleKind::Cosine, peak_lr: 5e-3, warmup_steps: 2, total_steps: total },
        max_grad_norm: Some(1.0),
        logging_steps: 1,
        eval_steps: Some(3),
        save_steps: Some(3),
        save_total_limit: 2,
        adapter: Some("default".into()),
        base_model: Some("tests/fixtures/models/llama_gqa_llama3rope".into()),
        seed: 7,
        resume,
        eval_on_start: false,
    }
}

/// Three micro-batches per epoch, reshuffled per epoch from the seed.
fn epochs(e: u64) -> temper::Result<Vec<Batch>> {
    let mut order = vec![0u64, 1, 2];
    let mut r = temper::rng::Rng::new(100 + e);
    for i in (1..order.len()).rev() {
        order.swap(i, r.below(i as u64 + 1) as usize);
    }
    Ok(order.into_iter().map(|k| batch(&[(10 + k, 8), (20 + k, 11)], 11)).collect())
}

#[test]
fn an_interrupted_and_resumed_run_gives_the_same_losses() {
    let eval = vec![batch(&[(50, 10)], 10)];
    let straight = scratch_dir("sft-straight");
    let mut t = Trainer::new(model(), ce(), AdamW::lr(5e-3));
    let mut log = MemoryLogger::default();
    let full = sft::run(&mut t, &epochs, &eval, None, &opts(&straight, 8, false), &mut log).unwrap();
    assert_eq!(full.steps, 8);
    assert_eq!(log.eval.len(), 3, "evals at steps 3, 6 and the end");
    // The same run stopped after 6 steps (checkpoint-6 written), then resumed in a fresh trainer.
    let split = scratch_dir("sft-resumed");
    let mut t1 = Trainer::new(model(), ce(), AdamW::lr(5e-3));
    let first = sft::run(&mut t1, &epochs, &eval, None, &opts(&split, 8, false).with_total(6), &mut MemoryLogger::default()).unwrap();
    let mut t2 = Trainer::new(model(), ce(), AdamW::lr(5e-3));
    let second = sft::run(&mut t2, &epochs, &eval, None, &opts(&split, 8, true), &mut MemoryLogger::default()).unwrap();
    assert_eq!(second.resumed_from, Some(6));
    let joined: Vec<f64> = first.losses.iter().chain(&second.losses).copied().collect();
    assert_eq!(joined, full.losses, "bit-identical losses after resume");
    // Only the last two checkpoints are kept; the final adapter sits at the top of output_dir.
    let kept: Vec<u64> = temper::train::checkpoint::list(&straight).unwrap().into_iter().map(|(n, _)| n).collect();
    assert_eq!(kept, [3, 6]);
    assert!(straight.join("adapter_model.safetensors").exists() && straight.join("adapter_config.json").exists());
    assert!(!std::fs::read_dir(&straight).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().ends_with(".tmp")));
}

#[test]
fn a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint() {
    let dir = scratch_dir("sft-nan");
    let mut t = Trainer::new(model(), ce(), AdamW::lr(5e-3));
    let o = SftOptions { schedule: Schedule { kind: ScheduleKind::Constant, peak_lr: 1e30, warmup_steps: 0, total_steps: 12 }, max_grad_norm: None, total_steps: 12, ..opts(&dir, 12, false) };
    // An absurd learning rate blows the weights up within a few steps.
    let e = sft::run(&mut t, &epochs, &[], None, &o, &mut MemoryLogger::default()).unwrap_err().to_string();
    assert!(e.contains("stopping before the update"), "{e}");
    if e.contains("checkpoint-") {
        let ck = temper::train::checkpoint::list(&dir).unwrap();
        assert!(!ck.is_empty() && ck.iter().all(|(_, d)| d.join("adapter_model.safetensors").exists()));
    } else {
        assert!(e.contains("no checkpoint was written yet"), "{e}");
    }
}

trait WithTotal {
    fn with_total(self, n: u64) -> Self;
}
impl WithTotal for SftOptions {
    /// Stops after `n` steps while keeping the schedule of the full run.
    fn with_total(self, n: u64) -> Self {
        SftOptions { total_steps: n, ..self }
    }
}

#[test]
fn a_checkpoint_that_cannot_be_written_stops_the_run_and_keeps_the_earlier_one() {
    let dir = scratch_dir("sft-ckpt-fail");
    // Something in the way of checkpoint-6's temporary folder, as a full disk or a permission
    // problem would be: the write fails there.
    std::fs::write(dir.join("checkpoint-6.tmp"), "in the way").unwrap();
    let mut t = Trainer::new(model(), ce(), AdamW::lr(5e-3));
    let e = sft::run(&mut t, &epochs, &[], None, &opts(&dir, 8, false), &mut MemoryLogger::default()).unwrap_err().to_string();
    assert!(e.contains("checkpoint-6.tmp"), "{e}");
    let kept = temper::train::checkpoint::list(&dir).unwrap();
    assert_eq!(kept.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [3]);
    // The surviving checkpoint resumes.
    std::fs::remove_file(dir.join("checkpoint-6.tmp")).unwrap();
    let mut t2 = Trainer::new(model(), ce(), AdamW::lr(5e-3));
    let s = sft::run(&mut t2, &epochs, &[], None, &opts(&dir, 8, true), &mut MemoryLogger::default()).unwrap();
    assert_eq!((s.resumed_from, s.steps), (Some(3), 8));
}
