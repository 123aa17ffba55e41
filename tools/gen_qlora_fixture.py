#!/usr/bin/env python3
"""QLoRA parity fixture: a PEFT LoRA adapter on a frozen bitsandbytes NF4 base, with PEFT's outputs.

The base is tests/fixtures/models/llama_bnb4bit (the tiny Llama `llama_gqa_llama3rope` saved by
transformers in bnb-4bit form: NF4, blocksize 64, double quant, float32 compute; see
tools/gen_bnb_fixtures.py). Everything runs on CPU with bitsandbytes 0.50.2 / PEFT 0.21.2 /
transformers 5.24, in float32, as a user's QLoRA run would:

  1. load the bnb-4bit folder with transformers (Linear4bit layers), `get_peft_model` with
     LoraConfig(r=4, lora_alpha=8, all 7 projections, dropout 0); lora_A keeps PEFT's
     kaiming-uniform init (seeded global RNG), every lora_B is overwritten with N(0, 0.2) (seeded)
     so the adapter changes the output; `save_pretrained`.
  2. reload: a fresh bnb-4bit model, `prepare_model_for_kbit_training` (the QLoRA recipe:
     base frozen, input grads, gradient checkpointing), `PeftModel.from_pretrained(...,
     is_trainable=True)`, train mode; forward with labels, transformers' loss, backward.
  3. checks (nothing of this is stored): the same without gradient checkpointing in eval mode
     gives the same logits / gradients; the adapter switched off gives llama_bnb4bit's reference
     logits; and an independent float64 computation (the dense base in float64 with each linear
     weight replaced by bitsandbytes' dequantised W4 plus scale * B @ A, via
     torch.func.functional_call) agrees with PEFT's float32 results to the float32 noise floor,
     which is printed.

bitsandbytes 0.50.2's native CPU 4-bit dequant kernel and the AVX512 weight-repack path are wrong
when a 64-block crosses a row (this model's in_features is 32); as in gen_bnb_fixtures.py the CPU
dequant is routed to bitsandbytes' reference (default-backend) semantics and the repack is
disabled on every Linear4bit. The forward then goes through bitsandbytes' default `gemm_4bit`
(dequantise + linear) and its backward through `MatMul4Bit` (grad_x = grad_y @ dequant(W)).

Run from the repository root:

    /work/venv/bin/python tools/gen_qlora_fixture.py

Writes tests/fixtures/adapters/llama_qlora/:
  adapter_config.json, adapter_model.safetensors   PEFT's save_pretrained (base_model_name_or_path
                                                   made repo-relative, target_modules sorted)
  reference.safetensors   input_ids, attention_mask, labels (I64 [2, 12]), logits (F32
                          [2, 12, 128]), loss (F64 []), grad.<adapter key> (F32) for all 28
                          lora_A / lora_B tensors, under adapter_model.safetensors' key names
The README.md in that folder is hand-written and kept. Nothing is downloaded; deterministic.
"""

import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_bnb_fixtures as gb  # noqa: E402
import gen_fixtures as gf  # noqa: E402  (also registers the `eager_f64` attention)

import bitsandbytes as bnb  # noqa: E402
import peft  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

BNB_REL = os.path.join("tests", "fixtures", "models", "llama_bnb4bit")
BNB_DIR = os.path.join(gf.ROOT, BNB_REL)
BASE_DIR = os.path.join(gf.ROOT, "tests", "fixtures", "models", "llama_gqa_llama3rope")
OUT = os.path.join(gf.ROOT, "tests", "fixtures", "adapters", "llama_qlora")
SEED = 2101
R, ALPHA = 4, 8
SCALE = ALPHA / R
B_STD = 0.2
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PREFIX = "base_model.model."


def adapter_key(param_name):
    """PEFT's in-memory name -> adapter_model.safetensors key (`.default` stripped)."""
    return param_name.replace(".default.", ".")


def load_bnb():
    """The pre-quantised checkpoint as transformers loads it: Linear4bit layers, fp32 compute."""
    model = AutoModelForCausalLM.from_pretrained(BNB_DIR, device_map="cpu", attn_implementation="eager")
    gb.disable_cpu_repack(model)
    n = 0
    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            st = mod.weight.quant_state
            assert st.quant_type == "nf4" and st.blocksize == 64 and st.nested, st
            assert mod.compute_dtype == torch.float32
            n += 1
    assert n == 14, n
    return model


