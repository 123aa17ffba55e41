#!/usr/bin/env bash
# Compare `temper bench --workload dpo` with the TRL baseline (tools/bench_dpo_torch.py: TRL's
# DPOTrainer + PEFT LoRA, reference = the base with the adapter disabled): LoRA DPO training
# steps on a random-init Llama.
#
#   tools/bench_dpo_compare.sh [--threads N] [--shapes "tiny smollm2"]
#                              [--steps S] [--batch B] [--seq T] [--rank R]
#
# --batch is preference pairs per step (2·B sequences of T tokens: a T/2 prompt + completion).
# Environment: TEMPER (default target/release/temper), PYTHON (default /work/venv/bin/python,
# else python3). Each shape runs in its own process for both implementations (peak RSS is per
# process). --steps/--batch/--seq/--rank go to both sides when given; otherwise temper runs with
# its defaults and the TRL side is given the batch/seq/rank/steps that temper reports, so both
# time the same work (a mismatch is flagged). A failing command or a temper without the dpo
# workload is reported in its row; the script keeps going and exits non-zero if anything failed.
# Goals: temper tok/s >= 2x TRL's, temper peak RSS <= 0.5x TRL's. OMP_WAIT_POLICY defaults to
# PASSIVE (see tools/bench_sft_torch.py).
set -u

cd "$(dirname "$0")/.."

THREADS=2
SHAPES="tiny smollm2"
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --threads) THREADS="$2"; shift 2 ;;
        --shapes) SHAPES="$2"; shift 2 ;;
        --steps|--batch|--seq|--rank) EXTRA+=("$1" "$2"); shift 2 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

TEMPER="${TEMPER:-target/release/temper}"
# PyTorch's OpenMP threads spin-wait by default, which collapses when the 2-core machine is
# shared with builds; passive waiting keeps the baseline meaningful. Set it explicitly to override.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
if [ -z "${PYTHON:-}" ]; then
    if [ -x /work/venv/bin/python ]; then PYTHON=/work/venv/bin/python; else PYTHON=python3; fi
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

load_warning() {
    local load cores
    load="$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo 0)"
    cores="$(nproc 2>/dev/null || echo 1)"
    if awk -v l="$load" -v c="$cores" 'BEGIN { exit !(l > c * 0.75) }'; then
        echo "warning: load average $load on $cores cores before $1: timings are unreliable" >&2
        echo "$1 load=$load" >>"$TMP/load_warnings.txt"
    fi
}

# run NAME CMD...: stdout -> $TMP/NAME.out, stderr -> $TMP/NAME.err, exit code -> $TMP/NAME.rc
run() {
    local name="$1"; shift
    "$@" >"$TMP/$name.out" 2>"$TMP/$name.err"
    echo $? >"$TMP/$name.rc"
}

# json_args NAME: "--batch B --seq T --rank R --steps S" from the JSON result in $TMP/NAME.out
# (only the keys present); empty when there is none.
json_args() {
    "$PYTHON" - "$TMP/$1.out" <<'PY'
import json, sys
try:
    lines = open(sys.argv[1], errors="replace").read().strip().splitlines()
except OSError:
    lines = []
for line in reversed(lines):
    try:
        obj = json.loads(line)
    except ValueError:
        continue
    if isinstance(obj, dict) and "tokens_per_s" in obj:
        print(" ".join(f"--{k} {int(obj[k])}" for k in ("batch", "seq", "rank", "steps")
                       if isinstance(obj.get(k), (int, float))))
        break
PY
}

# A heads-up when this temper's help does not mention the workload; it is still run, and a
# failure shows up in the table.
if [ ! -x "$TEMPER" ]; then
    echo "note: no temper binary at $TEMPER (cargo build --release); showing the TRL side only" >&2
    TEMPER_STATUS="no temper binary at $TEMPER (cargo build --release)"
else
    TEMPER_STATUS=ok
    if ! "$TEMPER" bench --help 2>&1 | grep -qw "dpo"; then
        echo "note: '$TEMPER bench --help' does not mention the dpo workload; trying anyway" >&2
    fi
fi

