#!/usr/bin/env bash
# LoRA against QLoRA on the CPU: step time and peak RSS of `temper bench --workload lora-sft`
# (dense f32 base) and `--workload qlora-sft` (the same adapter over a quantised base), plus the
# bytes of the weights in each base format (`--workload weight-bytes`).
#
#   tools/bench_qlora.sh [--reps N] [--steps S] [--rank R] [--threads T] [--shapes "small smollm2"]
#                        [--quant nf4-dq] [--no-gguf] [--no-build]
#
# Builds release once (unless --no-build), then runs every measurement as its own process (peak
# RSS is per process), LoRA and QLoRA alternating N times per case (default 3) because a shared
# 2-core VM drifts. The summary gives medians, the QLoRA/LoRA ratio of the medians, the range of
# the per-pair ratios, and CPU time per step (less disturbed than wall time by the time a shared
# VM's host steals). Shapes are random-init (`small`: batch 4 x 256, 4x --steps; `smollm2`:
# batch 1 x 256); with the real SmolLM2 GGUF present (scripts/fetch-assets.sh) it also runs the
# real model: LoRA over its dequantised f32 weights against QLoRA over its own Q4_1 blocks (skip
# with --no-gguf). Environment: TEMPER (default target/release/temper).
set -u

cd "$(dirname "$0")/.."

REPS=3
STEPS=3
RANK=16
THREADS=2
SHAPES="small smollm2"
QUANT=nf4-dq
GGUF=assets/SmolLM2-135M-Instruct.Q4_1.gguf
USE_GGUF=1
BUILD=1
while [ $# -gt 0 ]; do
    case "$1" in
        --reps) REPS="$2"; shift 2 ;;
        --steps) STEPS="$2"; shift 2 ;;
        --rank) RANK="$2"; shift 2 ;;
        --threads) THREADS="$2"; shift 2 ;;
        --shapes) SHAPES="$2"; shift 2 ;;
        --quant) QUANT="$2"; shift 2 ;;
        --no-gguf) USE_GGUF=0; shift ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
[ -f "$GGUF" ] || USE_GGUF=0

TEMPER="${TEMPER:-target/release/temper}"
if [ "$BUILD" = 1 ]; then
    cargo build --release --quiet || exit 1
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >"$TMP/load.txt"
head -n1 /proc/stat >"$TMP/stat0.txt"

# run NAME ARGS...: one `temper bench` process; its JSON line goes to $TMP/NAME.json and a failure
# (exit code and last line of stderr) to $TMP/NAME.err, so one failing run does not stop the rest.
run() {
    local name="$1"; shift
    echo "  $name" >&2
    if ! "$TEMPER" --threads "$THREADS" bench "$@" >"$TMP/$name.json" 2>"$TMP/$name.err"; then
        echo "rc=$? $(tail -n1 "$TMP/$name.err")" >"$TMP/$name.failed"
    fi
}

echo "weight bytes (smollm2 shape, random init) ..." >&2
for q in f32 bf16 nf4 nf4-dq fp4 fp4-dq; do
    run "bytes_smollm2_$q" --workload weight-bytes --shape smollm2 --quant "$q"
done
if [ "$USE_GGUF" = 1 ]; then
    echo "weight bytes ($GGUF) ..." >&2
    for q in f32 bf16 gguf nf4-dq; do
        run "bytes_gguf_$q" --workload weight-bytes --model "$GGUF" --quant "$q"
    done
fi

# Step timings: LoRA and QLoRA alternate, rep by rep.
CASES=()
for s in $SHAPES; do CASES+=("$s"); done
[ "$USE_GGUF" = 1 ] && CASES+=(gguf)
for i in $(seq 1 "$REPS"); do
    for c in "${CASES[@]}"; do
        echo "steps: $c, rep $i/$REPS ..." >&2
        if [ "$c" = gguf ]; then
            common=(--shape smollm2 --model "$GGUF" --steps "$STEPS" --rank "$RANK")
            run "step_${c}_lora_$i" --workload lora-sft --quant f32 "${common[@]}"
            run "step_${c}_qlora_$i" --workload qlora-sft --quant gguf "${common[@]}"
        else
            steps="$STEPS"
            # A small shape's step is ~10x shorter: time 4x as many so a run is not over in a second.
            case "$c" in tiny|small) steps=$((STEPS * 4)) ;; esac
            common=(--shape "$c" --steps "$steps" --rank "$RANK")
            run "step_${c}_lora_$i" --workload lora-sft --quant f32 "${common[@]}"
            run "step_${c}_qlora_$i" --workload qlora-sft --quant "$QUANT" "${common[@]}"
        fi
    done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$TMP/load.txt"
head -n1 /proc/stat >"$TMP/stat1.txt"

python3 - "$TMP" "$REPS" "${CASES[*]}" "$THREADS" <<'PY'
import glob, json, os, statistics, sys

