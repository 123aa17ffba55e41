#!/usr/bin/env bash
# Compare `temper bench` with the PyTorch baseline (tools/bench_torch.py).
#
#   tools/bench_compare.sh [--threads N] [--workloads "train generate"] [--shapes "small smollm2"]
#                          [--steps S] [--new-tokens T]
#
# Environment: TEMPER (default target/release/temper), PYTHON (default /work/venv/bin/python,
# else python3). Each workload x shape runs in its own process for both implementations
# (peak RSS is per process). A failing command is reported in its table row; the script
# keeps going and exits non-zero if anything failed. OMP_WAIT_POLICY defaults to PASSIVE
# here (see below and bench_torch.py's docstring).
set -u

cd "$(dirname "$0")/.."

THREADS=2
WORKLOADS="train generate"
SHAPES="small smollm2"
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --threads) THREADS="$2"; shift 2 ;;
        --workloads) WORKLOADS="$2"; shift 2 ;;
        --shapes) SHAPES="$2"; shift 2 ;;
        --steps) EXTRA+=(--steps "$2"); shift 2 ;;
        --new-tokens) EXTRA+=(--new-tokens "$2"); shift 2 ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

TEMPER="${TEMPER:-target/release/temper}"
# PyTorch's OpenMP threads spin-wait by default, which collapses (10x and worse) when the
# 2-core machine is shared with builds. Passive waiting keeps the baseline meaningful there;
# set OMP_WAIT_POLICY=ACTIVE (or anything else) explicitly to override.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
if [ -z "${PYTHON:-}" ]; then
    if [ -x /work/venv/bin/python ]; then PYTHON=/work/venv/bin/python; else PYTHON=python3; fi
fi

# Both implementations busy-wait between parallel regions; on an oversubscribed machine
# (other builds running) PyTorch's OpenMP threads in particular slow down by up to 10x.
load_warning() {
    local load cores
    load="$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo 0)"
    cores="$(nproc 2>/dev/null || echo 1)"
    if awk -v l="$load" -v c="$cores" 'BEGIN { exit !(l > c * 0.75) }'; then
        echo "warning: load average $load on $cores cores before $1: timings are unreliable" >&2
        echo "$1 load=$load" >>"$TMP/load_warnings.txt"
    fi
}

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# run NAME CMD...: stdout -> $TMP/NAME.out, stderr -> $TMP/NAME.err, exit code -> $TMP/NAME.rc
run() {
    local name="$1"; shift
    "$@" >"$TMP/$name.out" 2>"$TMP/$name.err"
    echo $? >"$TMP/$name.rc"
}

ROWS="$TMP/rows.txt"
: >"$ROWS"
for w in $WORKLOADS; do
    for s in $SHAPES; do
        args=(--workload "$w" --shape "$s" --threads "$THREADS" "${EXTRA[@]}")
        echo "running $w/$s ..." >&2
        load_warning "temper $w/$s"
        run "temper_${w}_${s}" "$TEMPER" bench "${args[@]}"
        load_warning "pytorch $w/$s"
        run "torch_${w}_${s}" "$PYTHON" tools/bench_torch.py "${args[@]}"
        echo "$w $s" >>"$ROWS"
    done
done

"$PYTHON" - "$TMP" "$THREADS" <<'PY'
import json, os, sys

tmp, threads = sys.argv[1], sys.argv[2]


def result(name):
    """(dict, None) on success, (None, short failure text) otherwise."""
    def read(ext):
        p = os.path.join(tmp, f"{name}.{ext}")
        return open(p, errors="replace").read() if os.path.exists(p) else ""
    rc = read("rc").strip()
    out, err = read("out"), read("err")
    if rc != "0":
        last = (err.strip().splitlines() or out.strip().splitlines() or [""])[-1]
        return None, f"FAILED rc={rc}" + (f": {last[:60]}" if last else "")
    # The JSON object is the last line of stdout that parses as one.
    for line in reversed(out.strip().splitlines()):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and "tokens_per_s" in obj:
            return obj, None
    return None, "FAILED: no JSON result on stdout"


def mib(x):
    return f"{x / 2**20:.0f} MiB" if isinstance(x, (int, float)) else "-"


rows = [line.split() for line in open(os.path.join(tmp, "rows.txt")) if line.strip()]
header = ["workload", "shape", "temper tok/s", "pytorch tok/s", "temper/pytorch", "temper RSS", "pytorch RSS"]
table, failures = [], 0
for w, s in rows:
    t, terr = result(f"temper_{w}_{s}")
    p, perr = result(f"torch_{w}_{s}")
    failures += bool(terr) + bool(perr)
    ttps = f"{t['tokens_per_s']:.1f}" if t else terr
    ptps = f"{p['tokens_per_s']:.1f}" if p else perr
    ratio = f"{t['tokens_per_s'] / p['tokens_per_s']:.2f}x" if t and p and p["tokens_per_s"] else "-"
    table.append([w, s, ttps, ptps, ratio, mib(t["peak_rss_bytes"]) if t else "-",
                  mib(p["peak_rss_bytes"]) if p else "-"])

widths = [max(len(str(r[i])) for r in [header] + table) for i in range(len(header))]
fmt = lambda r: "| " + " | ".join(str(c).ljust(wd) for c, wd in zip(r, widths)) + " |"
print(f"threads: {threads}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}")
print(fmt(header))
print("|" + "|".join("-" * (wd + 2) for wd in widths) + "|")
for r in table:
    print(fmt(r))
lw = os.path.join(tmp, "load_warnings.txt")
if os.path.exists(lw):
    print("warning: machine was busy (load average above 0.75 x cores) before: "
          + "; ".join(l.strip() for l in open(lw) if l.strip()))
sys.exit(1 if failures else 0)
PY
