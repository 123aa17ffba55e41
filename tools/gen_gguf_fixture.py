#!/usr/bin/env python3
"""Write a tiny GGUF file covering several metadata value types and tensor types.

    /work/venv/bin/python tools/gen_gguf_fixture.py

Output (tests/fixtures/gguf/):
  tiny_types.gguf   written with gguf-py's GGUFWriter, quantised with gguf.quants.quantize
  tiny_types.json   metadata (key, GGUF value type, value) and, per tensor, its name, GGML type,
                    shape in row-major / PyTorch order (GGUF lists dims the other way round:
                    ne0 = last PyTorch dim, see "gguf_ne") and the dequantised values as
                    gguf.quants.dequantize returns them, flattened in row-major order.
Deterministic (fixed numpy seed).
"""

import json
import os

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "gguf")
ARCH = "tiny"

METADATA = [
    # key, GGUFValueType, value, array subtype
    (f"{ARCH}.block_count", gguf.GGUFValueType.UINT32, 2, None),
    (f"{ARCH}.rope.freq_base", gguf.GGUFValueType.FLOAT32, 10000.0, None),
    (f"{ARCH}.attention.layer_norm_rms_epsilon", gguf.GGUFValueType.FLOAT32, 1e-5, None),
    (f"{ARCH}.context_length", gguf.GGUFValueType.UINT64, 4096, None),
    (f"{ARCH}.offset", gguf.GGUFValueType.INT32, -7, None),
    (f"{ARCH}.scale", gguf.GGUFValueType.FLOAT64, 0.125, None),
    (f"{ARCH}.flag_true", gguf.GGUFValueType.BOOL, True, None),
    (f"{ARCH}.flag_false", gguf.GGUFValueType.BOOL, False, None),
    ("general.name", gguf.GGUFValueType.STRING, "tiny types ✓ (ünïcode)", None),
    ("tokenizer.ggml.tokens", gguf.GGUFValueType.ARRAY, ["<unk>", "<s>", "</s>", "hello", " wörld", "🦀", ""],
     gguf.GGUFValueType.STRING),
    ("tokenizer.ggml.token_type", gguf.GGUFValueType.ARRAY, [2, 3, 3, 1, 1, 1, 1], gguf.GGUFValueType.INT32),
    ("tokenizer.ggml.scores", gguf.GGUFValueType.ARRAY, [0.0, -1.5, -2.25, 0.5, 1.0, -0.125, 3.0],
     gguf.GGUFValueType.FLOAT32),
]

# name, GGML type, row-major shape, generator
TENSORS = [
    ("f32_1d", Q.F32, (10,), "normal"),
    ("f32_2d", Q.F32, (3, 5), "normal"),
    ("f32_3d", Q.F32, (2, 3, 4), "normal"),
    ("f16_2d", Q.F16, (2, 7), "normal"),
    ("bf16_2d", Q.BF16, (4, 8), "normal"),
    ("q8_0_2x64", Q.Q8_0, (2, 64), "normal"),
    ("q8_0_3x32", Q.Q8_0, (3, 32), "wide"),
    ("q4_0_3x32", Q.Q4_0, (3, 32), "normal"),
    ("q4_0_2x64", Q.Q4_0, (2, 64), "wide"),
    ("q4_1_2x64", Q.Q4_1, (2, 64), "offset"),
    ("q4_1_3x32", Q.Q4_1, (3, 32), "normal"),
    ("q4_1_2x2x32", Q.Q4_1, (2, 2, 32), "offset"),
]


def make_data(rng, shape, kind):
    if kind == "normal":
        x = rng.standard_normal(shape)
    elif kind == "wide":
        x = rng.standard_normal(shape) * np.exp(rng.uniform(-3, 3, shape))
    else:  # "offset": all positive, so the Q4_1 minimum m is far from 0
        x = rng.uniform(0.5, 2.0, shape)
    return x.astype(np.float32)


def main():
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "tiny_types.gguf")
    rng = np.random.default_rng(20240601)

    w = gguf.GGUFWriter(path, ARCH)
    meta_json = [{"key": "general.architecture", "type": "STRING", "value": ARCH}]
    for key, vtype, val, sub in METADATA:
        w.add_key_value(key, val, vtype, sub_type=sub)
        jval = val
        if vtype == gguf.GGUFValueType.FLOAT32:
            jval = float(np.float32(val))
        elif sub == gguf.GGUFValueType.FLOAT32:
            jval = [float(np.float32(v)) for v in val]
        entry = {"key": key, "type": vtype.name, "value": jval}
        if sub is not None:
            entry["item_type"] = sub.name
        meta_json.append(entry)

    tensors_json = []
    for name, qtype, shape, kind in TENSORS:
        x = make_data(rng, shape, kind)
        q = gguf.quants.quantize(x, qtype)
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(name, q)
        else:
            w.add_tensor(name, q, raw_dtype=qtype)
        deq = gguf.quants.dequantize(q, qtype).astype(np.float32).reshape(shape)
        tensors_json.append({
            "name": name,
            "type": qtype.name,
            "shape": list(shape),
            "gguf_ne": list(reversed(shape)),
            "nbytes": int(q.nbytes),
            "values": [float(v) for v in deq.reshape(-1)],
        })

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    # Read back with gguf-py and check types, shapes and values.
    r = gguf.GGUFReader(path)
    by_name = {t.name: t for t in r.tensors}
    for t in tensors_json:
        rt = by_name[t["name"]]
        assert rt.tensor_type.name == t["type"], (t["name"], rt.tensor_type.name)
        assert [int(d) for d in rt.shape] == t["gguf_ne"], (t["name"], rt.shape)
        back = gguf.quants.dequantize(np.asarray(rt.data), rt.tensor_type).reshape(-1)
        assert np.array_equal(back.astype(np.float32), np.float32(t["values"])), t["name"]
    for m in meta_json:
        f = r.fields[m["key"]]
        got = f.contents()
        if m["type"] == "FLOAT32":
            assert np.float32(got) == np.float32(m["value"]), (m, got)
        elif m["type"] == "ARRAY" and m.get("item_type") == "FLOAT32":
            assert np.array_equal(np.float32(got), np.float32(m["value"])), (m, got)
        else:
            assert got == m["value"], (m, got)

    doc = {
        "generator": "tools/gen_gguf_fixture.py",
        "gguf_py_version": getattr(gguf, "__version__", None) or _pkg_version("gguf"),
        "gguf_version": 3,
        "alignment": 32,
        "notes": ("metadata in file order after general.architecture; tensors in file order; 'shape' is "
                  "row-major (PyTorch) order, 'gguf_ne' the GGUF dims (ne0 first); 'values' are "
                  "gguf.quants.dequantize output flattened row-major. FLOAT32 metadata values are "
                  "written as the exact float32 value in decimal."),
        "metadata": meta_json,
        "tensors": tensors_json,
    }
    with open(os.path.join(OUT, "tiny_types.json"), "w") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")
    for fn in ("tiny_types.gguf", "tiny_types.json"):
        print(fn, os.path.getsize(os.path.join(OUT, fn)), "bytes")


def _pkg_version(name):
    from importlib.metadata import version
    return version(name)


if __name__ == "__main__":
    main()
