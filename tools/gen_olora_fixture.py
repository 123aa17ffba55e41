#!/usr/bin/env python3
"""OLoRA initialisation fixture: what PEFT does to a base model with init_lora_weights="olora".

On the committed base model tests/fixtures/models/llama_gqa_llama3rope (float32), PEFT 0.21
creates a LoRA adapter with OLoRA init (QR of each targeted weight: B = Q[:, :r], A = R[:r],
base weight becomes W - scale * B @ A), then lora_B is moved by seeded noise (as training would)
and the adapter is saved. Written to tests/fixtures/adapters/llama_olora/:
  adapter_config.json, adapter_model.safetensors   PEFT's save_pretrained
  reference.safetensors:
    residual.<module>.weight   the base weight after OLoRA init, per targeted module
    product.<module>           scale * B @ A right after init (sign-free: QR signs cancel)
    input_ids, attention_mask, logits   PEFT's logits after reloading the saved folder onto a
                                        fresh base (PEFT re-runs the init on load)

    /work/venv/bin/python tools/gen_olora_fixture.py
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_fixtures as gf  # noqa: E402

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

BASE_DIR = os.path.join(gf.ROOT, "tests", "fixtures", "models", "llama_gqa_llama3rope")
OUT = os.path.join(gf.ROOT, "tests", "fixtures", "adapters", "llama_olora")
R, ALPHA = 2, 6
SCALE = ALPHA / R
TARGETS = ["q_proj", "down_proj"]


def main():
    gf.fresh_dir(OUT)
    torch.manual_seed(7)
    base = gf.load(BASE_DIR, torch.float32)
    cfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights="olora",
                     lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    ref = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            module = name[len("base_model.model."):]
            a = mod.lora_A["default"].weight.detach()
            b = mod.lora_B["default"].weight.detach()
            ref[f"residual.{module}.weight"] = mod.base_layer.weight.detach().clone()
            ref[f"product.{module}"] = (SCALE * b @ a).clone()
    assert len(ref) == 2 * 2 * len(TARGETS), sorted(ref)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(OUT)
    readme = os.path.join(OUT, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    # Repo-relative base path, as the other adapter fixtures.
    cpath = os.path.join(OUT, "adapter_config.json")
    c = json.load(open(cpath))
    c["base_model_name_or_path"] = "tests/fixtures/models/llama_gqa_llama3rope"
    c["target_modules"] = sorted(c["target_modules"])
    with open(cpath, "w") as f:
        json.dump(c, f, indent=2, sort_keys=True)
    # Reload onto a fresh float32 base: PEFT re-runs OLoRA on the base, then loads A and B.
    fresh = gf.load(BASE_DIR, torch.float32)
    reloaded = PeftModel.from_pretrained(fresh, OUT).eval()
    ids, mask, _ = gf.train_batch(1)
    with torch.no_grad():
        logits = reloaded(input_ids=ids, attention_mask=mask).logits
    ref.update(input_ids=ids.to(torch.int64).contiguous(), attention_mask=mask.to(torch.int64).contiguous(), logits=logits.float().contiguous())
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(OUT, "reference.safetensors"))
    print("wrote", OUT, sorted(os.listdir(OUT)))


if __name__ == "__main__":
    main()
