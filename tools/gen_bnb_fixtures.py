#!/usr/bin/env python3
"""Generate bitsandbytes NF4/FP4 golden fixtures for temper's 4-bit code.

Two outputs, both produced by the real `bitsandbytes` package on CPU (no GPU):

1. tests/fixtures/quant/cases.safetensors + cases.json
   Blockwise 4-bit quantisation cases (NF4 and FP4, several block sizes,
   edge cases, double quantisation).  Everything comes from
   `bitsandbytes.functional.quantize_4bit` / `dequantize_4bit`.

2. tests/fixtures/models/llama_bnb4bit/
   The committed float32 fixture `llama_gqa_llama3rope` loaded by
   transformers with BitsAndBytesConfig(nf4, double quant, fp32 compute) and
   written back with `save_pretrained` (pre-quantised bnb-4bit checkpoint),
   plus reference.safetensors with logits of the 4-bit model and the
   dequantised weight of every Linear4bit.

Run from the repository root:

    /work/venv/bin/python tools/gen_bnb_fixtures.py

See tests/fixtures/quant/README.md for the format of the outputs.
"""

import json
import os
import shutil
import sys

import numpy as np
import torch
import bitsandbytes as bnb
import bitsandbytes.functional as BF
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUANT_DIR = os.path.join(ROOT, "tests", "fixtures", "quant")
BASE_MODEL = os.path.join(ROOT, "tests", "fixtures", "models", "llama_gqa_llama3rope")
BNB_MODEL = os.path.join(ROOT, "tests", "fixtures", "models", "llama_bnb4bit")

SEED = 4242


def reference_dequant_4bit(A, absmax, blocksize, quant_type, shape, dtype):
    """bitsandbytes' default-backend dequantize_4bit (backends/default/ops.py),
    written out without torch.compile: out[i] = code[q_i] * absmax[i // blocksize]
    in float32 over the row-major flat index, high nibble first."""
    A = A.reshape(-1)
    if A.dtype != torch.uint8:
        A = A.view(torch.uint8)
    code = BF.get_4bit_type(quant_type, device="cpu").float()
    n = 1
    for d in shape:
        n *= d
    q = torch.stack([A >> 4, A & 0xF], 1).reshape(-1)[:n].long()
    blk = torch.arange(n) // blocksize
    out = code[q] * absmax.float()[blk]
    return out.reshape(*shape).to(dtype)


def install_reference_cpu_dequant():
    """bitsandbytes 0.50.2's native CPU dequantize_4bit kernel (AVX512 path,
    `cdequantize_blockwise_cpu_nf4_fp32`) gives wrong values when a 64-block
    crosses a row boundary (e.g. shape [32, 48] or any Linear with
    in_features < blocksize); the quantiser, the default backend and CUDA all
    block over the flat row-major index.  Route the CPU dispatch key to the
    reference implementation so every dequant (and Linear4bit forward) here
    follows the format spec."""
    torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", reference_dequant_4bit)


def reference_quantize_blockwise(A, code, blocksize):
    """bitsandbytes' default-backend quantize_blockwise (backends/default/ops.py), the 8-bit
    quantiser double quantisation uses: nearest code by `bucketize` on the f32 midpoints (ties go
    low), x * (1/absmax) in full blocks, x / absmax in a partial last block. This is the CUDA
    semantics (nearest code); bitsandbytes 0.50.2's native CPU kernel instead looks the scaled value
    up in a 65536-entry table over [-1, 1], which picks a neighbouring code when the value lies
    within half a table step of a midpoint."""
    A_flat = A.reshape(-1).float()
    n = A_flat.numel()
    rem = n % blocksize
    full = n - rem
    A_com = A_flat[:full].reshape(full // blocksize, blocksize)
    absmax = A_com.abs().max(dim=-1)[0]
    scaled = torch.clamp(A_com * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        am = A_flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(A_flat[full:] / am, -1, 1)])
    bounds = (code[:-1] + code[1:]) / 2
    q = torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)
    return q.reshape(A.shape), absmax


