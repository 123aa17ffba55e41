#!/usr/bin/env python3
"""Check PEFT-format adapter folders written by temper against Hugging Face PEFT itself.

Usage, from anywhere (paths in adapter_config.json are resolved against the repository root):

    /work/venv/bin/python tools/check_temper_adapters.py DIR [DIR ...] [--tol 1e-4]
    /work/venv/bin/python tools/check_temper_adapters.py --self-test

Each DIR must hold what temper writes:
  adapter_config.json          PEFT's config; `base_model_name_or_path` names the base model
                               folder (relative to the repository root, or absolute)
  adapter_model.safetensors    the adapter tensors under PEFT's key names
  temper_outputs.safetensors   temper's own forward pass with the adapter:
                                 `input_ids`       I64 [batch, seq]
                                 `attention_mask`  I64 [batch, seq] (optional; all ones if absent)
                                 `logits`          F32 or F64 [batch, seq, vocab]
  merged/ (optional)           a full transformers model folder (config.json + model.safetensors)
                               that temper wrote after merging the adapter into the base

What is checked (all in float64: base model loaded with dtype=torch.float64 and the `eager_f64`
attention of tools/gen_fixtures.py, adapter widened to float64):
  1. `PeftModel.from_pretrained(base, DIR)` loads every tensor of adapter_model.safetensors and
     nothing is left uninitialised (the key sets must be equal; PEFT itself only warns).
  2. max |PEFT logits - temper logits| over positions with attention_mask == 1 is <= tol.
  3. if merged/ exists: it loads with no missing / unexpected keys, and
     max |merged/ logits - PEFT merge_and_unload() logits| (same positions) is <= tol.

Results go to DIR/peft_check.json:
  {"peft_version", "transformers_version", "max_abs_diff_logits", "max_abs_diff_merged" (null
   without merged/), "passed"} plus "error" (a message) only when a check could not be run.
The exit status is nonzero if any DIR failed.

--self-test fabricates such folders in a temporary directory from the committed PEFT fixtures
tests/fixtures/adapters/{llama_lora,llama_dora} (logits and merged/ computed by PEFT in float32,
standing in for temper), checks that they pass, and that corrupted copies (perturbed logits,
perturbed adapter tensor, renamed adapter key, perturbed merged weight) fail. Nothing is
written to the repository.
"""

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import traceback

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_fixtures as gf  # noqa: E402  (also registers the `eager_f64` attention)

import peft  # noqa: E402
import transformers  # noqa: E402
from peft import PeftModel, get_peft_model_state_dict  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

ROOT = gf.ROOT
TOL = 1e-4
OUTPUTS = "temper_outputs.safetensors"
RESULT = "peft_check.json"


def resolve_base(path):
    return path if os.path.isabs(path) else os.path.join(ROOT, path)


def load_f64(path):
    """A transformers model folder in float64 with the eager_f64 attention; fails on missing,
    unexpected or shape-mismatched checkpoint keys (transformers would only warn)."""
    model, info = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float64, attn_implementation="eager_f64", output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ValueError(f"{path}: checkpoint does not fit the model: {bad}")
    model.eval()
    assert model.config._attn_implementation == "eager_f64"
    return model


def masked_max_abs(a, b, mask):
    if a.shape != b.shape:
        raise ValueError(f"logits shape {tuple(a.shape)} != {tuple(b.shape)}")
    d = (a.to(torch.float64) - b.to(torch.float64))[mask]
    if d.numel() == 0:
        raise ValueError("attention_mask selects no position")
    if not torch.isfinite(d).all():
        return math.inf
    return d.abs().max().item()


def check_adapter_tensors(model, adapter_dir):
    """The adapter PEFT holds must be exactly the file's tensors (same key set, same values)."""
    file_sd = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    model_sd = get_peft_model_state_dict(model)
    missing = sorted(set(model_sd) - set(file_sd))    # PEFT created but the file lacks
    unexpected = sorted(set(file_sd) - set(model_sd))  # in the file but PEFT did not use
    if missing or unexpected:
        raise ValueError(f"adapter_model.safetensors does not fit PEFT's adapter: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''} ({len(missing)}), "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} ({len(unexpected)})")
    for k, v in file_sd.items():
        if not torch.equal(model_sd[k].to(torch.float64), v.to(torch.float64)):
            raise ValueError(f"{k}: PEFT's loaded value differs from the file")
    return len(file_sd)


