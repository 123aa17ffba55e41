#!/usr/bin/env bash
# Compare a temper LoRA training step with its Python baseline on the CPU:
#
#   tools/bench_train_compare.sh --workload lora-sft|dpo|grpo [--threads N] [--shapes "tiny smollm2"]
#                                [--steps S] [--batch B] [--seq T] [--rank R]
#                                [--num-generations G] [--new-tokens M]   (grpo only)
#
# lora-sft (also tools/bench_sft_compare.sh): `temper bench --workload lora-sft` against the
#   PyTorch + PEFT baseline (tools/bench_sft_torch.py): LoRA training steps on a random-init Llama.
# dpo (also tools/bench_dpo_compare.sh): `temper bench --workload dpo` against the TRL baseline
#   (tools/bench_dpo_torch.py: TRL's DPOTrainer + PEFT LoRA, reference = the base with the adapter
#   disabled): LoRA DPO training steps on a random-init Llama. --batch is preference pairs per
#   step (2·B sequences of T tokens: a T/2 prompt + completion). Goals: temper tok/s >= 2x TRL's,
#   temper peak RSS <= 0.5x TRL's (marked ok/MISS); the table also shows both final losses.
# grpo (also tools/bench_grpo_compare.sh): `temper bench --workload grpo` against the TRL baseline
#   (tools/bench_grpo_torch.py: TRL's GRPOTrainer + PEFT LoRA, beta 0, transformers generate):
#   LoRA GRPO steps on a random-init Llama. One step = rollout (--batch P prompts of --seq T
#   tokens, --num-generations G sampled completions of exactly --new-tokens M tokens each) +
#   reward + one optimizer update on the P·G completions. tok/s = P·G·(T+M) / step, rollout
#   tok/s = P·G·M / rollout time. Goal: temper tok/s >= 3x TRL's (marked ok/MISS); the table also
#   shows both rollout tok/s and their ratio. Both sides always get all six sizes: the ones not
#   given default to P 4, T 32, G 4, M 32, rank 16, steps 3, the same for every shape.
#
# Environment: TEMPER (default target/release/temper), PYTHON (default /work/venv/bin/python,
# else python3). Each shape runs in its own process for both implementations (peak RSS is per
# process). --steps/--batch/--seq/--rank go to both sides when given; otherwise temper runs
# with its defaults and the baseline is given the batch/seq/rank/steps that temper reports,
# so that both time the same work (a mismatch is flagged in the table; grpo passes its sizes to
# both sides always). A failing command or a temper without the workload (or without one of
# its options) is reported in its row; the script keeps going and exits
# non-zero if anything failed. OMP_WAIT_POLICY defaults to PASSIVE (see bench_sft_torch.py).
set -u

# What differs between the workloads. BASE_NAME is the baseline in prose, BASE_COL in the table
# (its lower-case form also names its temp files and load warnings), WORK_COL heads the work
# column, RSS_COL says which RSS, GOALS is "TOK RSS" (temper/baseline tok/s at least TOK, RSS at
# most RSS, marked ok/MISS; "-" for no goal on one of them) or empty for no goal marks, LOSS_COL 1
# adds the final-loss column, ROLLOUT_COL 1 the rollout tok/s columns. WORK_OPTS are the options
# only this workload has (a temper that rejects one of them lacks the workload); DEFAULTS the
# sizes both sides get unless given (empty: temper's own defaults, read back for the baseline).
set_workload() {
    WORK_OPTS="" DEFAULTS="" ROLLOUT_COL=0
    case "$1" in
        lora-sft)
            BASE_SCRIPT=tools/bench_sft_torch.py BASE_NAME=PyTorch BASE_COL=pytorch
            WORK_COL="batch x seq, rank" RSS_COL=RSS GOALS="" LOSS_COL=0
            TITLE="lora-sft" ;;
        dpo)
            BASE_SCRIPT=tools/bench_dpo_torch.py BASE_NAME=TRL BASE_COL=TRL
            WORK_COL="pairs x seq, rank" RSS_COL="peak RSS" GOALS="2 0.5" LOSS_COL=1
            TITLE="dpo (LoRA, sigmoid, beta 0.1; tok/s = 2 x pairs x seq / step)" ;;
        grpo)
            BASE_SCRIPT=tools/bench_grpo_torch.py BASE_NAME=TRL BASE_COL=TRL
            WORK_COL="prompts x seq, G x new, rank" RSS_COL="peak RSS" GOALS="3 -" LOSS_COL=1
            ROLLOUT_COL=1 WORK_OPTS="--num-generations --new-tokens"
            DEFAULTS="--batch 4 --seq 32 --num-generations 4 --new-tokens 32 --rank 16 --steps 3"
            TITLE="grpo (LoRA, beta 0, TRL's default loss; tok/s = P x G x (seq + new) / step, rollout tok/s = P x G x new / rollout)" ;;
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
        --workload|--threads|--shapes|--steps|--batch|--seq|--rank|--num-generations|--new-tokens)
            if [ $# -lt 2 ]; then echo "missing value for $1" >&2; exit 2; fi ;;
    esac
    case "$1" in
        --workload) WORKLOAD="$2"; shift 2 ;;
        --threads) THREADS="$2"; shift 2 ;;
        --shapes) SHAPES="$2"; shift 2 ;;
        --steps|--batch|--seq|--rank|--num-generations|--new-tokens) EXTRA+=("$1" "$2"); shift 2 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
