#!/usr/bin/env python3
"""PyTorch + PEFT side of the GPU benchmarks (`scripts/gpu-bench.sh`): the workloads of
`temper bench --device cuda --bf16`, on the same shapes, batch and data, on the same card.

    python3 tools/bench_gpu_torch.py --workload W --shape llama-1b|smollm2|tiny [--device cuda]
        [--batch B] [--seq T] [--rank 16] [--steps 5] [--iters 20] [--new-tokens 128] [--limit N]

Workloads (one JSON object on stdout, keys as temper's):
  Token ids come from temper's generator (SplitMix64, seed 42 for training batches, 7 + row for
  prompts), so both sides see the same data.
  lora-sft   LlamaForCausalLM in bf16, SDPA attention, PEFT LoRA r, alpha 2r, dropout 0 on all
             seven projections (PEFT's default upcasts the adapter weights to f32), AdamW(lr 1e-4)
             over the adapter; loss = the model's causal-LM loss over every token. Two warm-up steps,
             then --steps timed steps. tokens_per_s, step_ms, peak_allocated_bytes
             (torch.cuda.max_memory_allocated: weights included, CUDA context not), peak_reserved_bytes.
  full-sft   every weight trained, bf16 weights, AdamW(lr 1e-5) whose states follow the weights'
             dtype (bf16): PyTorch's leanest full fine-tune, no f32 master copy.
  attention  torch.nn.functional.scaled_dot_product_attention(is_causal=True) on [B, H, T, D] bf16,
             K/V repeated to H heads outside the timing (so the flash backend applies); forward and
             backward timed separately over --iters repetitions.
  gemm       torch.matmul of two [T, T] bf16 matrices (T = --seq, default 8192): the card's dense
             GEMM ceiling in TFLOP/s.
  generate   model.generate, greedy, exactly --new-tokens tokens for --batch random 16-token prompts;
             tokens_per_s counts all rows.
  max-seq    the longest batch-1 sequence for which one lora-sft step fits in memory: doubling
             from --seq, then bisection in steps of 256 (as temper's max-seq probes).

With --device cpu the same code runs in f32 on the CPU (peak = VmHWM): a smoke test of this
script on a machine without a GPU, not a comparison anyone should quote.
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sft_torch import SHAPES as SFT_SHAPES, TARGET_MODULES  # noqa: E402
from bench_torch import build_llama  # noqa: E402

SHAPES = dict(SFT_SHAPES)
SHAPES["llama-1b"] = dict(
    config=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=32000, tie_word_embeddings=False,
                rope_theta=10000.0, max_position_embeddings=131072),
    batch=1, seq=2048,
)
PROMPT_TOKENS = 16
WARMUP_STEPS = 2


class Dev:
    """The device, its dtype, and how to synchronise and read peak memory on it."""

    def __init__(self, name):
        self.name = name
        self.cuda = name.startswith("cuda")
        self.dtype = torch.bfloat16 if self.cuda else torch.float32

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak(self):
        if self.cuda:
            return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    b = int(line.split()[1]) * 1024
                    return b, b
        return 0, 0


def model_for(shape, dev):
    cfg = dict(SHAPES[shape]["config"])
    with torch.device(dev.name):
        model = build_llama(cfg, "sdpa")
    return model.to(dev.dtype)


def lora(model, rank):
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGET_MODULES,
                     bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


MASK64 = (1 << 64) - 1


def token_ids(n, vocab, seed):
    """temper's `bench::token_ids`: SplitMix64 from `seed`, each id = next_u64() % vocab, so both
    sides train on the same tokens (and generate from the same prompts)."""
    state, out = seed & MASK64, []
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        out.append((z ^ (z >> 31)) % vocab)
    return out


def batch_ids(model, batch, seq, dev):
    ids = token_ids(batch * seq, model.config.vocab_size, 42)
    return torch.tensor(ids, dtype=torch.long).view(batch, seq).to(dev.name)


def trainer(model, lr):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def step(ids):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    return step


def time_steps(step, ids, steps, dev):
    for _ in range(WARMUP_STEPS):
        step(ids)
    dev.sync()
    t0 = time.perf_counter()
    loss = None
    for _ in range(steps):
        loss = step(ids)
    dev.sync()
    elapsed = time.perf_counter() - t0
    return elapsed, float(loss.detach())


def sft(args, dev, full):
    dev.reset_peak()
    model = model_for(args.shape, dev)
    if full:
        step = trainer(model, 1e-5)
    else:
        model = lora(model, args.rank)
        step = trainer(model, 1e-4)
    ids = batch_ids(model, args.batch, args.seq, dev)
    elapsed, loss = time_steps(step, ids, args.steps, dev)
    alloc, reserved = dev.peak()
    return dict(tokens_per_s=args.batch * args.seq * args.steps / elapsed, step_ms=1e3 * elapsed / args.steps,
                peak_allocated_bytes=alloc, peak_reserved_bytes=reserved, final_loss=loss,
                trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad))


def timed(fn, iters, dev):
    fn()
    dev.sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    dev.sync()
    return 1e3 * (time.perf_counter() - t0) / iters


def attention(args, dev):
    c = SHAPES[args.shape]["config"]
    h, kv, d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    b, s = args.batch, args.seq
    g = torch.Generator(device=dev.name).manual_seed(3)
    q = torch.randn(b, h, s, d, generator=g, device=dev.name, dtype=dev.dtype, requires_grad=True)
    k = torch.randn(b, kv, s, d, generator=g, device=dev.name, dtype=dev.dtype)
    v = torch.randn(b, kv, s, d, generator=g, device=dev.name, dtype=dev.dtype)
    k = k.repeat_interleave(h // kv, dim=1).requires_grad_(True)
    v = v.repeat_interleave(h // kv, dim=1).requires_grad_(True)
    d_out = torch.randn(b, h, s, d, generator=g, device=dev.name, dtype=dev.dtype)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():
        fwd_ms = timed(lambda: sdpa(q, k, v, is_causal=True), args.iters, dev)

    def fwd_bwd():
        out = sdpa(q, k, v, is_causal=True)
        torch.autograd.grad(out, (q, k, v), d_out)

    both_ms = timed(fwd_bwd, args.iters, dev)
    fwd_flops = 4.0 * b * h * s * s * d / 2.0
    bwd_ms = max(both_ms - fwd_ms, 1e-9)
    return dict(batch=b, seq=s, heads=h, kv_heads=kv, head_dim=d, causal=True, fwd_ms=fwd_ms, bwd_ms=bwd_ms,
                fwd_tflops=fwd_flops / (fwd_ms * 1e-3) / 1e12, fwd_bwd_tflops=3.5 * fwd_flops / (both_ms * 1e-3) / 1e12)


def gemm(args, dev):
    n = args.seq
    g = torch.Generator(device=dev.name).manual_seed(5)
    a = torch.randn(n, n, generator=g, device=dev.name, dtype=dev.dtype)
    b = torch.randn(n, n, generator=g, device=dev.name, dtype=dev.dtype)
    ms = timed(lambda: torch.matmul(a, b), args.iters, dev)
    return dict(n=n, tflops=2.0 * n ** 3 / (ms * 1e-3) / 1e12)


def generate(args, dev):
    model = model_for(args.shape, dev).eval()
    rows = [token_ids(PROMPT_TOKENS, model.config.vocab_size, 7 + r) for r in range(args.batch)]
    ids = torch.tensor(rows, dtype=torch.long).to(dev.name)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        model.generate(ids[:1], max_new_tokens=4, min_new_tokens=4, **kw)
        dev.sync()
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **kw)
        dev.sync()
    n = (out.shape[1] - PROMPT_TOKENS) * out.shape[0]
    return dict(batch=args.batch, new_tokens=args.new_tokens, tokens_per_s=n / (time.perf_counter() - t0))


def max_seq(args, dev):
    model = lora(model_for(args.shape, dev), args.rank)
    step = trainer(model, 1e-4)

    def fits(s):
        try:
            step(batch_ids(model, 1, s, dev))
            dev.sync()
            return True
        except torch.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            if dev.cuda:
                torch.cuda.empty_cache()
            return False

    step_size, lo, hi, s = 256, 0, None, max(args.seq, 256)
    while s <= args.limit:
        if fits(s):
            lo, s = s, s * 2
        else:
            hi = s
            break
    if lo:
        a, b = lo, min(hi if hi is not None else args.limit + step_size, args.limit + step_size)
        while b - a > step_size:
            mid = (a + b) // 2 // step_size * step_size
            if mid <= a:
                break
            if fits(mid):
                a = mid
            else:
                b = hi = mid
        lo = a
    return dict(rank=args.rank, limit=args.limit, max_seq=lo, first_failed_seq=hi)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", required=True, choices=["lora-sft", "full-sft", "attention", "gemm", "generate", "max-seq"])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--limit", type=int, default=65536)
    args = ap.parse_args()
    dev = Dev(args.device)
    if dev.cuda and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    if args.seq is None:
        args.seq = 8192 if args.workload == "gemm" else SHAPES[args.shape]["seq"]
    if args.batch is None:
        args.batch = max(1, 8192 // args.seq) if args.workload == "attention" else (1 if args.workload == "generate" else SHAPES[args.shape]["batch"])
    run = {"lora-sft": lambda: sft(args, dev, False), "full-sft": lambda: sft(args, dev, True), "attention": lambda: attention(args, dev),
           "gemm": lambda: gemm(args, dev), "generate": lambda: generate(args, dev), "max-seq": lambda: max_seq(args, dev)}[args.workload]
    t0 = time.perf_counter()
    out = dict(impl="pytorch+peft" if args.workload in ("lora-sft", "max-seq") else "pytorch", workload=args.workload, shape=args.shape,
               device=args.device, bf16=dev.cuda, batch=args.batch, seq=args.seq, steps=args.steps)
    out.update(run())
    out.update(elapsed_s=time.perf_counter() - t0, torch_version=torch.__version__,
               gpu=torch.cuda.get_device_name() if dev.cuda else None)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
