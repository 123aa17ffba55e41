#!/usr/bin/env python3
"""Reads a temper run folder the way TensorBoard does and checks it against metrics.jsonl.

    /work/venv/bin/pip install tensorboard   # once
    tools/check_tensorboard.py RUN_DIR

Loads every events.out.tfevents.* file in RUN_DIR with TensorBoard's own EventAccumulator,
prints each scalar tag with its steps and last value, prints text summaries, and checks that
every train/<k> and eval/<k> scalar equals the matching metrics.jsonl value (as float32, which
is what TensorBoard stores; null in JSON stands for NaN or an infinity). Exits 1 on a mismatch.
"""
import json
import math
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
import numpy as np


def main(run_dir: Path) -> int:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    scalar_tags = sorted(tags["scalars"])
    if not scalar_tags:
        print(f"{run_dir}: no scalars found", file=sys.stderr)
        return 1

    # Expected values: the last row for each (tag, step), as a resumed run's readers see it.
    expected = {}
    metrics = run_dir / "metrics.jsonl"
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        step = row["step"]
        for key, value in row.items():
            if key == "step":
                continue
            tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
            expected[(tag, step)] = value

    bad = 0
    seen = set()
    for tag in scalar_tags:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        print(f"{tag:24s} {len(events):4d} points  steps {steps[0]}..{steps[-1]}  last {events[-1].value:.6g}")
        for e in events:
            seen.add((tag, e.step))
            want = expected.get((tag, e.step), "missing")
            if want == "missing":
                print(f"  {tag} step {e.step}: not in metrics.jsonl", file=sys.stderr)
                bad += 1
            elif want is None:
                if math.isfinite(e.value):
                    print(f"  {tag} step {e.step}: {e.value} but metrics.jsonl has null", file=sys.stderr)
                    bad += 1
            elif np.float32(want) != np.float32(e.value):
                print(f"  {tag} step {e.step}: {e.value} != {want}", file=sys.stderr)
                bad += 1
    for key in expected:
        if key not in seen:
            print(f"  {key[0]} step {key[1]}: in metrics.jsonl but not in TensorBoard", file=sys.stderr)
            bad += 1

    for tag in sorted(tags.get("tensors", [])):
        for e in acc.Tensors(tag):
            text = e.tensor_proto.string_val[0].decode() if e.tensor_proto.string_val else ""
            print(f"text {tag} step {e.step}: {text!r}")

    print(f"{len(scalar_tags)} scalar tags, {len(seen)} points, {bad} mismatches")
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(Path(sys.argv[1])))
