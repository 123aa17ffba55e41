#!/usr/bin/env bash
# temper against PyTorch + PEFT on the same card, in one call (issue 7's benchmarks). Same shapes, batch,
# data and card for both sides, each workload run back to back:
#   gemm        the card's bf16 GEMM ceiling (8192³), measured by both; MFU uses the higher one
#   attention   causal forward + backward at 2048, 4096, 8192 (llama-1b heads: 32/8 × 64) vs SDPA
#   lora        LoRA r16 on all linears, llama-1b (0.85 B, bf16) and SmolLM2's shape, seq 2048: tokens/s, peak
#   qlora       temper QLoRA (NF4 + double quant; also with gradient checkpointing) vs PyTorch's bf16 LoRA run
#   full        full fine-tune, llama-1b, seq 2048: tokens/s and MFU against the measured ceiling
#   max-seq     longest batch-1 LoRA sequence that fits, llama-1b (doubling, then bisection by 256)
#   generate    greedy, 128 new tokens, batch 1 and 32, llama-1b, vs transformers' generate
# then the FLOP/byte model of the same step with the measured ceiling as the peak, and one table.
# Needs: the temper binary (target/release/temper or its .gz), python3 with torch, transformers, peft.
# Usage: scripts/gpu-bench.sh [OUT_DIR]   (env: TEMPER_BIN, STEPS, QUICK=1 for a short run, PROFILE=1 for ncu,
#        BENCH_DEVICE=cpu BENCH_SHAPE=tiny for a smoke test of this script on a machine without a GPU)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-out}/gpu-bench}
mkdir -p "$OUT"
. scripts/gpu-env.sh
PY=${PYTHON:-python3}
DEV=${BENCH_DEVICE:-cuda}
SHAPE=${BENCH_SHAPE:-llama-1b}
SMALL=${BENCH_SMALL_SHAPE:-smollm2}
SEQ=${BENCH_SEQ:-2048}
STEPS=${STEPS:-5}
GEN_BATCH=${GEN_BATCH:-32}
LIMIT=${MAX_SEQ_LIMIT:-65536}
ATT_SEQS=${ATT_SEQS:-2048 4096 8192}
GEMM_N=${GEMM_N:-8192}
if [ "$DEV" = cpu ]; then
  T=("$BIN" bench --device cpu); BASE=f32
else
  T=("$BIN" bench --device "$DEV" --bf16); BASE=bf16
fi
P=("$PY" tools/bench_gpu_torch.py --device "$DEV")
JSONL="$OUT/bench.jsonl"
: > "$JSONL"

# run TAG TIMEOUT CMD...: one benchmark process; its JSON line is tagged and appended, failures are recorded too.
run() {
  local tag=$1 limit=$2; shift 2
  local t0=$(date +%s.%N) log="$OUT/${tag//\//-}.log"
  timeout "$limit" "$@" > "$log.out" 2> "$log"
  local rc=$?
  local line
  line=$(grep '^{' "$log.out" | tail -n 1)
  if [ $rc -eq 0 ] && [ -n "$line" ]; then
    echo "{\"tag\": \"$tag\", \"result\": $line}" >> "$JSONL"
  else
    local why
    why=$(tail -n 3 "$log" | tr '\n"\\' '  /' | cut -c1-300)
    echo "{\"tag\": \"$tag\", \"error\": \"rc=$rc: $why\"}" >> "$JSONL"
  fi
  printf '%-28s rc=%-3s %6.1f s\n' "$tag" "$rc" "$(echo "$(date +%s.%N) - $t0" | bc 2>/dev/null || echo 0)"
}

echo "== gemm ceiling"
run gemm/temper 120 "${T[@]}" --workload gemm --seq "$GEMM_N" --iters 20
run gemm/torch 120 "${P[@]}" --workload gemm --seq "$GEMM_N" --iters 20

echo "== attention forward + backward"
for s in $ATT_SEQS; do
  run "attention-$s/temper" 120 "${T[@]}" --workload attention --shape "$SHAPE" --seq "$s" --iters 10
  run "attention-$s/torch" 120 "${P[@]}" --workload attention --shape "$SHAPE" --seq "$s" --iters 10
done

echo "== LoRA / QLoRA / full SFT"
for sh in "$SHAPE" "$SMALL"; do
  run "lora-$sh/temper" 300 "${T[@]}" --workload lora-sft --shape "$sh" --quant "$BASE" --seq "$SEQ" --batch 1 --rank 16 --steps "$STEPS"
  run "lora-$sh/torch" 300 "${P[@]}" --workload lora-sft --shape "$sh" --seq "$SEQ" --batch 1 --rank 16 --steps "$STEPS"