def check_dir(adapter_dir, tol=TOL, verbose=True):
    adapter_dir = os.path.abspath(adapter_dir)
    res = {
        "peft_version": peft.__version__,
        "transformers_version": transformers.__version__,
        "max_abs_diff_logits": None,
        "max_abs_diff_merged": None,
        "passed": False,
    }
    try:
        with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
            cfg = json.load(f)
        base_path = resolve_base(cfg["base_model_name_or_path"])
        outs = load_file(os.path.join(adapter_dir, OUTPUTS))
        ids = outs["input_ids"].to(torch.int64)
        mask = outs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.to(torch.int64)
        temper_logits = outs["logits"]
        if temper_logits.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{OUTPUTS}: logits dtype {temper_logits.dtype}, want F32 or F64")
        sel = mask.bool()

        base = load_f64(base_path)
        model = PeftModel.from_pretrained(base, adapter_dir)
        model = model.double()  # adapter layers may be created in float32; widening is exact
        model.eval()
        n_tensors = check_adapter_tensors(model, adapter_dir)
        with torch.no_grad():
            peft_logits = model(input_ids=ids, attention_mask=mask).logits
        assert peft_logits.dtype == torch.float64
        res["max_abs_diff_logits"] = masked_max_abs(peft_logits, temper_logits, sel)

        merged_dir = os.path.join(adapter_dir, "merged")
        if os.path.isdir(merged_dir):
            temper_merged = load_f64(merged_dir)
            with torch.no_grad():
                temper_merged_logits = temper_merged(input_ids=ids, attention_mask=mask).logits
            peft_merged = model.merge_and_unload()
            with torch.no_grad():
                peft_merged_logits = peft_merged(input_ids=ids, attention_mask=mask).logits
            res["max_abs_diff_merged"] = masked_max_abs(peft_merged_logits, temper_merged_logits, sel)

        res["passed"] = res["max_abs_diff_logits"] <= tol and (
            res["max_abs_diff_merged"] is None or res["max_abs_diff_merged"] <= tol)
        if verbose:
            merged_txt = ("no merged/" if res["max_abs_diff_merged"] is None
                          else f"merged max abs diff {res['max_abs_diff_merged']:.3e}")
            print(f"{'PASS' if res['passed'] else 'FAIL'} {adapter_dir}: {n_tensors} adapter tensors, "
                  f"logits max abs diff {res['max_abs_diff_logits']:.3e}, {merged_txt} (tol {tol:g})")
    except Exception as e:  # noqa: BLE001  (any failure to run a check is a failed check)
        res["passed"] = False
        res["error"] = f"{type(e).__name__}: {e}"
        if verbose:
            traceback.print_exc()
            print(f"FAIL {adapter_dir}: {res['error']}")
    if math.isinf(res["max_abs_diff_logits"] or 0.0):
        res["max_abs_diff_logits"] = None  # non-finite logits; JSON has no inf
        res.setdefault("error", "non-finite logits difference")
    if math.isinf(res["max_abs_diff_merged"] or 0.0):
        res["max_abs_diff_merged"] = None
        res.setdefault("error", "non-finite merged logits difference")
    try:
        with open(os.path.join(adapter_dir, RESULT), "w") as f:
            json.dump(res, f, indent=2)
            f.write("\n")
    except OSError as e:
        print(f"FAIL {adapter_dir}: cannot write {RESULT}: {e}")
        res["passed"] = False
    return res


# ---------------------------------------------------------------------------------------------
# --self-test

def fabricate(src_fixture, dst, merged=True):
    """A temper-like adapter folder from a committed PEFT fixture: logits (and merged/) are
    computed by PEFT in float32, like temper's float32 runtime would produce them."""
    os.makedirs(dst)
    for fn in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(os.path.join(src_fixture, fn), os.path.join(dst, fn))
    ref = load_file(os.path.join(src_fixture, "reference.safetensors"))
    ids, mask = ref["input_ids"], ref["attention_mask"]
    with open(os.path.join(dst, "adapter_config.json")) as f:
        base_path = resolve_base(json.load(f)["base_model_name_or_path"])
    base32 = gf.load(base_path, torch.float32)  # transformers' builtin eager attention
    model = PeftModel.from_pretrained(base32, dst)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert logits.dtype == torch.float32
    save_file({"input_ids": ids.contiguous(), "attention_mask": mask.contiguous(),
               "logits": logits.contiguous()}, os.path.join(dst, OUTPUTS))
    if merged:
        model.merge_and_unload().save_pretrained(os.path.join(dst, "merged"))
    return dst


