#!/usr/bin/env bash
# LoRA DPO: `temper bench --workload dpo` against TRL's DPOTrainer + PEFT (tools/bench_dpo_torch.py),
# goals >= 2x tok/s and <= 0.5x peak RSS. Kept under this name because the docs cite it;
# tools/bench_train_compare.sh does the work (--help lists the options: --threads, --shapes,
# --steps, --batch, --seq, --rank).
exec "$(dirname "$0")/bench_train_compare.sh" --workload dpo "$@"