done
run "qlora-$SHAPE/temper" 300 "${T[@]}" --workload qlora-sft --shape "$SHAPE" --quant nf4-dq --seq "$SEQ" --batch 1 --rank 16 --steps "$STEPS"
# The same QLoRA with gradient checkpointing (PyTorch's row stays the plain bf16 LoRA run).
run "qlora-ckpt-$SHAPE/temper" 300 "${T[@]}" --workload qlora-sft --shape "$SHAPE" --quant nf4-dq --seq "$SEQ" --batch 1 --rank 16 --steps "$STEPS" --checkpoint
run "full-$SHAPE/temper" 300 "${T[@]}" --workload full-sft --shape "$SHAPE" --seq "$SEQ" --batch 1 --steps "$STEPS"
run "full-$SHAPE/torch" 300 "${P[@]}" --workload full-sft --shape "$SHAPE" --seq "$SEQ" --batch 1 --steps "$STEPS"

if [ "${QUICK:-0}" != 1 ]; then
  echo "== longest LoRA sequence"
  run "max-seq-$SHAPE/temper" 300 "${T[@]}" --workload max-seq --shape "$SHAPE" --quant "$BASE" --seq "$SEQ" --limit "$LIMIT" --rank 16
  run "max-seq-$SHAPE/torch" 300 "${P[@]}" --workload max-seq --shape "$SHAPE" --seq "$SEQ" --limit "$LIMIT" --rank 16
fi

echo "== generation"
for b in 1 "$GEN_BATCH"; do
  run "generate-b$b/temper" 200 "${T[@]}" --workload generate --shape "$SHAPE" --batch "$b" --new-tokens 128
  run "generate-b$b/torch" 200 "${P[@]}" --workload generate --shape "$SHAPE" --batch "$b" --new-tokens 128
done

if [ "${PROFILE:-0}" = 1 ] && command -v ncu > /dev/null; then
  echo "== ncu: one LoRA step's kernels (summary in $OUT/ncu.txt)"
  timeout 240 ncu --print-summary per-kernel --launch-skip 2000 --launch-count 400 \
    "${T[@]}" --workload lora-sft --shape "$SHAPE" --quant "$BASE" --seq "$SEQ" --batch 1 --rank 16 --steps 1 > "$OUT/ncu.txt" 2>&1
  echo "ncu rc=$?"; tail -n 40 "$OUT/ncu.txt"
fi

echo "== summary"
"$PY" - "$OUT" "$BIN" "$SHAPE" "$SEQ" <<'PY'
import json, os, subprocess, sys
out, binary, shape, seq = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
res, errs = {}, {}
for l in open(os.path.join(out, "bench.jsonl")):
    r = json.loads(l)
    (res if "result" in r else errs)[r["tag"]] = r.get("result", r.get("error"))
card = open(os.path.join(out, "card.txt")).read().strip()
rows = []  # (what, temper, torch, ratio, goal, verdict)
def get(tag, key):
    return res.get(tag, {}).get(key)
def gib(b):
    return f"{b / 2**30:.2f} GiB" if b is not None else "-"
def row(what, t, p, ratio, goal, ok):
    rows.append((what, t, p, "-" if ratio is None else f"{ratio:.2f}x", goal, "-" if ok is None else ("PASS" if ok else "MISS")))
def pair(tag, key, fmt, goal=None, higher=True, what=None):
    t, p = get(f"{tag}/temper", key), get(f"{tag}/torch", key)
    ratio = t / p if t is not None and p else None
    ok = None if ratio is None or goal is None else (ratio >= goal if higher else ratio <= goal)
    sign = ">=" if higher else "<="
    row(what or f"{tag} {key}", fmt(t), fmt(p), ratio, f"{sign} {goal}x" if goal else "", ok)
f0 = lambda x: "-" if x is None else f"{x:,.0f}"
f2 = lambda x: "-" if x is None else f"{x:.3f}"
ceil = max([v for v in (get("gemm/temper", "tflops"), get("gemm/torch", "tflops")) if v] or [0])
pair("gemm", "tflops", f2, what=f"bf16 GEMM {get('gemm/temper', 'n') or get('gemm/torch', 'n')}^3 TFLOP/s")
for tag in sorted(k.split("/")[0] for k in res if k.startswith("attention-") and k.endswith("/temper")):
    pair(tag, "fwd_bwd_tflops", f2, 0.9, what=f"{tag} fwd+bwd TFLOP/s")
    pair(tag, "fwd_ms", f2, what=f"{tag} forward ms", higher=False)