def install_reference_cpu_quantize_blockwise():
    torch.library.register_kernel("bitsandbytes::quantize_blockwise", "cpu", reference_quantize_blockwise)




def nf4_midpoints():
    """The 15 float32 midpoints bitsandbytes' default backend bucketizes on."""
    code = BF.get_4bit_type("nf4", device="cpu").float()
    return (code[:-1] + code[1:]) / 2


def ties_input():
    """Two blocks of 64 whose scaled values land exactly on NF4 midpoints.

    Block 0 has absmax 1.0 (reciprocal 1.0), block 1 absmax 2.0 (reciprocal
    0.5): x * (1/absmax) is then exact in float32 and equals the midpoint,
    so the strict-`>` rule (ties go to the lower code) decides every value.
    """
    mids = nf4_midpoints()
    blocks = []
    for scale in (1.0, 2.0):
        b = torch.zeros(64)
        b[0] = scale  # absmax of the block
        b[1:16] = mids * scale
        b[16:31] = -(mids * scale)  # negated midpoints (also ties, mirrored)
        b[31] = -scale
        # next float32 above / below each midpoint (breaks the tie either way)
        up = torch.from_numpy(np.nextafter(mids.numpy(), np.float32(2.0)))
        dn = torch.from_numpy(np.nextafter(mids.numpy(), np.float32(-2.0)))
        b[32:47] = up * scale
        b[47:62] = dn * scale
        b[62] = 0.0
        b[63] = -0.0
        blocks.append(b)
    return torch.cat(blocks)


def build_cases():
    g = torch.Generator().manual_seed(SEED)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32)

    zero_block = randn(4, 64)
    zero_block[1] = 0.0  # the whole second block is zero
    zero_block[3, :10] = 0.0

    cases = [
        # name, quant_type, blocksize, input, double_quant
        ("nf4_bs64_randn", "nf4", 64, randn(32, 48), False),
        ("nf4_bs64_zero_block", "nf4", 64, zero_block, False),
        ("nf4_bs64_odd75", "nf4", 64, randn(75) * 3.0, False),
        ("nf4_bs64_partial100", "nf4", 64, randn(100) * 0.05, False),
        ("nf4_bs32", "nf4", 32, randn(8, 40), False),
        ("nf4_bs128", "nf4", 128, randn(6, 70), False),
        ("nf4_bs256", "nf4", 256, randn(5, 130), False),
        ("fp4_bs64", "fp4", 64, randn(16, 40), False),
        ("fp4_bs64_odd75", "fp4", 64, randn(75), False),
        ("nf4_bs64_ties", "nf4", 64, ties_input(), False),
        # 96*400 = 38400 values = 600 blocks of 64 -> nested blocks 256, 256, 88
        ("nf4_bs64_dq600", "nf4", 64, randn(96, 400) * 0.02, True),
    ]
    return cases


