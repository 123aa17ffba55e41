#!/usr/bin/env python3
"""Check that a model quantised by `temper quantize` loads in transformers (bitsandbytes
integration) and gives temper's logits.

    cargo build --release && /work/venv/bin/python tools/check_temper_quantized.py

Steps: `temper quantize tests/fixtures/models/llama_gqa_llama3rope --out TMP/q` for nf4 + double
quant, nf4 without double quant and fp4 (blocksize 64); `temper forward` on TMP/q with the base
fixture's reference inputs; transformers `AutoModelForCausalLM.from_pretrained(TMP/q)` (the
quantization_config comes from temper's config.json) on the same inputs. bitsandbytes 0.50.2's
native CPU 4-bit kernels mishandle blocks that cross a row (this model has in_features 32), so the
reference dequant of tools/gen_bnb_fixtures.py is registered first, as when the fixtures were made.
Writes tests/fixtures/quant/temper_quantized_check.json; exit status 1 if a check fails.
"""

import json
import os
import subprocess
import sys
import tempfile

import torch
import transformers
import bitsandbytes as bnb
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_bnb_fixtures as gb  # noqa: E402

ROOT = gb.ROOT
TEMPER = os.path.join(ROOT, "target", "release", "temper")
BASE = os.path.join(ROOT, "tests", "fixtures", "models", "llama_gqa_llama3rope")
OUT = os.path.join(ROOT, "tests", "fixtures", "quant", "temper_quantized_check.json")
TOL = 1e-4


def check(tmp, name, flags):
    q = os.path.join(tmp, name)
    subprocess.run([TEMPER, "quantize", BASE, "--out", q, *flags], check=True)
    ref = os.path.join(BASE, "reference.safetensors")
    logits_path = os.path.join(tmp, name + "-logits.safetensors")
    subprocess.run([TEMPER, "forward", "--model", q, "--inputs", ref, "--out", logits_path], check=True)
    ours = load_file(logits_path)["logits"].float()
    inputs = load_file(ref)
    model = transformers.AutoModelForCausalLM.from_pretrained(q, device_map="cpu", attn_implementation="eager")
    model.eval()
    gb.disable_cpu_repack(model)
    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    with torch.no_grad():
        theirs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.float()
    mask = inputs["attention_mask"].bool()
    d = float((theirs - ours).abs()[mask].max())
    return {"flags": flags, "linear4bit_modules": n4, "max_abs_diff_logits": d, "passed": n4 == 14 and d <= TOL}


def main():
    gb.install_reference_cpu_dequant()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, flags in [("nf4_dq", []), ("nf4", ["--no-double-quant"]), ("fp4", ["--quant-type", "fp4"])]:
            results[name] = check(tmp, name, flags)
            print(name, results[name])
    out = {
        "transformers_version": transformers.__version__,
        "bitsandbytes_version": bnb.__version__,
        "torch_version": torch.__version__,
        "tolerance": TOL,
        "cases": results,
        "passed": all(r["passed"] for r in results.values()),
    }
    with open(OUT, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    print("wrote", OUT)
    sys.exit(0 if out["passed"] else 1)


if __name__ == "__main__":
    main()
