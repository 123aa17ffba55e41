#!/usr/bin/env python3
"""TRL (PyTorch + PEFT, CPU) side of `temper bench --workload dpo`: LoRA DPO training steps on a
random-init LlamaForCausalLM, through TRL's own DPOTrainer.

    /work/venv/bin/python tools/bench_dpo_torch.py --shape tiny|smollm2 [--threads 2] [--steps 5]
        [--batch B] [--seq T] [--rank 8]

Prints one JSON object on stdout:
  {"impl": "trl", "workload": "dpo", "shape": ..., "threads": N, "batch": B, "seq": T, "rank": R,
   "steps": S, "tokens_per_s": X, "step_ms": Y, "cpu_ms_per_step": C, "peak_rss_mb": Z,
   "import_rss_mb": I, "final_loss": L, "first_loss": L0, "trl_version": ..., "torch_version": ...,
   ...}

Model: the shapes of tools/bench_sft_torch.py (float32 LlamaForCausalLM from a config, random
weights, seed 0, eager attention). The base model and a LoraConfig (r = --rank, lora_alpha =
2 * rank, dropout 0, all seven projections q, k, v, o, gate, up, down) are handed to
trl.DPOTrainer, which wraps the model with PEFT itself; with ref_model=None the reference is
then the base with the adapter disabled (TRL's `use_adapter(model, None)`). Handing TRL an
already-wrapped PeftModel instead would make it add a second, "ref" adapter copy (TRL 1.16 with
peft >= 0.20), whose LoRA matmuls the reference forward would also pay for.
DPOConfig: loss_type sigmoid, beta 0.1, precompute_ref_log_probs False, max_length None (no
truncation), optim = transformers' default AdamW (adamw_torch_fused on torch >= 2.8), lr 1e-4,
constant schedule, weight decay 0, no gradient clipping (max_grad_norm 0), float32.

Data: B preference pairs, token ids drawn uniformly from [3, vocab) with a fixed seed: a prompt
of T/2 ids and a chosen and a rejected completion of T - T/2 ids each, no EOS appended. TRL 1.16
only accepts text datasets (its _prepare_dataset always extracts the prompt, appends EOS and
tokenizes), so the trainer here is a subclass whose _prepare_dataset returns the dataset as is:
it already holds the columns the tokenization would have produced (prompt_ids, chosen_ids,
rejected_ids). TRL's own dataloader and DataCollatorForPreference turn it into one batch of 2B
rows [chosen..., rejected...] of T tokens (input_ids, attention_mask, completion_mask), built
once, before any timing, and reused for every step. The tokenizer is a 4-word WordLevel one that
only supplies the pad token (id 0, as in the model config).

One step = what one optimizer step of DPOTrainer.train() runs, minus data loading, gradient
clipping and logging: trainer.training_step(model, batch) (policy forward on the 2B sequences
with grad, reference forward with the adapter disabled under no_grad, TRL's fused LM head that
projects only the completion positions, sigmoid DPO loss and metrics, backward), then
optimizer.step(), lr_scheduler.step(), model.zero_grad(). Two warm-up steps (they also allocate
the optimizer state), then --steps timed steps. step_ms = wall time / steps; tokens/s = 2·B·T /
seconds per step (the policy's tokens; the reference forward over the same tokens is part of the
step); cpu_ms_per_step = process CPU time (all threads) / steps. first_loss is the loss of the
first warm-up step: ln 2 = 0.6931 since LoRA B = 0 makes the policy equal the reference.
peak_rss_mb: VmHWM of /proc/self/status after the run, in MiB; import_rss_mb the same reading
after the imports (torch + transformers + peft + trl + datasets), before the model is built.

Run with OMP_WAIT_POLICY=PASSIVE on a shared machine (tools/bench_dpo_compare.sh sets it by
default); see tools/bench_sft_torch.py.
"""

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# One definition of the shapes, the model builder, the LoRA targets and the RSS reading for the
# SFT and DPO baselines.
from bench_sft_torch import SHAPES, TARGET_MODULES, build_model, peak_rss_mb  # noqa: E402

try:
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer
except ImportError as e:  # pragma: no cover - reported as a clear failure below
    trl = None
    IMPORT_ERROR = e

# Per-shape defaults of this workload (pairs per step, tokens per sequence); the model configs
# are bench_sft_torch.py's.
DEFAULTS = {"tiny": dict(batch=4, seq=128), "smollm2": dict(batch=1, seq=256)}
WARMUP_STEPS = 2

if trl is not None:

    class PretokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer fed token ids: the dataset already has the prompt_ids / chosen_ids /
        rejected_ids columns that DPOTrainer._prepare_dataset would tokenize text into, so that
        step (prompt extraction, EOS appending, tokenization) is skipped."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            missing = {"prompt_ids", "chosen_ids", "rejected_ids"} - set(dataset.column_names)
            if missing:
                raise ValueError(f"pre-tokenized dataset lacks {sorted(missing)}")
            return dataset


