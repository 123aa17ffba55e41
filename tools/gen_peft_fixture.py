#!/usr/bin/env python3
"""Generate tiny PEFT LoRA / DoRA adapter fixtures (and float64 references) for temper's tests.

Builds three adapters (LoRA, rsLoRA, DoRA) with Hugging Face PEFT on top of the committed
base model tests/fixtures/models/llama_gqa_llama3rope, saves them with PEFT's own
`save_pretrained`, reloads them into a float64 copy of the base model and writes
reference outputs (logits, loss, adapter-tensor gradients, merged logits).

Run from the repository root:

    /work/venv/bin/python tools/gen_peft_fixture.py

Output: tests/fixtures/adapters/<name>/ (see tests/fixtures/adapters/README.md).
Nothing is downloaded. Deterministic: same files for the same peft / transformers / torch.
"""

import json
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_fixtures as gf  # noqa: E402  (also registers the `eager_f64` attention)

import peft  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

BASE_NAME = "llama_gqa_llama3rope"
BASE_REL = os.path.join("tests", "fixtures", "models", BASE_NAME)
BASE_DIR = os.path.join(gf.ROOT, BASE_REL)
OUT_DIR = os.path.join(gf.ROOT, "tests", "fixtures", "adapters")
B_STD = 0.2
# DoRA: the magnitude vector PEFT creates is the row norm of W (+ scale * B @ A at creation,
# where B = 0). It is multiplied by exp(MAG_LOG_STD * N(0, 1)) so that a loader which
# recomputes it from the base weight instead of reading the file gives different outputs.
MAG_LOG_STD = 0.3
MAG = ".lora_magnitude_vector"

ADAPTERS = [
    dict(
        name="llama_lora",
        seed=2001,
        config=dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        ),
        scale=8 / 4,
    ),
    dict(
        name="llama_rslora",
        seed=2002,
        config=dict(
            r=2,
            lora_alpha=6,
            use_rslora=True,
            target_modules="all-linear",
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        ),
        scale=6 / 2 ** 0.5,
    ),
    dict(
        name="llama_dora",
        seed=2003,
        config=dict(
            r=4,
            lora_alpha=8,
            use_dora=True,
            target_modules=["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"],
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        ),
        scale=8 / 4,
    ),
]

# PEFT resolves "all-linear" to the full dotted names of every nn.Linear except the output
# embedding (lm_head). With fewer than 20 names (peft's MIN_TARGET_MODULES_FOR_OPTIMIZATION)
# it does not shorten them to suffixes, so adapter_config.json lists full module paths.
ALL_LINEAR = sorted(
    f"model.layers.{layer}.{block}.{proj}"
    for layer in range(2)
    for block, projs in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                         ("mlp", ("gate_proj", "up_proj", "down_proj")))
    for proj in projs
)


def adapter_key(param_name, adapter="default"):
    """PEFT parameter name -> key in adapter_model.safetensors (adapter name stripped).

    DoRA: the in-memory `...lora_magnitude_vector.default.weight` is saved as
    `...lora_magnitude_vector` (no `.weight`); checked against the file in build_adapter."""
    key = param_name.replace(f".{adapter}.", ".")
    if key.endswith(MAG + ".weight"):
        key = key[:-len(".weight")]
    return key


def independent_forward(base_ref, saved, scale, ids, mask, labels, dora=False, recompute_magnitude=None):
    """Logits and adapter grads from the plain base model with the effective weight substituted
    via torch.func.functional_call, using only adapter_model.safetensors keys:
      LoRA: W + scale * B @ A
      DoRA: (m / n)[:, None] * (W + scale * B @ A), n = ||W + scale * B @ A||_row (one norm
            per output row, over in_features) detached, i.e. a constant for backward, as in PEFT.
    recompute_magnitude (DoRA only), what a loader that ignores the file's magnitude would do:
      "W":      m = ||W||_row (PEFT's value at creation, when B = 0)
      "W+sBA":  m = ||W + scale * B @ A||_row (DoRA then reduces to plain LoRA)"""
    base = gf.load(BASE_DIR, torch.float64)
    for p in base.parameters():
        p.requires_grad_(False)
    prefix = "base_model.model."
    ab = {k: v.double().requires_grad_(True) for k, v in saved.items()}
    weights = {}
    for k in saved:
        assert k.startswith(prefix) and k.endswith((".lora_A.weight", ".lora_B.weight", MAG)), k
        assert dora or not k.endswith(MAG), k
        if k.endswith(".lora_A.weight"):
            module = k[len(prefix):-len(".lora_A.weight")]
            a, b = ab[k], ab[k.replace(".lora_A.", ".lora_B.")]
            w = base.get_parameter(module + ".weight")
            assert a.shape == (a.shape[0], w.shape[1]) and b.shape == (w.shape[0], a.shape[0]), k
            w_eff = w + scale * (b @ a)
            if dora:
                mag_key = prefix + module + MAG
                mag = ab[mag_key]
                assert mag.shape == (w.shape[0],), mag_key
                norm = torch.linalg.vector_norm(w_eff, dim=1).detach()
                if recompute_magnitude == "W":
                    mag = torch.linalg.vector_norm(w, dim=1)
                elif recompute_magnitude == "W+sBA":
                    mag = norm
                else:
                    assert recompute_magnitude is None, recompute_magnitude
                w_eff = (mag / norm).unsqueeze(1) * w_eff
            weights[module + ".weight"] = w_eff
    out = torch.func.functional_call(base, weights, args=(), kwargs=dict(input_ids=ids, attention_mask=mask),
                                     strict=False)
    loss = gf.f64_loss(out.logits, labels)
    loss.backward()
    return out.logits.detach(), {k: v.grad for k, v in ab.items()}