def gen_cases():
    os.makedirs(QUANT_DIR, exist_ok=True)
    tensors = {
        "quant_map.nf4": BF.get_4bit_type("nf4", device="cpu").float().contiguous(),
        "quant_map.fp4": BF.get_4bit_type("fp4", device="cpu").float().contiguous(),
    }
    meta = []
    cases = build_cases()
    quantised = []
    native = []
    for name, qt, bs, x, dq in cases:
        x = x.contiguous()
        packed, st = BF.quantize_4bit(
            x, blocksize=bs, quant_type=qt, compress_statistics=dq, quant_storage=torch.uint8
        )
        quantised.append((packed, st))
        native.append(BF.dequantize_4bit(packed, st).reshape(-1).clone())  # bnb native CPU kernel
    install_reference_cpu_dequant()
    install_reference_cpu_quantize_blockwise()
    for (name, qt, bs, x, dq), (packed, st), nat in zip(cases, quantised, native):
        x = x.contiguous()
        native_nested_codes = st.absmax.clone() if dq else None
        if dq:
            # Re-quantise with the reference 8-bit quantiser (the 4-bit part is unchanged).
            packed2, st = BF.quantize_4bit(
                x, blocksize=bs, quant_type=qt, compress_statistics=dq, quant_storage=torch.uint8
            )
            assert torch.equal(packed2, packed), name
        deq = BF.dequantize_4bit(packed, st)
        assert packed.dtype == torch.uint8 and tuple(packed.shape) == ((x.numel() + 1) // 2, 1)
        # bnb's CPU dequant kernel returns [1, n] for a 1-D input; keep the input's shape
        assert deq.dtype == torch.float32 and deq.numel() == x.numel(), (deq.shape, x.shape)
        deq = deq.reshape(x.shape)
        nblocks = (x.numel() + bs - 1) // bs
        tensors[f"{name}.input"] = x
        tensors[f"{name}.packed"] = packed.reshape(-1).contiguous()
        tensors[f"{name}.dequant"] = deq.contiguous()
        entry = {
            "name": name,
            "quant_type": qt,
            "blocksize": bs,
            "numel": x.numel(),
            "shape": list(x.shape),
            "nblocks": nblocks,
            "double_quant": dq,
            "native_cpu_dequant_mismatches": int((nat != deq.reshape(-1)).sum()),
        }
        if dq:
            assert st.absmax.dtype == torch.uint8 and st.absmax.numel() == nblocks
            tensors[f"{name}.absmax"] = st.absmax.contiguous()
            tensors[f"{name}.nested_absmax"] = st.state2.absmax.float().contiguous()
            tensors[f"{name}.nested_quant_map"] = st.state2.code.float().contiguous()
            tensors[f"{name}.offset"] = st.offset.reshape(1).float().contiguous()
            # absmax as bitsandbytes reconstructs it (dyn8[q] * nested_absmax + offset)
            tensors[f"{name}.absmax_dequant"] = (
                BF.dequantize_blockwise(st.absmax, st.state2) + st.offset
            ).float().contiguous()
            entry["nested_blocksize"] = st.state2.blocksize
            entry["nested_nblocks"] = st.state2.absmax.numel()
            entry["offset"] = float(st.offset)
            entry["native_cpu_nested_code_mismatches"] = int((native_nested_codes != st.absmax).sum())
        else:
            assert st.absmax.dtype == torch.float32 and st.absmax.numel() == nblocks
            tensors[f"{name}.absmax"] = st.absmax.contiguous()
        meta.append(entry)

    # Self-checks of the properties the Rust side relies on.
    nf4 = tensors["quant_map.nf4"]
    for e in meta:
        n, name = e["numel"], e["name"]
        p = tensors[f"{name}.packed"]
        codes = torch.stack([p >> 4, p & 0xF], 1).reshape(-1)
        if n % 2:
            # padding value 0.0: nf4 code 7, fp4 code 0
            assert int(codes[-1]) == (7 if e["quant_type"] == "nf4" else 0), name
        if not e["double_quant"]:
            qm = tensors[f"quant_map.{e['quant_type']}"]
            am = tensors[f"{name}.absmax"]
            blk = torch.arange(n) // e["blocksize"]
            recon = qm[codes[:n].long()] * am[blk]
            assert torch.equal(recon, tensors[f"{name}.dequant"].reshape(-1)), name
    # ties: every exact midpoint goes to the lower code
    t = tensors["nf4_bs64_ties.packed"]
    codes = torch.stack([t >> 4, t & 0xF], 1).reshape(-1)
    for b in range(2):
        c = codes[b * 64 : (b + 1) * 64]
        assert c[1:16].tolist() == list(range(0, 15)), c[1:16]
        assert c[32:47].tolist() == list(range(1, 16)), c[32:47]
        assert c[47:62].tolist() == list(range(0, 15)), c[47:62]
    del nf4

    path = os.path.join(QUANT_DIR, "cases.safetensors")
    save_file(tensors, path, metadata={"bitsandbytes": bnb.__version__, "torch": torch.__version__})
    doc = {
        "bitsandbytes_version": bnb.__version__,
        "torch_version": torch.__version__,
        "generator": "tools/gen_bnb_fixtures.py",
        "device": "cpu",
        "seed": SEED,
        "cases": meta,
    }
    with open(os.path.join(QUANT_DIR, "cases.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes), {len(meta)} cases")


def disable_cpu_repack(model):
    """On CPUs with AVX512-BF16, Linear4bit's inference forward repacks the
    weight into a CPU-only layout that assumes in_features % blocksize == 0
    (it fails for this model's in_features=32 < 64).  Use the generic
    dequantize + matmul path instead."""
    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            mod.support_avx512bf16_for_cpu = False


def gen_model():
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        BASE_MODEL, quantization_config=cfg, device_map="cpu", attn_implementation="eager"
    )
    model.eval()
    disable_cpu_repack(model)
    readme = os.path.join(BNB_MODEL, "README.md")
    kept = open(readme).read() if os.path.exists(readme) else None
    if os.path.isdir(BNB_MODEL):
        shutil.rmtree(BNB_MODEL)
    model.save_pretrained(BNB_MODEL)
    if kept is not None:  # the hand-written description of this fixture
        with open(readme, "w") as f:
            f.write(kept)

    with safe_open(os.path.join(BASE_MODEL, "reference.safetensors"), "pt") as f:
        input_ids = f.get_tensor("input_ids")
        attention_mask = f.get_tensor("attention_mask")

    ref = {"input_ids": input_ids, "attention_mask": attention_mask}
    with torch.no_grad():
        ref["logits"] = model(input_ids=input_ids, attention_mask=attention_mask).logits.float().contiguous()
    linears = []
    for name, mod in model.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            w = BF.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float().contiguous()
            ref[f"dequant.{name}.weight"] = w
            linears.append(name)
    save_file(ref, os.path.join(BNB_MODEL, "reference.safetensors"))

    # Cross-check: the float32 base model with each Linear weight replaced by its
    # dequantised value must give the same logits as the 4-bit model.
    base = AutoModelForCausalLM.from_pretrained(BASE_MODEL, dtype=torch.float32, attn_implementation="eager")
    base.eval()
    sd = base.state_dict()
    for name in linears:
        sd[f"{name}.weight"] = ref[f"dequant.{name}.weight"]
    base.load_state_dict(sd)
    with torch.no_grad():
        l_base = base(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    err = (l_base - ref["logits"]).abs().max().item()
    print(f"4-bit logits vs float model with dequantised weights: max abs diff {err:.3g}")
    assert err < 1e-4, err

    # Round trip: reload the saved pre-quantised checkpoint and compare logits.
    reloaded = AutoModelForCausalLM.from_pretrained(BNB_MODEL, device_map="cpu", attn_implementation="eager")
    reloaded.eval()
    disable_cpu_repack(reloaded)
    with torch.no_grad():
        l2 = reloaded(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    assert torch.equal(l2, ref["logits"]), (l2 - ref["logits"]).abs().max()

    keys = []
    with safe_open(os.path.join(BNB_MODEL, "model.safetensors"), "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            keys.append({"key": k, "dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape)})
    info = {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "bitsandbytes_version": bnb.__version__,
        "base_fixture": "llama_gqa_llama3rope",
        "description": "llama_gqa_llama3rope quantised by transformers+bitsandbytes on CPU "
        "(nf4, blocksize 64, double quant, fp32 compute) and saved with save_pretrained. "
        "lm_head and embeddings stay float32 (transformers skips them). "
        "reference.safetensors: logits of the 4-bit model (eager attention, fp32) for the base "
        "fixture's input_ids/attention_mask, and dequant.<module>.weight for each Linear4bit.",
        "linear4bit_modules": linears,
        "model_safetensors_keys": keys,
    }
    with open(os.path.join(BNB_MODEL, "fixture.json"), "w") as f:
        json.dump(info, f, indent=1)
        f.write("\n")
    print(f"wrote {BNB_MODEL}: {len(linears)} Linear4bit modules")


def main():
    torch.manual_seed(SEED)
    gen_cases()  # installs the reference CPU dequant (see install_reference_cpu_dequant)
    if "--cases-only" not in sys.argv:
        gen_model()


if __name__ == "__main__":
    main()
