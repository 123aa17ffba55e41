#!/usr/bin/env python3
"""Write a grade-school arithmetic word-problem dataset for GRPO (exact-answer reward).

    python3 tools/make_arith_dataset.py [--out-dir examples/data] [--seed 1234]
                                        [--n-train 1500] [--n-eval 150] [--max-n 12]

Writes (deterministically for a given seed, standard library only):

  examples/data/arith_train.jsonl   one problem per line
  examples/data/arith_eval.jsonl    held-out problems (disjoint from train, see below)

Each line is

  {"prompt": [{"role": "system", "content": SYSTEM},
              {"role": "user", "content": QUESTION}],
   "answer": "N"}

where N is a non-negative integer with no separators.

Problems are one or two steps of adding, subtracting or multiplying small numbers
("Sam has 7 apples and buys 5 more. How many apples does Sam have now?"). They are
sized for SmolLM2-135M-Instruct: the base model solves some but not most, so GRPO
groups of 4-8 sampled completions often hold both right and wrong answers.

Train and eval are disjoint by construction: the person names are split into a
train-only and an eval-only set, so no eval question can occur in train; the script
also checks that no question text repeats within or across the two files.

Answer-extraction rule the reward (and the measurement below) uses: take the LAST
match of the regex  -?\\d+(?:\\.\\d+)?  in the completion after deleting every
comma (so "1,200" reads 1200), parse it as a float, and score 1 if it equals
float(answer), else 0 (no number at all scores 0).

Base-model accuracy of SmolLM2-135M-Instruct (assets/SmolLM2-135M-Instruct.Q4_1.gguf)
on arith_eval.jsonl as written by the defaults (seed 1234, --max-n 12, 150 problems),
measured with the rule above on one completion per problem from

  target/release/temper generate --model assets/SmolLM2-135M-Instruct.Q4_1.gguf \\
      --prompt "<ChatML text>" --max-new-tokens 48 --stop "<|im_end|>" --json \\
      --threads 1 [--greedy | --temperature T --seed S]

where <ChatML text> is "<|im_start|>system\\n{SYSTEM}<|im_end|>\\n<|im_start|>user\\n
{QUESTION}<|im_end|>\\n<|im_start|>assistant\\n" (exactly what the model's chat template
renders with add_generation_prompt), one subprocess per problem, two at a time on a
2-core CPU (load average about 5 from other work on the machine):

  greedy:                  41/150 = 27.3%  (add 18/50, sub 11/34, mul 9/24,
                           add_sub 3/24, add_add 0/10, mul_add 0/8); cutting the
                           same greedy completions to 32 / 24 tokens: 39/150 = 26.0% /
                           30/150 = 20.0% (median completion is 46 tokens)
  temperature 0.7:         11/150 = 7.3% (one sample each); on the first 40
                           problems x 4 seeds 27/160 = 16.9%, with 18 of the 40
                           groups of 4 mixed (some right, some wrong), 22 all wrong
  temperature 1.0:         9/150 = 6.0% (one sample each; pure sampling, no top-k/p,
                           is often incoherent at this size, so sample GRPO
                           completions at about 0.7 or with top-k/top-p)
  time:                    about 5-7 s per generate call including the model load,
                           2.5-3.3 s per problem of wall time with two calls in parallel

Cross-check: transformers 5.24 on the same GGUF (dequantised to f32, chat template
applied by the tokenizer, greedy) gives the identical text for all 150 eval problems
(so 27.3% again), and 29/160 = 18.1% at temperature 0.7 on the first 40 x 4.
"""

import argparse
import json
import os
import random
import sys

SYSTEM = "Give a short answer. End your answer with the final number."

# Largest operand of the one-step additions (set by --max-n; the other ranges are fixed).
MAXN = 12

NAMES = [
    "Sam", "Tom", "Anna", "Lily", "Ben", "Mia", "Jack", "Emma", "Leo", "Zoe",
    "Max", "Ella", "Noah", "Ava", "Liam", "Ruby", "Owen", "Grace", "Finn", "Chloe",
    "Luke", "Sara", "Adam", "Nina", "Paul", "Kate", "Ryan", "Lucy", "Dan", "Amy",
    "Eli", "Ivy", "Hugo", "Rosa", "Omar", "Jane", "Carl", "Maya", "Alex", "Beth",
]
# Names that appear only in the eval set (every eval question names one of them).
EVAL_NAMES = {"Ivy", "Hugo", "Rosa", "Omar", "Jane", "Carl", "Maya", "Alex", "Beth", "Eli"}

# Plural nouns; CONTAINERS hold them in the multiplication templates.
OBJECTS = [
    "apples", "pencils", "stickers", "marbles", "cookies", "books", "stamps", "shells",
    "balloons", "candies", "cards", "toy cars", "eggs", "flowers", "coins", "crayons",
    "oranges", "buttons", "rocks", "blocks",
]
CONTAINERS = ["bags", "boxes", "jars", "packs", "baskets"]


def pick_pair(rng, names):
    a = rng.choice(names)
    b = rng.choice([n for n in names if n != a])
    return a, b


# Each template: f(rng, names) -> (kind, question, answer)

