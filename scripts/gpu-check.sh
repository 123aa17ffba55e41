#!/usr/bin/env bash
# The GPU proof, in one call on a machine with an NVIDIA GPU (CUDA 13 driver + toolkit, python3; no Rust and
# no network needed). The binary is built elsewhere (`cargo build --release`, then `gzip -k target/release/temper`
# to fit a transfer) and carried with the checkout, with assets/SmolLM2-135M-Instruct-6L.Q4_1.gguf (made by
# tools/slice_gguf.py: the real SmolLM2 embedding, tokenizer and first 6 layers) or the full SmolLM2 GGUF.
#
#  1. `temper gpu-check`: every kernel file compiled by NVRTC for this card (registers, spills), then every
#     kernel's parity against the CPU backend on fresh random inputs (outputs poisoned first; f32 ≤ 1e-4,
#     bf16 ≤ 1e-2 normwise relative; NaN fails).
#     Then compute-sanitizer memcheck over the suites in SANITIZE (default: attention).
#  2. LoRA and QLoRA (NF4) SFT of SmolLM2 on the same data, once on the CPU and once on the GPU, in f32: the
#     per-step training loss curves must agree within LOSS_TOL (relative).
#  3. scripts/gpu-bench.sh: temper against PyTorch + PEFT on this card (GEMM ceiling, attention, LoRA, QLoRA,
#     full fine-tune, longest sequence, generation); BENCH=0 skips it, BENCH=quick drops the max-seq search.
#  4. One table with all of it (benchmark goals missed are reported as MISS; only correctness FAILs fail the run).
# Usage: scripts/gpu-check.sh [OUT_DIR]   (env: STEPS, LOSS_TOL, TEMPER_BIN, SMOL, BENCH)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-out}/gpu-check}
mkdir -p "$OUT"
STEPS=${STEPS:-20}
LOSS_TOL=${LOSS_TOL:-2e-3}
. scripts/gpu-env.sh

echo "== 1. kernels: compile + parity against the CPU backend"
t0=$(date +%s)
# Synchronise after every launch so a faulting kernel is named; a hung kernel cannot eat the whole call.
TEMPER_CUDA_SYNC=1 timeout "${PARITY_TIMEOUT:-300}" "$BIN" gpu-check > "$OUT/parity.txt" 2>&1
PARITY_RC=$?
# Thousands of rows: print the compile report, the failures and the count (all rows stay in parity.txt).
grep -v '  ok$' "$OUT/parity.txt" | head -n 120
echo "(parity: rc=$PARITY_RC, $(( $(date +%s) - t0 )) s)"

# compute-sanitizer's memcheck over the suites whose kernels changed since their last GPU run
# (SANITIZE="" skips it): an out-of-bounds access passes parity when it reads zeros, not here.
SANITIZE=${SANITIZE-attention}
: > "$OUT/sanitizer.txt"
if [ -n "$SANITIZE" ] && command -v compute-sanitizer > /dev/null; then
  for f in $SANITIZE; do
    t0=$(date +%s)
    timeout "${SANITIZE_TIMEOUT:-240}" compute-sanitizer --tool memcheck --error-exitcode 9 "$BIN" gpu-check --filter "$f" > "$OUT/sanitizer-$f.txt" 2>&1
    echo "$f rc=$? $(grep -m1 'ERROR SUMMARY' "$OUT/sanitizer-$f.txt")" | tee -a "$OUT/sanitizer.txt"
    echo "(sanitizer $f: $(( $(date +%s) - t0 )) s)"
  done
fi

echo "== 2. SmolLM2 LoRA / QLoRA SFT, CPU vs GPU"
SMOL=${SMOL:-}
for m in assets/SmolLM2-135M-Instruct.Q4_1.gguf assets/SmolLM2-135M-Instruct-6L.Q4_1.gguf; do
  [ -z "$SMOL" ] && [ -f "$m" ] && SMOL=$m
done
SFT_ROWS=()
if [ -z "$SMOL" ]; then
  echo "no SmolLM2 GGUF under assets/: SFT comparison skipped"
else
  for kind in lora qlora lora-bf16; do
    for dev in cpu cuda; do
      # bf16 exists on the GPU only; its curve is compared with the f32 CPU run (looser tolerance).
      [ $kind = lora-bf16 ] && [ $dev = cpu ] && continue
      cfg="$OUT/$kind-$dev.toml"
      cat > "$cfg" <<TOML
base_model = "$SMOL"
sequence_len = 128
sample_packing = true
micro_batch_size = 4
gradient_accumulation_steps = 1
max_steps = $STEPS
learning_rate = 2e-3
lr_scheduler = "cosine"
warmup_steps = 4
max_grad_norm = 1.0
val_set_size = 0.05
eval_steps = $STEPS
save_steps = $STEPS
output_dir = "$OUT/run-$kind-$dev"
seed = 42
device = "$dev"
load_in_4bit = $([ $kind = qlora ] && echo true || echo false)
bf16 = $([ $kind = lora-bf16 ] && echo true || echo false)
sample_prompts = ["Who are you?"]
sample_max_new_tokens = 16

[adapter]
kind = "${kind%-bf16}"
r = 16
alpha = 32
dropout = 0.0
target_modules = "all-linear"