def peft_run(out, ids, mask, labels, recipe):
    """PEFT + bitsandbytes on the saved adapter: logits, loss, {key: grad}.

    recipe=True: prepare_model_for_kbit_training (gradient checkpointing) and train mode, as a
    QLoRA training run; False: plain PeftModel in eval mode."""
    model = load_bnb()
    if recipe:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    model = PeftModel.from_pretrained(model, out, is_trainable=True)
    if recipe:
        model.train()
        assert model.base_model.model.is_activation_checkpointing
    else:
        model.eval()
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoraLinear4bit)]
    assert len(adapted) == 14, adapted
    for n in adapted:
        m = model.get_submodule(n)
        assert isinstance(m.get_base_layer(), bnb.nn.Linear4bit), n
        assert m.scaling["default"] == SCALE and isinstance(m.lora_dropout["default"], torch.nn.Identity), n
    params = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.dtype == torch.float32, name
            params[adapter_key(name)] = p
        else:
            assert not p.requires_grad, name  # base frozen (4-bit weights, embeddings, norms, lm_head)
    model.zero_grad(set_to_none=True)
    res = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert res.logits.dtype == torch.float32
    res.loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in params.items()}
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(input_ids=ids, attention_mask=mask).logits
    return model, res.logits.detach(), res.loss.detach(), grads, base_logits