def t_add(rng, names):
    n, _ = pick_pair(rng, names)
    o = rng.choice(OBJECTS)
    a, b = rng.randint(2, MAXN), rng.randint(2, MAXN)
    q = rng.choice([
        f"{n} has {a} {o} and buys {b} more. How many {o} does {n} have now?",
        f"{n} has {a} {o}. {n} finds {b} more. How many {o} does {n} have now?",
        f"{n} had {a} {o} and got {b} more. How many {o} does {n} have?",
    ])
    return "add", q, a + b


def t_add2(rng, names):
    n, m = pick_pair(rng, names)
    o = rng.choice(OBJECTS)
    a, b = rng.randint(2, MAXN), rng.randint(2, MAXN)
    q = rng.choice([
        f"{n} has {a} {o} and {m} has {b} {o}. How many {o} do they have together?",
        f"{n} picked {a} {o} and {m} picked {b} {o}. How many {o} did they pick in all?",
    ])
    return "add", q, a + b


def t_sub(rng, names):
    n, m = pick_pair(rng, names)
    o = rng.choice(OBJECTS)
    a = rng.randint(4, MAXN + MAXN // 2)
    b = rng.randint(1, a - 1)
    q = rng.choice([
        f"{n} has {a} {o} and gives {b} to {m}. How many {o} does {n} have left?",
        f"{n} had {a} {o}. {n} lost {b} of them. How many {o} does {n} have left?",
        f"{n} has {a} {o} and eats {b}. How many {o} are left?" if o in ("apples", "cookies", "candies", "oranges", "eggs") else
        f"{n} has {a} {o} and sells {b}. How many {o} does {n} have left?",
    ])
    return "sub", q, a - b


def t_mul(rng, names):
    n, _ = pick_pair(rng, names)
    o = rng.choice(OBJECTS)
    c = rng.choice(CONTAINERS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    q = rng.choice([
        f"{n} has {a} {c} with {b} {o} in each. How many {o} does {n} have?",
        f"{n} buys {a} {c} of {o}. Each one holds {b} {o}. How many {o} does {n} buy?",
        f"{n} gets {b} {o} every day for {a} days. How many {o} does {n} get in total?",
    ])
    return "mul", q, a * b


def t_add_sub(rng, names):
    n, m = pick_pair(rng, names)
    o = rng.choice(OBJECTS)
    a, b = rng.randint(3, 15), rng.randint(2, 10)
    c = rng.randint(1, a + b - 1)
    q = f"{n} has {a} {o}, buys {b} more, then gives {c} to {m}. How many {o} does {n} have now?"
    return "add_sub", q, a + b - c


def t_add_add(rng, names):
    n, m = pick_pair(rng, names)
    o = rng.choice(OBJECTS)
    a, b, c = rng.randint(2, 10), rng.randint(2, 10), rng.randint(2, 10)
    q = f"{n} has {a} {o}. {m} gives {n} {b} more, and {n} buys {c} more. How many {o} does {n} have now?"
    return "add_add", q, a + b + c


def t_mul_add(rng, names):
    n, _ = pick_pair(rng, names)
    o = rng.choice(OBJECTS)
    c = rng.choice(CONTAINERS)
    a, b, d = rng.randint(2, 5), rng.randint(2, 5), rng.randint(2, 9)
    q = f"{n} has {a} {c} with {b} {o} in each, and {d} more {o}. How many {o} does {n} have?"
    return "mul_add", q, a * b + d


TEMPLATES = [
    (t_add, 3), (t_add2, 2), (t_sub, 3), (t_mul, 3),
    (t_add_sub, 2), (t_add_add, 1), (t_mul_add, 1),
]


def generate(rng, names, n, seen):
    fns = [f for f, w in TEMPLATES for _ in range(w)]
    out = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n:
            sys.exit("could not generate enough distinct problems")
        kind, q, ans = rng.choice(fns)(rng, names)
        assert ans >= 0
        if q in seen:
            continue
        seen.add(q)
        out.append({
            "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
            "answer": str(ans),
            "kind": kind,  # dropped when written; kept for per-template analysis
        })
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", default="examples/data")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--n-train", type=int, default=1500)
    ap.add_argument("--n-eval", type=int, default=150)
    ap.add_argument("--max-n", type=int, default=MAXN,
                    help="largest operand of one-step additions (difficulty knob)")
    args = ap.parse_args()
    globals()["MAXN"] = args.max_n

    rng = random.Random(args.seed)
    train_names = [n for n in NAMES if n not in EVAL_NAMES]
    eval_names = [n for n in NAMES if n in EVAL_NAMES]
    seen = set()
    eval_rows = generate(rng, eval_names, args.n_eval, seen)
    train_rows = generate(rng, train_names, args.n_train, seen)

    # Disjointness check: eval questions all name an eval-only person, train never does.
    train_q = {r["prompt"][1]["content"] for r in train_rows}
    eval_q = {r["prompt"][1]["content"] for r in eval_rows}
    assert len(train_q) == len(train_rows) and len(eval_q) == len(eval_rows)
    assert not (train_q & eval_q)
    for q in train_q:
        assert not any(name in q.replace(",", " ").replace(".", " ").split() for name in EVAL_NAMES), q

    os.makedirs(args.out_dir, exist_ok=True)
    for fname, rows in (("arith_train.jsonl", train_rows), ("arith_eval.jsonl", eval_rows)):
        path = os.path.join(args.out_dir, fname)
        with open(path, "w", encoding="utf-8") as f:
            for r in rows:
                row = {"prompt": r["prompt"], "answer": r["answer"]}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {len(rows)} problems to {path}")


if __name__ == "__main__":
    main()
