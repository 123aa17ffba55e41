#!/usr/bin/env bash
# LoRA GRPO: `temper bench --workload grpo` against TRL's GRPOTrainer + PEFT (tools/bench_grpo_torch.py),
# goal >= 3x step tok/s; the table also shows both sides' rollout tok/s. tools/bench_train_compare.sh
# does the work (--help lists the options: --threads, --shapes, --steps, --batch (prompts), --seq
# (prompt tokens), --rank, --num-generations, --new-tokens; defaults 4 x 32, G 4 x 32, rank 16, 3 steps).
exec "$(dirname "$0")/bench_train_compare.sh" --workload grpo "$@"
