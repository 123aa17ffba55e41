#!/usr/bin/env python3
"""Writes the prompts of a preference-pair JSONL as `format = "prompt"` records (RL prompt sets).

    python3 tools/prompts_from_pairs.py examples/data/caps_pref.jsonl examples/data/caps_prompts.jsonl

Each output line is {"prompt": <the pair's prompt>}; duplicates are dropped, order is kept.
"""
import json
import sys


def main(src: str, dst: str) -> None:
    seen, out = set(), []
    with open(src) as f:
        for line in f:
            if not line.strip():
                continue
            prompt = json.loads(line)["prompt"]
            key = json.dumps(prompt, sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append(json.dumps({"prompt": prompt}))
    with open(dst, "w") as f:
        f.write("\n".join(out) + "\n")
    print(f"{dst}: {len(out)} prompts from {src}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