def build_adapter(spec):
    name = spec["name"]
    out = gf.fresh_dir(os.path.join(OUT_DIR, name))

    base_ref = load_file(os.path.join(BASE_DIR, "reference.safetensors"))
    ids, mask, labels = base_ref["input_ids"], base_ref["attention_mask"], base_ref["labels"]
    m = mask.bool()

    # ---- build the adapter in float32 (as a user would) and save it with PEFT ----
    torch.manual_seed(spec["seed"])  # lora_A: PEFT's kaiming-uniform init from the global RNG
    base32 = gf.load(BASE_DIR, torch.float32)
    cfg = LoraConfig(**spec["config"])
    model = get_peft_model(base32, cfg)
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    n_b = 0
    dora = bool(spec["config"].get("use_dora"))
    n_mag = 0
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if ".lora_B." in pname:
                p.copy_(B_STD * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
                n_b += 1
        if dora:
            # Separate generator: the LoRA / rsLoRA fixtures stay byte-identical.
            gm = torch.Generator().manual_seed(spec["seed"] + 2)
            for pname, p in model.named_parameters():
                if MAG in pname:
                    # At creation (B = 0) PEFT sets m = ||W||_row exactly.
                    w = model.get_submodule(pname.split(MAG)[0]).get_base_layer().weight
                    assert torch.allclose(p, torch.linalg.vector_norm(w, dim=1), rtol=1e-6), pname
                    noise = torch.randn(p.shape, generator=gm, dtype=torch.float64)
                    p.copy_((p.double() * torch.exp(MAG_LOG_STD * noise)).to(p.dtype))
                    n_mag += 1
            assert n_mag == n_b, (n_mag, n_b)
    assert n_b > 0
    # A path relative to the repository root instead of this machine's absolute path.
    model.peft_config["default"].base_model_name_or_path = BASE_REL
    model.save_pretrained(out)
    # PEFT also writes a model-card README.md template; not part of the fixture.
    card = os.path.join(out, "README.md")
    if os.path.exists(card):
        os.remove(card)
    # PEFT writes set-valued fields (target_modules) as list(set): order depends on
    # PYTHONHASHSEED. Sort them so the file is reproducible; keep PEFT's formatting.
    cfg_path = os.path.join(out, "adapter_config.json")
    with open(cfg_path) as f:
        cfg_json = json.load(f)
    if isinstance(cfg_json.get("target_modules"), list):
        cfg_json["target_modules"] = sorted(cfg_json["target_modules"])
    with open(cfg_path, "w") as f:
        f.write(json.dumps(cfg_json, indent=2, sort_keys=True))
        f.write("\n")
    if spec["config"]["target_modules"] == "all-linear":
        assert cfg_json["target_modules"] == ALL_LINEAR, cfg_json["target_modules"]

    saved = load_file(os.path.join(out, "adapter_model.safetensors"))
    with safe_open(os.path.join(out, "adapter_model.safetensors"), "pt") as f:
        saved_meta = f.metadata()
    # The saved tensors are exactly the in-memory LoRA parameters, named without ".default".
    mem = {adapter_key(n): p.detach() for n, p in model.named_parameters() if "lora_" in n}
    assert set(mem) == set(saved), sorted(set(mem) ^ set(saved))
    for k, v in saved.items():
        assert v.dtype == torch.float32, (k, v.dtype)
        assert torch.equal(v, mem[k]), k
        assert ".default." not in k
    assert dora == any(k.endswith(MAG) for k in saved)
    mag_info = sorted((k, v.dtype, tuple(v.shape)) for k, v in saved.items() if k.endswith(MAG))
    del model, base32

    # ---- reload in float64 through PEFT's own loader, forward / loss / backward ----
    base64 = gf.load(BASE_DIR, torch.float64)
    model = PeftModel.from_pretrained(base64, out, is_trainable=True)
    model = model.double()  # LoRA layers are created in float32; widen them (exact)
    model.eval()
    assert model.base_model.model.config._attn_implementation == "eager_f64"
    lora_params = {}
    for pname, p in model.named_parameters():
        if "lora_" in pname:
            assert p.requires_grad, pname
            assert p.dtype == torch.float64, pname
            lora_params[adapter_key(pname)] = p
        else:
            assert not p.requires_grad, pname  # base frozen
    assert set(lora_params) == set(saved)
    for k, p in lora_params.items():
        assert torch.equal(p.detach(), saved[k].double()), k
    # The scaling PEFT uses.
    scales = set()
    for mod in model.modules():
        if hasattr(mod, "scaling") and isinstance(getattr(mod, "scaling"), dict) and "default" in mod.scaling:
            scales.add(mod.scaling["default"])
    assert len(scales) == 1 and abs(scales.pop() - spec["scale"]) < 1e-12

    model.zero_grad(set_to_none=True)
    res = model(input_ids=ids, attention_mask=mask)
    logits = res.logits
    assert logits.dtype == torch.float64
    loss = gf.f64_loss(logits, labels)
    loss.backward()

    # Base model (adapter disabled) must reproduce the base fixture; the adapter must matter.
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(input_ids=ids, attention_mask=mask).logits
    base_diff = (base_logits.float() - base_ref["logits"])[m].abs().max().item()
    assert base_diff < 1e-5, (name, base_diff)
    adapter_effect = (logits.detach().float() - base_ref["logits"])[m].abs().max().item()
    assert adapter_effect > 1e-2, (name, adapter_effect)

    ref = {
        "input_ids": ids.to(torch.int64),
        "attention_mask": mask.to(torch.int64),
        "labels": labels.to(torch.int64),
        "logits": logits.detach().float(),
        "loss": loss.detach().to(torch.float64).reshape(()),
    }
    for k, p in lora_params.items():
        assert p.grad is not None and p.grad.abs().max() > 0, k
        ref["grad." + k] = p.grad.detach().float()

    # ---- independent check of the math: W_eff = W + scale * B @ A, no PEFT forward ----
    indep_logits, indep_grads = independent_forward(base_ref, saved, spec["scale"], ids, mask, labels, dora=dora)
    indep_diff = (indep_logits - logits.detach())[m].abs().max().item()
    assert indep_diff < 1e-6, (name, indep_diff)
    for k, gk in indep_grads.items():
        gp = lora_params[k].grad
        rel = ((gk - gp).abs().max() / gp.abs().max()).item()
        assert rel < 1e-6, (name, k, rel)
    recomputed_effect = {}
    if dora:
        # A loader that recomputes the magnitude instead of reading the file must fail.
        for how in ("W", "W+sBA"):
            rec_logits, _ = independent_forward(base_ref, saved, spec["scale"], ids, mask, labels, dora=True,
                                                recompute_magnitude=how)
            recomputed_effect[how] = (rec_logits - logits.detach())[m].abs().max().item()
            assert recomputed_effect[how] > 1e-1, (name, how, recomputed_effect)

    # ---- merged model ----
    merged = model.merge_and_unload()
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        merged_logits = merged(input_ids=ids, attention_mask=mask).logits
    merge_diff = (merged_logits - logits.detach())[m].abs().max().item()
    assert merge_diff < 1e-9, (name, merge_diff)
    ref["merged_logits"] = merged_logits.float()

    ref = {k: v.contiguous() for k, v in ref.items()}
    save_file(ref, os.path.join(out, "reference.safetensors"), metadata={
        "generator": f"tools/gen_peft_fixture.py peft={peft.__version__} "
                     f"transformers={transformers.__version__} torch={torch.__version__}",
    })

    size = sum(os.path.getsize(os.path.join(out, fn)) for fn in os.listdir(out))
    print(f"{name}: {size} bytes, files {sorted(os.listdir(out))}, {len(saved)} LoRA tensors, "
          f"loss {loss.item():.6f}, adapter effect on logits {adapter_effect:.3g}, "
          f"base diff {base_diff:.2e}, merge diff {merge_diff:.2e}, independent diff {indep_diff:.2e}, safetensors metadata {saved_meta}")
    if dora:
        print(f"  DoRA magnitude tensors: {mag_info}")
        for how, eff in recomputed_effect.items():
            print(f"  logits change if the magnitude is recomputed as ||{how}||_row: {eff:.3g}")
    return size


def main():
    torch.set_num_threads(1)  # bit-reproducible reductions
    torch.use_deterministic_algorithms(True)
    print(f"peft {peft.__version__}, transformers {transformers.__version__}, torch {torch.__version__}")
    os.makedirs(OUT_DIR, exist_ok=True)
    total = sum(build_adapter(spec) for spec in ADAPTERS)
    print(f"total: {total} bytes")


if __name__ == "__main__":
    sys.exit(main())
