#!/usr/bin/env python3
"""PyTorch (CPU) side of `temper bench`: the same workloads on a random-init LlamaForCausalLM.

    /work/venv/bin/python tools/bench_torch.py --workload train|generate --shape small|smollm2 \
        [--threads 2] [--steps 3] [--new-tokens 64]

Prints one JSON object on stdout:
  {"impl": "pytorch", "workload": ..., "shape": ..., "threads": N, "tokens_per_s": X,
   "peak_rss_bytes": Y, "steps": S, "torch_version": ..., "elapsed_s": T}

train:    one full fine-tuning step = forward with labels (= input ids), loss.backward(),
          AdamW(lr 1e-4, weight_decay 0.01).step(), zero_grad(). One warm-up step, then
          --steps timed steps; tokens/s = batch * seq * steps / elapsed.
generate: greedy decoding with KV cache, batch 1, 16 random prompt tokens, exactly
          --new-tokens new tokens (min_new_tokens = max_new_tokens). One warm-up generation,
          then one timed generation (prefill included); tokens/s = new tokens / elapsed.
          "steps" is the number of new tokens.
peak_rss_bytes: ru_maxrss of this process (run one process per workload).

PyTorch's OpenMP threads busy-wait by default; when the machine is oversubscribed (other
builds running on the 2 cores) --threads 2 can run 10x slower than --threads 1. Setting
OMP_WAIT_POLICY=PASSIVE in the environment avoids most of that; the policy in effect is
reported as "omp_wait_policy".
"""

import argparse
import json
import os
import resource
import sys
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

SHAPES = {
    "small": dict(
        config=dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=4, vocab_size=1000, tie_word_embeddings=False, rope_theta=10000.0,
                    max_position_embeddings=2048),
        batch=4, seq=256,
    ),
    "smollm2": dict(
        config=dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                    max_position_embeddings=8192),
        batch=1, seq=256,
    ),
}
PROMPT_TOKENS = 16


def build_model(shape):
    return build_llama(SHAPES[shape]["config"], "sdpa")


def build_llama(config, attn_implementation):
    """A seeded random-init float32 LlamaForCausalLM from a shape's config dict (shared with
    bench_sft_torch.py)."""
    kw = dict(config)
    theta = kw.pop("rope_theta")
    cfg = LlamaConfig(rms_norm_eps=1e-5, hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw)
    # transformers 5 keeps rope_theta in rope_parameters, transformers 4 at the top level.
    if isinstance(getattr(cfg, "rope_parameters", None), dict):
        cfg.rope_parameters["rope_theta"] = theta
    else:
        cfg.rope_theta = theta
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation)
    assert model.config.tie_word_embeddings == kw["tie_word_embeddings"]
    return model.float()


def bench_train(model, shape, steps):
    s = SHAPES[shape]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (s["batch"], s["seq"]), generator=g)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    step()  # warm-up (also allocates the optimizer state)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - t0
    return s["batch"] * s["seq"] * steps / elapsed, elapsed, steps


def bench_generate(model, new_tokens):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, model.config.vocab_size, (1, PROMPT_TOKENS), generator=g)
    mask = torch.ones_like(ids)
    model.eval()

    def run():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 pad_token_id=0, eos_token_id=2, use_cache=True)
        assert out.shape[1] == PROMPT_TOKENS + new_tokens, out.shape
        return out

    run()  # warm-up
    t0 = time.perf_counter()
    run()
    elapsed = time.perf_counter() - t0
    return new_tokens / elapsed, elapsed, new_tokens


def main():
    ap = argparse.ArgumentParser(description="PyTorch CPU baseline for temper bench")
    ap.add_argument("--workload", choices=["train", "generate"], required=True)
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    model = build_model(args.shape)
    if args.workload == "train":
        tps, elapsed, steps = bench_train(model, args.shape, args.steps)
    else:
        tps, elapsed, steps = bench_generate(model, args.new_tokens)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({
        "impl": "pytorch",
        "workload": args.workload,
        "shape": args.shape,
        "threads": args.threads,
        "tokens_per_s": round(tps, 3),
        "peak_rss_bytes": rss,
        "steps": steps,
        "torch_version": torch.__version__,
        "elapsed_s": round(elapsed, 4),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "load_avg_1m": os.getloadavg()[0],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