ROWS="$TMP/rows.txt"
: >"$ROWS"
for s in $SHAPES; do
    args=(--shape "$s" --threads "$THREADS")
    echo "running dpo/$s ..." >&2
    if [ "$TEMPER_STATUS" = ok ]; then
        load_warning "temper $s"
        run "temper_$s" "$TEMPER" bench --workload dpo "${args[@]}" "${EXTRA[@]}"
    else
        echo "$TEMPER_STATUS" >"$TMP/temper_$s.err"
        echo skipped >"$TMP/temper_$s.rc"
    fi
    pyargs=("${EXTRA[@]}")
    if [ ${#EXTRA[@]} -eq 0 ]; then
        # Match temper's defaults (read back from its JSON) where it produced a result.
        read -r -a pyargs <<<"$(json_args "temper_$s")"
    fi
    load_warning "trl $s"
    run "trl_$s" "$PYTHON" tools/bench_dpo_torch.py "${args[@]}" "${pyargs[@]}"
    echo "$s" >>"$ROWS"
done

"$PYTHON" - "$TMP" "$THREADS" <<'PY'
import json, os, sys

tmp, threads = sys.argv[1], sys.argv[2]
TOK_GOAL, RSS_GOAL = 2.0, 0.5  # temper / TRL: tok/s at least 2x, peak RSS at most 0.5x


def read(name, ext):
    p = os.path.join(tmp, f"{name}.{ext}")
    return open(p, errors="replace").read() if os.path.exists(p) else ""


def result(name):
    """(dict, None) on success, (None, short failure text) otherwise."""
    rc = read(name, "rc").strip()
    out, err = read(name, "out"), read(name, "err")
    if rc == "skipped":
        return None, "n/a"
    if rc != "0":
        if "unknown workload" in err or "invalid value 'dpo'" in err:
            return None, "no dpo workload"
        last = (err.strip().splitlines() or out.strip().splitlines() or [""])[-1]
        return None, f"FAILED rc={rc}" + (f": {last[:60]}" if last else "")
    for line in reversed(out.strip().splitlines()):  # the last line of stdout that is a result
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and "tokens_per_s" in obj:
            return obj, None
    return None, "FAILED: no JSON result on stdout"


def rss_mb(r):
    """Peak RSS in MiB from either key spelling (peak_rss_mb, or peak_rss_bytes as in `bench`)."""
    if not r:
        return None
    if isinstance(r.get("peak_rss_mb"), (int, float)):
        return float(r["peak_rss_mb"])
    if isinstance(r.get("peak_rss_bytes"), (int, float)):
        return r["peak_rss_bytes"] / 2**20
    return None


def shape_of(r):
    return "x".join(str(r.get(k, "?")) for k in ("batch", "seq")) + f" r{r.get('rank', '?')}"


def num(r, k):
    return r.get(k) if r and isinstance(r.get(k), (int, float)) else None


rows = [line.strip() for line in open(os.path.join(tmp, "rows.txt")) if line.strip()]
header = ["shape", "pairs x seq, rank", "temper tok/s", "TRL tok/s", "tok/s ratio (goal >= 2x)",
          "temper step ms", "TRL step ms", "temper peak RSS", "TRL peak RSS", "RSS ratio (goal <= 0.5x)",
          "final loss temper / TRL"]
table, failures, notes = [], 0, []
skipped = False
for s in rows:
    t, terr = result(f"temper_{s}")
    p, perr = result(f"trl_{s}")
    skipped |= terr == "n/a"
    failures += bool(terr and terr != "n/a") + bool(perr)
    work = shape_of(p or t) if (p or t) else "-"
    if t and p and shape_of(t) != shape_of(p):
        work = f"MISMATCH {shape_of(t)} vs {shape_of(p)}"
        notes.append(f"{s}: temper and TRL timed different work; pass --batch/--seq/--rank")
    tr, pr = rss_mb(t), rss_mb(p)
    tt, pt = num(t, "tokens_per_s"), num(p, "tokens_per_s")
    fmt_ms = lambda r: f"{r['step_ms']:.1f}" if num(r, "step_ms") is not None else "-"
    fmt_loss = lambda r: f"{r['final_loss']:.4f}" if num(r, "final_loss") is not None else "-"
    tok_ratio = f"{tt / pt:.2f}x" + (" ok" if tt / pt >= TOK_GOAL else " MISS") if tt is not None and pt else "-"
    rss_ratio = f"{tr / pr:.2f}x" + (" ok" if tr / pr <= RSS_GOAL else " MISS") if tr is not None and pr else "-"
    table.append([
        s, work,
        f"{tt:.1f}" if t else terr,
        f"{pt:.1f}" if p else perr,
        tok_ratio,
        fmt_ms(t), fmt_ms(p),
        f"{tr:.0f} MiB" if tr is not None else "-",
        f"{pr:.0f} MiB" if pr is not None else "-",
        rss_ratio,
        f"{fmt_loss(t)} / {fmt_loss(p)}",
    ])

widths = [max(len(str(r[i])) for r in [header] + table) for i in range(len(header))]
fmt = lambda r: "| " + " | ".join(str(c).ljust(wd) for c, wd in zip(r, widths)) + " |"
print(f"dpo (LoRA, sigmoid, beta 0.1; tok/s = 2 x pairs x seq / step), threads: {threads}, "
      f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}"
      " (ratios are temper / TRL: tok/s higher is better, RSS lower is better)")
print(fmt(header))
print("|" + "|".join("-" * (wd + 2) for wd in widths) + "|")
for r in table:
    print(fmt(r))
if skipped and rows:
    print("note: " + read(f"temper_{rows[0]}", "err").strip())
for s in rows:
    for side, label in (("temper", "temper"), ("trl", "TRL")):
        rc = read(f"{side}_{s}", "rc").strip()
        if rc not in ("0", "skipped"):
            err = read(f"{side}_{s}", "err").strip().splitlines()
            print(f"note: {label} failed on {s}: {err[-1] if err else '(no message)'}")
            if side == "temper":
                print("      (a message about the workload or shape means this temper build does not"
                      " implement `bench --workload dpo` for it yet)")
for n in notes:
    print("warning: " + n)
lw = os.path.join(tmp, "load_warnings.txt")
if os.path.exists(lw):
    print("warning: machine was busy (load average above 0.75 x cores) before: "
          + "; ".join(l.strip() for l in open(lw) if l.strip()))
sys.exit(1 if failures or skipped else 0)
PY