tmp, reps, cases, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4]
MiB = 2**20
failed = 0


def load(name):
    """The run's JSON result, or None (its failure is printed at the end)."""
    global failed
    if os.path.exists(os.path.join(tmp, name + ".failed")):
        failed += 1
        return None
    try:
        return json.loads(open(os.path.join(tmp, name + ".json")).read().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        failed += 1
        return None


def table(header, rows):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))


def bytes_rows(prefix, formats):
    res = {q: load(f"{prefix}_{q}") for q in formats}
    bf16 = res.get("bf16")
    ratio = lambda r, key: f"{r[key] / bf16[key]:.3f}x" if bf16 else "-"
    rows = []
    for q, r in res.items():
        if r is None:
            rows.append([q] + ["FAILED"] + ["-"] * 7)
            continue
        rows.append([
            q, f"{r['linear_stored_bytes'] / MiB:.1f}", ratio(r, "linear_stored_bytes"),
            f"{r['linear_resident_bytes'] / MiB:.1f}", ratio(r, "linear_resident_bytes"),
            f"{r['total_stored_bytes'] / MiB:.1f}", ratio(r, "total_stored_bytes"),
            f"{r['linear_bits_per_value']:.3f}", f"{r['peak_rss_mb']:.0f}",
        ])
    return rows


header = ["base", "linear MiB", "x bf16", "linear in memory MiB", "x bf16", "whole model MiB", "x bf16",
          "bits/value", "peak RSS MiB (build)"]
print("weight bytes, smollm2 shape (random init; linear = the 210 decoder projections, whole model adds the dense embeddings and norms):")
table(header, bytes_rows("bytes_smollm2", ["f32", "bf16", "nf4", "nf4-dq", "fp4", "fp4-dq"]))
if "gguf" in cases:
    print("\nweight bytes, SmolLM2-135M-Instruct.Q4_1.gguf (RSS includes the mapped file):")
    table(header, bytes_rows("bytes_gguf", ["f32", "bf16", "gguf", "nf4-dq"]))

rows = []
for c in cases:
    lora = [load(f"step_{c}_lora_{i}") for i in range(1, reps + 1)]
    qlora = [load(f"step_{c}_qlora_{i}") for i in range(1, reps + 1)]
    pairs = [(a, b) for a, b in zip(lora, qlora) if a and b]
    if not pairs:
        rows.append([c] + ["FAILED"] + ["-"] * 11)
        continue
    med = lambda rs, k: statistics.median(r[k] for r in rs if r)
    lm, qm = med(lora, "step_ms"), med(qlora, "step_ms")
    lr, qr = med(lora, "peak_rss_mb"), med(qlora, "peak_rss_mb")
    lc, qc = med(lora, "cpu_ms_per_step"), med(qlora, "cpu_ms_per_step")
    per_pair = sorted(b["step_ms"] / a["step_ms"] for a, b in pairs)
    r0 = pairs[0][1]
    rows.append([
        "SmolLM2 GGUF" if c == "gguf" else c, f"{r0['batch']}x{r0['seq']} r{r0['rank']}", r0["base"],
        f"{lm:.0f}", f"{qm:.0f}", f"{qm / lm:.2f}x", f"{per_pair[0]:.2f}-{per_pair[-1]:.2f}",
        f"{lc:.0f} / {qc:.0f}", f"{qc / lc:.2f}x" if lc else "-",
        f"{med(lora, 'tokens_per_s'):.0f} / {med(qlora, 'tokens_per_s'):.0f}",
        f"{lr:.0f} / {qr:.0f}", f"{qr / lr:.2f}x",
    ])
print(f"\nLoRA (f32 base) against QLoRA, median of {reps} alternating runs, threads {threads}:")
table(["shape", "batch x seq, rank", "QLoRA base", "LoRA ms/step", "QLoRA ms/step", "QLoRA/LoRA",
       "per-pair ratios", "CPU ms/step LoRA / QLoRA", "CPU ratio", "tok/s LoRA / QLoRA", "peak RSS MiB LoRA / QLoRA", "RSS ratio"], rows)
print()
print(open(os.path.join(tmp, "load.txt")).read().strip())
# Time the hypervisor gave other guests while this ran (the `st` column of vmstat), all CPUs.
t0, t1 = ([int(x) for x in open(os.path.join(tmp, f)).read().split()[1:]] for f in ("stat0.txt", "stat1.txt"))
d = [b - a for a, b in zip(t0, t1)]
if len(d) > 7 and sum(d[:8]):
    print(f"stolen CPU time during the run: {100 * d[7] / sum(d[:8]):.0f}%; idle {100 * d[3] / sum(d[:8]):.0f}%")
for f in sorted(glob.glob(os.path.join(tmp, "*.failed"))):
    print(f"FAILED {os.path.basename(f)[:-7]}: {open(f).read().strip()}")
sys.exit(1 if failed else 0)
PY
