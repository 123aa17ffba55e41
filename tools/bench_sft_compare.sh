#!/usr/bin/env bash
# LoRA SFT: `temper bench --workload lora-sft` against PyTorch + PEFT (tools/bench_sft_torch.py).
# Kept under this name because the docs cite it; tools/bench_train_compare.sh does the work
# (--help lists the options: --threads, --shapes, --steps, --batch, --seq, --rank).
exec "$(dirname "$0")/bench_train_compare.sh" --workload lora-sft "$@"