def self_test():
    fixtures = os.path.join(ROOT, "tests", "fixtures", "adapters")
    failures = []

    def expect(name, d, want_pass, diff_key=None):
        res = check_dir(d)
        with open(os.path.join(d, RESULT)) as f:
            on_disk = json.load(f)
        ok = res["passed"] == want_pass and on_disk["passed"] == want_pass
        ok = ok and {"peft_version", "transformers_version", "max_abs_diff_logits",
                     "max_abs_diff_merged", "passed"} <= set(on_disk)
        print(f"  self-test {name}: want {'pass' if want_pass else 'fail'}, got "
              f"{'pass' if res['passed'] else 'fail'} -> {'OK' if ok else 'WRONG'}")
        if not ok:
            failures.append(name)
        return res

    with tempfile.TemporaryDirectory(prefix="temper-peft-check-") as tmp:
        for fx in ("llama_lora", "llama_dora"):
            src = os.path.join(fixtures, fx)
            good = fabricate(src, os.path.join(tmp, fx))
            expect(f"{fx} as written", good, True)

            # temper's logits off by 1e-3 at one position
            d = os.path.join(tmp, fx + "_bad_logits")
            shutil.copytree(good, d)
            outs = load_file(os.path.join(d, OUTPUTS))
            outs["logits"][0, 3, 7] += 1e-3
            save_file(outs, os.path.join(d, OUTPUTS))
            expect(f"{fx} logits +1e-3", d, False)

            # an adapter tensor temper wrote differs from what it used (logits stay temper's)
            d = os.path.join(tmp, fx + "_bad_tensor")
            shutil.copytree(good, d)
            sd = load_file(os.path.join(d, "adapter_model.safetensors"))
            mags = sorted(k for k in sd if k.endswith("lora_magnitude_vector"))
            k = (mags or sorted(k for k in sd if k.endswith("lora_B.weight")))[0]  # DoRA: a magnitude
            sd[k] = sd[k] * 1.01
            save_file(sd, os.path.join(d, "adapter_model.safetensors"), metadata={"format": "pt"})
            expect(f"{fx} {k.rsplit('.', 3)[-3:]} x1.01", d, False)

            # a key PEFT does not know (e.g. temper forgot to strip ".weight" off the magnitude)
            d = os.path.join(tmp, fx + "_bad_key")
            shutil.copytree(good, d)
            sd = load_file(os.path.join(d, "adapter_model.safetensors"))
            mags = sorted(k for k in sd if k.endswith("lora_magnitude_vector"))
            k = (mags or sorted(sd))[0]
            sd[k + ".weight"] = sd.pop(k)
            save_file(sd, os.path.join(d, "adapter_model.safetensors"), metadata={"format": "pt"})
            expect(f"{fx} {k.rsplit('.', 2)[-2:]} saved with an extra '.weight'", d, False)

            # merged/ with one weight perturbed
            d = os.path.join(tmp, fx + "_bad_merged")
            shutil.copytree(good, d)
            mp = os.path.join(d, "merged", "model.safetensors")
            sd = load_file(mp)
            sd["model.layers.0.self_attn.q_proj.weight"][0, 0] += 0.05
            save_file(sd, mp, metadata={"format": "pt"})
            expect(f"{fx} merged q_proj +0.05", d, False)

        # no merged/ folder and no attention_mask: passes, max_abs_diff_merged null
        d = fabricate(os.path.join(fixtures, "llama_lora"), os.path.join(tmp, "no_merged"), merged=False)
        outs = load_file(os.path.join(d, OUTPUTS))
        del outs["attention_mask"]
        outs["input_ids"] = outs["input_ids"][:1].contiguous()  # row 0 has no padding
        outs["logits"] = outs["logits"][:1].contiguous()
        save_file(outs, os.path.join(d, OUTPUTS))
        res = expect("llama_lora without merged/ and attention_mask", d, True)
        if res["max_abs_diff_merged"] is not None:
            failures.append("max_abs_diff_merged should be null")

    print("self-test:", "all OK" if not failures else f"WRONG: {failures}")
    return 1 if failures else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="*", metavar="DIR")
    ap.add_argument("--tol", type=float, default=TOL, help=f"max abs logits difference (default {TOL:g})")
    ap.add_argument("--self-test", action="store_true", help="check the checker on fabricated folders")
    args = ap.parse_args()
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    print(f"peft {peft.__version__}, transformers {transformers.__version__}, torch {torch.__version__}")
    if args.self_test:
        if args.dirs:
            ap.error("--self-test takes no DIR")
        return self_test()
    if not args.dirs:
        ap.error("give at least one DIR (or --self-test)")
    results = [check_dir(d, args.tol) for d in args.dirs]
    n_fail = sum(not r["passed"] for r in results)
    print(f"{len(results) - n_fail}/{len(results)} passed")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
