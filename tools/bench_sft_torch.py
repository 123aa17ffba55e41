#!/usr/bin/env python3
"""PyTorch + PEFT (CPU) side of `temper bench --workload lora-sft`: LoRA training steps on a
random-init LlamaForCausalLM.

    /work/venv/bin/python tools/bench_sft_torch.py --shape tiny|smollm2 [--threads 2] [--steps 5]
        [--batch B] [--seq T] [--rank 8]

Prints one JSON object on stdout:
  {"impl": "pytorch+peft", "shape": ..., "threads": N, "batch": B, "seq": T, "rank": R,
   "tokens_per_s": X, "step_ms": Y, "peak_rss_mb": Z, "import_rss_mb": I, "steps": S, "warmup_steps": 2,
   "trainable_params": P, "total_params": Q, "torch_version": ..., "peft_version": ...,
   "elapsed_s": E, "final_loss": L, "omp_wait_policy": ..., "load_avg_1m": ...}

Model: float32 LlamaForCausalLM from a config (see SHAPES), random weights (seed 0), eager
attention. PEFT LoRA with r = --rank, lora_alpha = 2 * rank, dropout 0, on all seven
projections (q, k, v, o, gate, up, down); the base weights are frozen.

One step = forward on a random token batch [B, T] with labels = input ids (causal LM cross
entropy over every next-token position, i.e. T - 1 per row), loss.backward(),
AdamW(lr 1e-4) over the trainable (LoRA) parameters only, zero_grad(). Two warm-up steps
(they also allocate the optimizer state), then --steps timed steps on the same batch.
tokens/s = B * T * steps / elapsed; step_ms = elapsed / steps.
peak_rss_mb: VmHWM of /proc/self/status read after the run, in MiB (run one process per
shape; the whole process counts, Python and libraries included). import_rss_mb is the same
reading taken after the imports, before the model is built: the interpreter + torch +
transformers + peft floor (several hundred MiB with a CUDA-enabled torch build).

PyTorch's OpenMP threads busy-wait by default; on a shared 2-core machine --threads 2 can
then run many times slower than it should. Run with OMP_WAIT_POLICY=PASSIVE (the compare
script, tools/bench_sft_compare.sh, sets it by default); the policy in effect is reported.
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_torch import build_llama  # noqa: E402  (one model builder for both baselines)

try:
    import peft
    from peft import LoraConfig, get_peft_model
except ImportError:  # pragma: no cover - reported as a clear failure below
    peft = None

SHAPES = {
    "tiny": dict(
        config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=False,
                    rope_theta=10000.0, max_position_embeddings=2048),
        batch=8, seq=128,
    ),
    "smollm2": dict(
        config=dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                    rope_theta=100000.0, max_position_embeddings=8192),
        batch=1, seq=256,
    ),
}
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WARMUP_STEPS = 2


def build_model(shape):
    return build_llama(SHAPES[shape]["config"], "eager")


def wrap_lora(model, rank):
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGET_MODULES,
                     bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def peak_rss_mb():
    """VmHWM (peak resident set size) of this process in MiB, or None where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # the value is in kB
    except OSError:
        pass
    return None


def bench(model, batch, seq, steps):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=g)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    for _ in range(WARMUP_STEPS):
        step()
    t0 = time.perf_counter()
    loss = None
    for _ in range(steps):
        loss = step()
    elapsed = time.perf_counter() - t0
    return elapsed, loss


def main():
    ap = argparse.ArgumentParser(description="PyTorch + PEFT CPU baseline for temper bench --workload lora-sft")
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=None, help="default: per shape (tiny 8, smollm2 1)")
    ap.add_argument("--seq", type=int, default=None, help="default: per shape (tiny 128, smollm2 256)")
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()
    if peft is None:
        print("error: the peft package is not installed in this Python", file=sys.stderr)
        return 2
    batch = args.batch or SHAPES[args.shape]["batch"]
    seq = args.seq or SHAPES[args.shape]["seq"]
    if min(batch, seq, args.steps, args.rank, args.threads) < 1 or seq < 2:
        print("error: --batch, --steps, --rank and --threads must be >= 1, --seq >= 2", file=sys.stderr)
        return 2

    torch.set_num_threads(args.threads)
    import_rss = peak_rss_mb()  # torch + transformers + peft imported, no model yet
    model = wrap_lora(build_model(args.shape), args.rank)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    elapsed, loss = bench(model, batch, seq, args.steps)
    rss = peak_rss_mb()
    print(json.dumps({
        "impl": "pytorch+peft",
        "shape": args.shape,
        "threads": args.threads,
        "batch": batch,
        "seq": seq,
        "rank": args.rank,
        "tokens_per_s": round(batch * seq * args.steps / elapsed, 3),
        "step_ms": round(elapsed / args.steps * 1000.0, 3),
        "peak_rss_mb": round(rss, 1) if rss is not None else None,
        "import_rss_mb": round(import_rss, 1) if import_rss is not None else None,
        "steps": args.steps,
        "warmup_steps": WARMUP_STEPS,
        "trainable_params": trainable,
        "total_params": total,
        "torch_version": torch.__version__,
        "peft_version": peft.__version__,
        "elapsed_s": round(elapsed, 4),
        "final_loss": round(loss, 5),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "load_avg_1m": os.getloadavg()[0],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