def independent_f64(saved, ids, mask, labels, dequant):
    """Float64 truth from the dense base: W = dequant(W4) (bitsandbytes' values) + SCALE * B @ A."""
    base = gf.load(BASE_DIR, torch.float64)
    for p in base.parameters():
        p.requires_grad_(False)
    ab = {k: v.double().requires_grad_(True) for k, v in saved.items()}
    weights = {}
    for k in saved:
        if k.endswith(".lora_A.weight"):
            module = k[len(PREFIX):-len(".lora_A.weight")]
            a, b = ab[k], ab[k.replace(".lora_A.", ".lora_B.")]
            weights[module + ".weight"] = dequant[f"dequant.{module}.weight"].double() + SCALE * (b @ a)
    assert len(weights) == 14
    out = torch.func.functional_call(base, weights, args=(), kwargs=dict(input_ids=ids, attention_mask=mask), strict=False)
    loss = gf.f64_loss(out.logits, labels)
    loss.backward()
    return out.logits.detach(), loss.detach(), {k: v.grad for k, v in ab.items()}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main():
    torch.set_num_threads(1)  # bit-reproducible reductions
    torch.use_deterministic_algorithms(True)
    gb.install_reference_cpu_dequant()
    print(f"peft {peft.__version__}, transformers {transformers.__version__}, torch {torch.__version__}, "
          f"bitsandbytes {bnb.__version__}")

    bnb_ref = load_file(os.path.join(BNB_DIR, "reference.safetensors"))
    base_ref = load_file(os.path.join(BASE_DIR, "reference.safetensors"))
    ids, mask = bnb_ref["input_ids"], bnb_ref["attention_mask"]
    assert torch.equal(ids, base_ref["input_ids"]) and torch.equal(mask, base_ref["attention_mask"])
    labels = base_ref["labels"]
    m = mask.bool()

    # README.md is hand-written: keep it across regeneration.
    readme = os.path.join(OUT, "README.md")
    kept = open(readme).read() if os.path.exists(readme) else None
    gf.fresh_dir(OUT)
    if kept is not None:
        with open(readme, "w") as f:
            f.write(kept)

    # ---- 1. build the adapter on the 4-bit base and save it with PEFT ----
    torch.manual_seed(SEED)  # lora_A: PEFT's kaiming-uniform init from the global RNG
    model = get_peft_model(load_bnb(), LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        n_b = 0
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(B_STD * torch.randn(p.shape, generator=g, dtype=torch.float64).float())
                n_b += 1
    assert n_b == 14
    model.peft_config["default"].base_model_name_or_path = BNB_REL
    model.save_pretrained(OUT)
    mem = {adapter_key(n): p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    del model
    if kept is not None:  # PEFT wrote its model-card template over it
        with open(readme, "w") as f:
            f.write(kept)
    else:
        os.remove(readme)
    cfg_path = os.path.join(OUT, "adapter_config.json")
    with open(cfg_path) as f:
        cfg_json = json.load(f)
    cfg_json["target_modules"] = sorted(cfg_json["target_modules"])  # PEFT writes list(set)
    assert cfg_json["target_modules"] == sorted(TARGETS), cfg_json["target_modules"]
    assert cfg_json["r"] == R and cfg_json["lora_alpha"] == ALPHA and not cfg_json["use_rslora"]
    with open(cfg_path, "w") as f:
        f.write(json.dumps(cfg_json, indent=2, sort_keys=True))
        f.write("\n")
    saved = load_file(os.path.join(OUT, "adapter_model.safetensors"))
    assert set(saved) == set(mem) and len(saved) == 28, sorted(set(saved) ^ set(mem))
    for k, v in saved.items():
        assert v.dtype == torch.float32 and torch.equal(v, mem[k]), k

    # ---- 2. PEFT + bitsandbytes, the QLoRA recipe: the reference ----
    _, logits, loss, grads, base_logits = peft_run(OUT, ids, mask, labels, recipe=True)
    assert set(grads) == set(saved)
    for k, gk in grads.items():
        assert gk.abs().max() > 0, k
    base_diff = (base_logits - bnb_ref["logits"])[m].abs().max().item()
    assert base_diff == 0.0, base_diff
    effect = (logits - bnb_ref["logits"])[m].abs().max().item()
    assert effect > 1e-2, effect
    loss64 = gf.f64_loss(logits.double(), labels)
    assert abs(loss64.item() - loss.item()) < 1e-5

    # ---- 3a. without gradient checkpointing, eval mode: the same numbers ----
    _, logits2, loss2, grads2, _ = peft_run(OUT, ids, mask, labels, recipe=False)
    plain_diff = max([(logits2 - logits).abs().max().item(), abs(loss2.item() - loss.item())]
                     + [rel(grads2[k], grads[k]) for k in grads])
    assert plain_diff < 1e-6, plain_diff

    # ---- 3b. independent float64 computation: PEFT's float32 error ----
    l64, loss_f64, g64 = independent_f64(saved, ids, mask, labels, bnb_ref)
    logit_err = (logits.double() - l64)[m].abs().max().item()
    loss_err = abs(loss.item() - loss_f64.item())
    grad_err = max(rel(grads[k], g64[k]) for k in grads)
    print(f"PEFT+bnb fp32 vs float64 truth: max |dlogit| {logit_err:.2e}, |dloss| {loss_err:.2e}, "
          f"max gradient relative error {grad_err:.2e}")
    assert logit_err < 1e-4 and loss_err < 1e-5 and grad_err < 1e-4, (logit_err, loss_err, grad_err)

    ref = {
        "input_ids": ids.to(torch.int64),
        "attention_mask": mask.to(torch.int64),
        "labels": labels.to(torch.int64),
        "logits": logits.float(),
        "loss": loss.to(torch.float64).reshape(()),
    }
    for k, gk in sorted(grads.items()):
        ref["grad." + k] = gk.float()
    ref = {k: v.contiguous() for k, v in ref.items()}
    save_file(ref, os.path.join(OUT, "reference.safetensors"), metadata={
        "generator": f"tools/gen_qlora_fixture.py peft={peft.__version__} transformers={transformers.__version__} "
                     f"torch={torch.__version__} bitsandbytes={bnb.__version__}",
    })
    size = sum(os.path.getsize(os.path.join(OUT, fn)) for fn in os.listdir(OUT))
    print(f"llama_qlora: {size} bytes, files {sorted(os.listdir(OUT))}, {len(saved)} LoRA tensors, "
          f"loss {loss.item():.6f} (float64 from the same logits {loss64.item():.6f}), adapter effect on "
          f"logits {effect:.3g}, adapter off vs llama_bnb4bit logits {base_diff:.1e}, "
          f"no-checkpointing/eval run vs recipe run {plain_diff:.1e}")


if __name__ == "__main__":
    sys.exit(main())
