#!/usr/bin/env bash
# Compare a temper LoRA training step with its Python baseline on the CPU:
#
#   tools/bench_train_compare.sh --workload lora-sft|dpo [--threads N] [--shapes "tiny smollm2"]
#                                [--steps S] [--batch B] [--seq T] [--rank R]
#
# lora-sft (also tools/bench_sft_compare.sh): `temper bench --workload lora-sft` against the
#   PyTorch + PEFT baseline (tools/bench_sft_torch.py): LoRA training steps on a random-init Llama.
# dpo (also tools/bench_dpo_compare.sh): `temper bench --workload dpo` against the TRL baseline
#   (tools/bench_dpo_torch.py: TRL's DPOTrainer + PEFT LoRA, reference = the base with the adapter
#   disabled): LoRA DPO training steps on a random-init Llama. --batch is preference pairs per
#   step (2·B sequences of T tokens: a T/2 prompt + completion). Goals: temper tok/s >= 2x TRL's,
#   temper peak RSS <= 0.5x TRL's (marked ok/MISS); the table also shows both final losses.
#
# Environment: TEMPER (default target/release/temper), PYTHON (default /work/venv/bin/python,
# else python3). Each shape runs in its own process for both implementations (peak RSS is per
# process). --steps/--batch/--seq/--rank go to both sides when given; otherwise temper runs
# with its defaults and the baseline is given the batch/seq/rank/steps that temper reports,
# so that both time the same work (a mismatch is flagged in the table). A failing command or
# a temper without the workload is reported in its row; the script keeps going and exits
# non-zero if anything failed. OMP_WAIT_POLICY defaults to PASSIVE (see bench_sft_torch.py).
set -u

# What differs between the workloads. BASE_NAME is the baseline in prose, BASE_COL in the table
# (its lower-case form also names its temp files and load warnings), WORK_COL heads the work
# column, RSS_COL says which RSS, GOALS is "TOK RSS" (temper/baseline tok/s at least TOK, RSS at
# most RSS, marked ok/MISS) or empty for no goal marks, LOSS_COL 1 adds the final-loss column.
set_workload() {
    case "$1" in
        lora-sft)
            BASE_SCRIPT=tools/bench_sft_torch.py BASE_NAME=PyTorch BASE_COL=pytorch
            WORK_COL="batch x seq, rank" RSS_COL=RSS GOALS="" LOSS_COL=0
            TITLE="lora-sft" ;;
        dpo)
            BASE_SCRIPT=tools/bench_dpo_torch.py BASE_NAME=TRL BASE_COL=TRL
            WORK_COL="pairs x seq, rank" RSS_COL="peak RSS" GOALS="2 0.5" LOSS_COL=1
            TITLE="dpo (LoRA, sigmoid, beta 0.1; tok/s = 2 x pairs x seq / step)" ;;
        *) return 1 ;;
    esac
}

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"; }

cd "$(dirname "$0")/.."

WORKLOAD=""
THREADS=2
SHAPES="tiny smollm2"
EXTRA=()
HELP=0
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) HELP=1; shift; continue ;;
        --workload|--threads|--shapes|--steps|--batch|--seq|--rank)
            if [ $# -lt 2 ]; then echo "missing value for $1" >&2; exit 2; fi ;;
    esac
    case "$1" in
        --workload) WORKLOAD="$2"; shift 2 ;;
        --threads) THREADS="$2"; shift 2 ;;
        --shapes) SHAPES="$2"; shift 2 ;;
        --steps|--batch|--seq|--rank) EXTRA+=("$1" "$2"); shift 2 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
if [ "$HELP" = 1 ]; then usage; exit 0; fi
if [ -z "$WORKLOAD" ]; then
    echo "missing --workload lora-sft|dpo" >&2; usage >&2; exit 2
fi
if ! set_workload "$WORKLOAD"; then
    echo "unknown workload: $WORKLOAD (lora-sft or dpo)" >&2; exit 2
fi
BASE_KEY="${BASE_COL,,}"

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
# failure shows up in the table with temper's own message.
if [ ! -x "$TEMPER" ]; then
    echo "note: no temper binary at $TEMPER (cargo build --release); showing the $BASE_NAME side only" >&2
    TEMPER_STATUS="no temper binary at $TEMPER (cargo build --release)"
else
    TEMPER_STATUS=ok
    if ! "$TEMPER" bench --help 2>&1 | grep -qw -- "$WORKLOAD"; then
        echo "note: '$TEMPER bench --help' does not mention the $WORKLOAD workload; trying anyway" >&2
    fi
fi