def pad_tokenizer():
    """A minimal fast tokenizer: TRL needs one for the pad token id (0, the model's pad_token_id)."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def preference_dataset(pairs, seq, vocab_size):
    g = torch.Generator().manual_seed(1)
    prompt_len = seq // 2
    completion_len = seq - prompt_len
    rows = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for _ in range(pairs):
        rows["prompt_ids"].append(torch.randint(3, vocab_size, (prompt_len,), generator=g).tolist())
        rows["chosen_ids"].append(torch.randint(3, vocab_size, (completion_len,), generator=g).tolist())
        rows["rejected_ids"].append(torch.randint(3, vocab_size, (completion_len,), generator=g).tolist())
    return Dataset.from_dict(rows)


def build_trainer(shape, pairs, seq, rank, out_dir):
    model = build_model(shape)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGET_MODULES,
                      bias="none", task_type="CAUSAL_LM")
    args = DPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=pairs,
        gradient_accumulation_steps=1,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        beta=0.1,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=False,
        max_length=None,
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = PretokenizedDPOTrainer(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=preference_dataset(pairs, seq, model.config.vocab_size),
        processing_class=pad_tokenizer(),
        peft_config=lora,
    )
    assert trainer.ref_model is None and "ref" not in trainer.model.peft_config
    return trainer


def bench(trainer, pairs, seq, steps):
    total = WARMUP_STEPS + steps
    trainer.create_optimizer_and_scheduler(num_training_steps=total)
    # Set by Trainer.train()'s loop before each training_step; one micro-batch per step here.
    trainer.current_gradient_accumulation_steps = 1
    model = trainer.model
    opt, sched = trainer.optimizer, trainer.lr_scheduler
    # One collated batch through TRL's own dataloader + DataCollatorForPreference, built untimed.
    batch = next(iter(trainer.get_train_dataloader()))
    assert tuple(batch["input_ids"].shape) == (2 * pairs, seq), batch["input_ids"].shape
    assert int(batch["completion_mask"].sum()) == 2 * pairs * (seq - seq // 2)

    def step():
        loss = trainer.training_step(model, batch)
        opt.step()
        sched.step()
        model.zero_grad()
        return loss.item()

    first_loss = None
    for i in range(WARMUP_STEPS):
        loss = step()
        if i == 0:
            first_loss = loss
    c0 = time.process_time()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    return elapsed, cpu, first_loss, loss


def main():
    ap = argparse.ArgumentParser(description="TRL DPOTrainer + PEFT LoRA CPU baseline for temper bench --workload dpo")
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=None, help="preference pairs per step; default: tiny 4, smollm2 1")
    ap.add_argument("--seq", type=int, default=None,
                    help="tokens per sequence (prompt seq/2 + completion); default: tiny 128, smollm2 256")
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()
    if trl is None:
        print(f"error: trl / peft / datasets not importable in this Python: {IMPORT_ERROR}", file=sys.stderr)
        return 2
    batch = args.batch or DEFAULTS[args.shape]["batch"]
    seq = args.seq or DEFAULTS[args.shape]["seq"]
    if min(batch, args.steps, args.rank, args.threads) < 1 or seq < 2:
        print("error: --batch, --steps, --rank and --threads must be >= 1, --seq >= 2", file=sys.stderr)
        return 2

    torch.set_num_threads(args.threads)
    # Keep stdout to the one JSON line: TRL / transformers warnings go to stderr, the chatty ones off.
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import_rss = peak_rss_mb()  # torch + transformers + peft + trl + datasets imported, no model yet
    with tempfile.TemporaryDirectory(prefix="bench_dpo_") as out_dir:
        trainer = build_trainer(args.shape, batch, seq, args.rank, out_dir)
        model = trainer.model
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        elapsed, cpu, first_loss, loss = bench(trainer, batch, seq, args.steps)
    rss = peak_rss_mb()
    step_s = elapsed / args.steps
    import peft
    print(json.dumps({
        "impl": "trl",
        "workload": "dpo",
        "shape": args.shape,
        "threads": args.threads,
        "batch": batch,
        "seq": seq,
        "rank": args.rank,
        "steps": args.steps,
        "tokens_per_s": round(2 * batch * seq / step_s, 3),
        "step_ms": round(step_s * 1000.0, 3),
        "cpu_ms_per_step": round(cpu / args.steps * 1000.0, 3),
        "peak_rss_mb": round(rss, 1) if rss is not None else None,
        "import_rss_mb": round(import_rss, 1) if import_rss is not None else None,
        "final_loss": round(loss, 5),
        "first_loss": round(first_loss, 5),
        "warmup_steps": WARMUP_STEPS,
        "prompt_len": seq // 2,
        "completion_len": seq - seq // 2,
        "beta": 0.1,
        "loss_type": "sigmoid",
        "optim": str(trainer.args.optim.value if hasattr(trainer.args.optim, "value") else trainer.args.optim),
        "trainable_params": trainable,
        "total_params": total,
        "trl_version": trl.__version__,
        "torch_version": torch.__version__,
        "peft_version": peft.__version__,
        "elapsed_s": round(elapsed, 4),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "load_avg_1m": os.getloadavg()[0],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