[[datasets]]
path = "examples/data/tempered.jsonl"
type = "chat"
TOML
      rm -rf "$OUT/run-$kind-$dev"
      t0=$(date +%s.%N)
      timeout "${SFT_TIMEOUT:-150}" "$BIN" train "$cfg" > "$OUT/$kind-$dev.log" 2>&1
      rc=$?
      t1=$(date +%s.%N)
      echo "$kind on $dev: rc=$rc, $(python3 -c "print(f'{$t1-$t0:.1f}')") s"
      [ $rc -ne 0 ] && tail -n 15 "$OUT/$kind-$dev.log"
    done
    SFT_ROWS+=("$kind")
  done
fi

if [ "${BENCH:-1}" != 0 ]; then
  echo "== 3. benchmarks against PyTorch + PEFT"
  QUICK=$([ "${BENCH:-1}" = quick ] && echo 1 || echo 0) TEMPER_BIN="$BIN" bash scripts/gpu-bench.sh "$OUT/bench" > "$OUT/bench.txt" 2>&1
  echo "(gpu-bench rc=$?; its table is part of the summary below, its log in bench.txt)"
fi

echo "== 4. summary"
python3 - "$OUT" "$LOSS_TOL" "$PARITY_RC" "${SFT_ROWS[@]}" <<'PY'
import json, os, re, sys
out, tol, parity_rc, kinds = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
card = open(os.path.join(out, "card.txt")).read().strip()
rows = []
suites = {}
for line in open(os.path.join(out, "parity.txt"), errors="replace"):
    m = re.match(r"^(\S+)\s.*\s(ok|FAIL)( \(.*\))?$", line.rstrip())
    if m:
        suite = m.group(1).split("/")[0]
        s = suites.setdefault(suite, [0, 0, ""])
        s[0 if m.group(2) == "ok" else 1] += 1
        if m.group(2) == "FAIL" and not s[2]:
            s[2] = line.strip()[:110]
for name, (ok, bad, first) in suites.items():
    rows.append((f"parity {name}", f"{ok} ok / {bad} failed", "PASS" if bad == 0 else "FAIL", first))
if not suites:
    rows.append(("parity", "no parity rows (see parity.txt)", "FAIL", ""))
for line in open(os.path.join(out, "sanitizer.txt"), errors="replace"):
    name, rc, *rest = line.split(" ", 2) + [""]
    ok = rc == "rc=0" and re.search(r"ERROR SUMMARY: 0 errors", line) is not None
    rows.append((f"compute-sanitizer memcheck {name}", line.strip(), "PASS" if ok else "FAIL", "" if ok else f"see sanitizer-{name}.txt"))
def losses(path, key="loss"):
    d = {}
    try:
        for l in open(path):
            r = json.loads(l)
            if r.get(key) is not None and "step" in r:
                d[r["step"]] = r[key]
    except OSError:
        pass
    return d
def tps(path):
    v = sorted(losses(path, "tokens_per_s").items())[2:]  # skip compile/warm-up steps
    return sum(x for _, x in v) / len(v) if v else float("nan")
for k in kinds:
    base = k.replace("-bf16", "")
    ktol = 5e-2 if k.endswith("-bf16") else tol
    c = losses(os.path.join(out, f"run-{base}-cpu", "metrics.jsonl"))
    g = losses(os.path.join(out, f"run-{k}-cuda", "metrics.jsonl"))
    steps = sorted(set(c) & set(g))
    if not steps:
        rows.append((f"SFT {k} loss curve", f"cpu {len(c)} / gpu {len(g)} steps logged", "FAIL", "a run failed: see its log"))
        continue
    worst = max(abs(c[s] - g[s]) / max(abs(c[s]), 1e-12) for s in steps)
    ok = worst <= ktol and len(steps) == len(c)
    tc, tg = tps(os.path.join(out, f"run-{base}-cpu", "metrics.jsonl")), tps(os.path.join(out, f"run-{k}-cuda", "metrics.jsonl"))
    rows.append((f"SFT {k} loss curve", f"{len(steps)} steps, loss {c[steps[0]]:.4f}->{c[steps[-1]]:.4f} (cpu) {g[steps[-1]]:.4f} (gpu), max rel diff {worst:.2e}; tokens/s cpu {tc:.0f} gpu {tg:.0f}", "PASS" if ok else "FAIL", f"tol {ktol:g} vs the f32 CPU run"))
bench = os.path.join(out, "bench", "rows.json")
if os.path.exists(bench):
    # (what, temper, pytorch, ratio, goal, verdict) from scripts/gpu-bench.sh; a missed goal is not a failure.
    for what, t, p, ratio, goal, verdict in json.load(open(bench))["rows"]:
        v = {"PASS": "PASS", "MISS": "MISS", "FAIL": "FAIL"}.get(verdict, "INFO")
        rows.append((f"bench {what}", f"temper {t}  pytorch {p}  ratio {ratio}" + (f"  goal {goal}" if goal else ""), v, ""))
print(f"card: {card}")
w = max(len(r[0]) for r in rows)
for r in rows:
    print(f"{r[0]:<{w}}  {r[2]:<4}  {r[1]}" + (f"  [{r[3]}]" if r[3] else ""))
bad = sum(r[2] == "FAIL" for r in rows)
print(f"{len(rows)} rows, {bad} failing")
sys.exit(1 if bad else 0)
PY