if [ "$HELP" = 1 ]; then usage; exit 0; fi
if [ -z "$WORKLOAD" ]; then
    echo "missing --workload lora-sft|dpo|grpo" >&2; usage >&2; exit 2
fi
if ! set_workload "$WORKLOAD"; then
    echo "unknown workload: $WORKLOAD (lora-sft, dpo or grpo)" >&2; exit 2
fi
for e in "${EXTRA[@]}"; do
    case "$e" in
        --num-generations|--new-tokens)
            if [[ " $WORK_OPTS " != *" $e "* ]]; then echo "$e applies to grpo only" >&2; exit 2; fi ;;
    esac
done
# Fill in the workload's default sizes that were not given, so that both sides get all of them.
read -r -a defaults <<<"$DEFAULTS"
for ((i = 0; i + 1 < ${#defaults[@]}; i += 2)); do
    given=0
    for e in "${EXTRA[@]}"; do [ "$e" = "${defaults[i]}" ] && given=1; done
    [ "$given" = 0 ] && EXTRA+=("${defaults[i]}" "${defaults[i + 1]}")
done
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

# json_args NAME: "--batch B --seq T --rank R --steps S" (and --num-generations G --new-tokens M)
# from the JSON result in $TMP/NAME.out
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
        keys = ("batch", "seq", "rank", "steps", "num_generations", "new_tokens")
        print(" ".join(f"--{k.replace('_', '-')} {int(obj[k])}" for k in keys
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
    "$GOALS" "$LOSS_COL" "$ROLLOUT_COL" "$WORK_OPTS" <<'PY'
import json, os, re, sys

(tmp, threads, workload, title, base, base_key, work_col, rss_col, goals, loss_col, rollout_col,
 work_opts) = sys.argv[1:13]
# temper / baseline: tok/s at least TOK_GOAL, peak RSS at most RSS_GOAL; None: no goal mark
TOK_GOAL, RSS_GOAL = ([None if g == "-" else float(g) for g in goals.split()] if goals.strip()
                      else (None, None))
LOSS_COL = loss_col == "1"
ROLLOUT_COL = rollout_col == "1"
WORK_OPTS = work_opts.split()


def read(name, ext):
    p = os.path.join(tmp, f"{name}.{ext}")
    return open(p, errors="replace").read() if os.path.exists(p) else ""


def last_error(text):
    """The last line that says "error", else the last line (clap ends with a "try '--help'" line)."""
    lines = [l for l in text.strip().splitlines() if l.strip()]
    errors = [l for l in lines if "error" in l.lower()]
    return (errors or lines or [""])[-1]


def result(name):
    """(dict, None) on success, (None, short failure text) otherwise."""
    rc = read(name, "rc").strip()
    out, err = read(name, "out"), read(name, "err")
    if rc == "skipped":
        return None, "n/a"
    if rc != "0":
        if "unknown workload" in err or f"invalid value '{workload}'" in err:
            return None, f"no {workload} workload"
        m = re.search(r"unexpected argument '(--[\w-]+)'", err)
        if m and m.group(1) in WORK_OPTS:
            return None, f"no {workload} workload ({m.group(1)} unknown)"
        last = last_error(err) or last_error(out)
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
    work = "x".join(str(r.get(k, "?")) for k in ("batch", "seq"))
    if ROLLOUT_COL:  # grpo: G completions of new_tokens each per prompt
        work += f" G{r.get('num_generations', '?')}x{r.get('new_tokens', '?')}"
    return work + f" r{r.get('rank', '?')}"


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
if ROLLOUT_COL:
    header[5:5] = ["temper rollout tok/s", f"{base} rollout tok/s", "rollout ratio"]
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
    fmt_loss = lambda r: f"{round(r['final_loss'], 4) + 0.0:.4f}" if num(r, "final_loss") is not None else "-"
    fmt_tok = lambda r, k: f"{r[k]:.1f}" if num(r, k) is not None else "-"
    row = [
        s, work,
        f"{tt:.1f}" if t else terr,
        f"{pt:.1f}" if p else perr,
        ratio(tt, pt, TOK_GOAL, lambda x, g: x >= g),
        fmt_ms(t), fmt_ms(p),
        f"{tr:.0f} MiB" if tr is not None else "-",
        f"{pr:.0f} MiB" if pr is not None else "-",
        ratio(tr, pr, RSS_GOAL, lambda x, g: x <= g),
    ] + ([f"{fmt_loss(t)} / {fmt_loss(p)}"] if LOSS_COL else [])
    if ROLLOUT_COL:
        trt, prt = num(t, "rollout_tokens_per_s"), num(p, "rollout_tokens_per_s")
        row[5:5] = [fmt_tok(t, "rollout_tokens_per_s"), fmt_tok(p, "rollout_tokens_per_s"),
                    ratio(trt, prt, None, None)]
    table.append(row)

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
            err = last_error(read(f"{side}_{s}", "err"))
            print(f"note: {label} failed on {s}: {err or '(no message)'}")
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