for tag in sorted({k.split("/")[0] for k in res if k.startswith("lora-")}):
    pair(tag, "tokens_per_s", f0, 2.0, what=f"{tag} LoRA tokens/s")
    pair(tag, "peak_allocated_bytes", gib, 0.6, higher=False, what=f"{tag} LoRA peak allocated")
    pair(tag, "peak_reserved_bytes", gib, what=f"{tag} LoRA peak reserved", higher=False)
for qt in (f"qlora-{shape}", f"qlora-ckpt-{shape}"):
    q, l = res.get(f"{qt}/temper"), res.get(f"lora-{shape}/torch")
    if q and l:
        r = q["tokens_per_s"] / l["tokens_per_s"]
        row(f"{qt} tokens/s vs torch bf16 LoRA", f0(q["tokens_per_s"]), f0(l["tokens_per_s"]), r, ">= 1.5x", r >= 1.5)
        r = q["peak_allocated_bytes"] / l["peak_allocated_bytes"]
        row(f"{qt} peak vs torch bf16 LoRA", gib(q["peak_allocated_bytes"]), gib(l["peak_allocated_bytes"]), r, "<= 0.35x", r <= 0.35)
pair(f"full-{shape}", "tokens_per_s", f0, what=f"full-{shape} tokens/s")
pair(f"full-{shape}", "peak_allocated_bytes", gib, what=f"full-{shape} peak allocated", higher=False)
# MFU: model FLOPs per token (6N + attention, see src/perf_model.rs) at the measured tokens/s over the ceiling.
model = None
try:
    peak = ceil if ceil > 0 else 989.0
    # HBM bandwidth from the datasheet of the card nvidia-smi names (H200: 4.8 TB/s; else H100 SXM's 3.35).
    bw = 4800.0 if "H200" in card else 3350.0
    model = subprocess.run([binary, "bench", "--workload", "model", "--shape", shape, "--seq", seq, "--rank", "16",
                            "--batch", "1", "--peak-tflops", f"{peak:.1f}", "--bandwidth-gbs", f"{bw:.0f}"],
                           capture_output=True, text=True, timeout=60).stdout
    open(os.path.join(out, "model.txt"), "w").write(model)
except Exception as e:  # the table still prints
    print(f"(FLOP model failed: {e})")
def model_flops_per_token(mode):
    # parsed from the model report: "model FLOPs X G/step" under the mode's heading, batch 1 × seq tokens.
    if not model:
        return None
    block = model.split(mode, 1)[1] if mode in model else ""
    for line in block.splitlines():
        if "model FLOPs" in line:
            return float(line.split("model FLOPs")[1].split("G/step")[0]) * 1e9 / int(seq)
    return None
for tag, mode in ((f"full-{shape}", "full fine-tune"), (f"lora-{shape}", "LoRA (bf16 base)")):
    fpt = model_flops_per_token(mode)
    for side in ("temper", "torch"):
        tps = get(f"{tag}/{side}", "tokens_per_s")
        if fpt and tps and ceil:
            rows.append((f"{tag} MFU ({side}) vs measured ceiling {ceil:.1f} TF/s", f"{100 * fpt * tps / 1e12 / ceil:.1f}%", "", "-", "", "-"))
pair(f"max-seq-{shape}", "max_seq", f0, what=f"max-seq-{shape} longest LoRA sequence")
for tag in sorted({k.split("/")[0] for k in res if k.startswith("generate-")}):
    pair(tag, "tokens_per_s", f0, what=f"{tag} tokens/s")
for tag, e in sorted(errs.items()):
    rows.append((f"{tag} FAILED", e[:90], "", "-", "", "FAIL"))
print(f"card: {card}")
w = max(len(r[0]) for r in rows)
print(f"{'benchmark':<{w}}  {'temper':>14}  {'pytorch':>14}  {'ratio':>7}  {'goal':>9}  verdict")
for r in rows:
    print(f"{r[0]:<{w}}  {r[1]:>14}  {r[2]:>14}  {r[3]:>7}  {r[4]:>9}  {r[5]}")
json.dump({"card": card, "rows": rows}, open(os.path.join(out, "rows.json"), "w"))
if model:
    print("\n" + model)
PY