ROWS="$TMP/rows.txt"
: >"$ROWS"
for s in $SHAPES; do
    args=(--shape "$s" --threads "$THREADS")
    echo "running $WORKLOAD/$s ..." >&2
    if [ "$TEMPER_STATUS" = ok ]; then
        load_warning "temper $s"
        run "temper_$s" "$TEMPER" bench --workload "$WORKLOAD" "${args[@]}" "${EXTRA[@]}"
    else
        echo "$TEMPER_STATUS" >"$TMP/temper_$s.err"
        echo skipped >"$TMP/temper_$s.rc"
    fi
    pyargs=("${EXTRA[@]}")
    if [ ${#EXTRA[@]} -eq 0 ]; then
        # Match temper's defaults (read back from its JSON) where it produced a result.
        read -r -a pyargs <<<"$(json_args "temper_$s")"
    fi
    load_warning "$BASE_KEY $s"
    run "${BASE_KEY}_$s" "$PYTHON" "$BASE_SCRIPT" "${args[@]}" "${pyargs[@]}"
    echo "$s" >>"$ROWS"
done

"$PYTHON" - "$TMP" "$THREADS" "$WORKLOAD" "$TITLE" "$BASE_COL" "$BASE_KEY" "$WORK_COL" "$RSS_COL" \
    "$GOALS" "$LOSS_COL" <<'PY'
import json, os, sys

tmp, threads, workload, title, base, base_key, work_col, rss_col, goals, loss_col = sys.argv[1:11]
# temper / baseline: tok/s at least TOK_GOAL, peak RSS at most RSS_GOAL; None: no goal marks
TOK_GOAL, RSS_GOAL = map(float, goals.split()) if goals.strip() else (None, None)
LOSS_COL = loss_col == "1"


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
        if "unknown workload" in err or f"invalid value '{workload}'" in err:
            return None, f"no {workload} workload"
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


def ratio(a, b, goal, better):
    """a / b as "1.23x", with " ok" / " MISS" against the goal when there is one."""
    if a is None or not b:
        return "-"
    x = a / b
    if goal is None:
        return f"{x:.2f}x"
    return f"{x:.2f}x" + (" ok" if better(x, goal) else " MISS")


rows = [line.strip() for line in open(os.path.join(tmp, "rows.txt")) if line.strip()]
goal_tok = f" (goal >= {TOK_GOAL:g}x)" if TOK_GOAL is not None else ""
goal_rss = f" (goal <= {RSS_GOAL:g}x)" if RSS_GOAL is not None else ""
header = ["shape", work_col, "temper tok/s", f"{base} tok/s", f"tok/s ratio{goal_tok}",
          "temper step ms", f"{base} step ms", f"temper {rss_col}", f"{base} {rss_col}",
          f"RSS ratio{goal_rss}"] + ([f"final loss temper / {base}"] if LOSS_COL else [])
table, failures, notes = [], 0, []
skipped = False
for s in rows:
    t, terr = result(f"temper_{s}")
    p, perr = result(f"{base_key}_{s}")
    skipped |= terr == "n/a"
    failures += bool(terr and terr != "n/a") + bool(perr)
    work = shape_of(p or t) if (p or t) else "-"
    if t and p and shape_of(t) != shape_of(p):
        work = f"MISMATCH {shape_of(t)} vs {shape_of(p)}"
        notes.append(f"{s}: temper and {base} timed different work; pass --batch/--seq/--rank")
    tr, pr = rss_mb(t), rss_mb(p)
    tt, pt = num(t, "tokens_per_s"), num(p, "tokens_per_s")
    fmt_ms = lambda r: f"{r['step_ms']:.1f}" if num(r, "step_ms") is not None else "-"
    fmt_loss = lambda r: f"{r['final_loss']:.4f}" if num(r, "final_loss") is not None else "-"
    table.append([
        s, work,
        f"{tt:.1f}" if t else terr,
        f"{pt:.1f}" if p else perr,
        ratio(tt, pt, TOK_GOAL, lambda x, g: x >= g),
        fmt_ms(t), fmt_ms(p),
        f"{tr:.0f} MiB" if tr is not None else "-",
        f"{pr:.0f} MiB" if pr is not None else "-",
        ratio(tr, pr, RSS_GOAL, lambda x, g: x <= g),
    ] + ([f"{fmt_loss(t)} / {fmt_loss(p)}"] if LOSS_COL else []))

widths = [max(len(str(r[i])) for r in [header] + table) for i in range(len(header))]
fmt = lambda r: "| " + " | ".join(str(c).ljust(wd) for c, wd in zip(r, widths)) + " |"
print(f"{title}, threads: {threads}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}"
      f" (ratios are temper / {base}: tok/s higher is better, RSS lower is better)")
print(fmt(header))
print("|" + "|".join("-" * (wd + 2) for wd in widths) + "|")
for r in table:
    print(fmt(r))
if skipped and rows:
    print("note: " + read(f"temper_{rows[0]}", "err").strip())
for s in rows:
    for side, label in (("temper", "temper"), (base_key, base)):
        rc = read(f"{side}_{s}", "rc").strip()
        if rc not in ("0", "skipped"):
            err = read(f"{side}_{s}", "err").strip().splitlines()
            print(f"note: {label} failed on {s}: {err[-1] if err else '(no message)'}")
            if side == "temper":
                print("      (a message about the workload or shape means this temper build does not"
                      f" implement `bench --workload {workload}` for it yet)")
for n in notes:
    print("warning: " + n)
lw = os.path.join(tmp, "load_warnings.txt")
if os.path.exists(lw):
    print("warning: machine was busy (load average above 0.75 x cores) before: "
          + "; ".join(l.strip() for l in open(lw) if l.strip()))
sys.exit(1 if failures or skipped else 0)
PY
