#!/usr/bin/env python3
"""Reference outputs of SmolLM2-135M-Instruct (Q4_1 GGUF) computed with transformers.

Run from the repository root after scripts/fetch-assets.sh:

    /work/venv/bin/python tools/smollm2_reference.py [--gguf assets/SmolLM2-135M-Instruct.Q4_1.gguf]

Writes:
  tests/fixtures/smollm2_greedy.json  greedy generations (chat prompt and a raw prompt)
  tests/fixtures/smollm2_checks.json  tokenizer encodings, a few dequantised weights,
                                      first logits at the end of the chat prompt

transformers dequantises the GGUF to float32 (and un-permutes attn_q / attn_k,
see below); everything here runs in float32 on the CPU. One Q4_1 value and one
Q8_0 value are also dequantised by hand from the file bytes with a GGUF header
parser written here, independent of transformers and of gguf-py.
"""

import argparse
import hashlib
import json
import os
import struct
import sys

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_GGUF = os.path.join(ROOT, "assets", "SmolLM2-135M-Instruct.Q4_1.gguf")
FIX = os.path.join(ROOT, "tests", "fixtures")

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
CHAT_NEW_TOKENS = 40
RAW_PROMPT = "The quick brown fox"
RAW_NEW_TOKENS = 20

TOKENIZER_SAMPLES = [
    "Hello, world!",
    "The year 2024 had 12345 visitors and 3.14159 pies; call 0800-555-0199.",
    "def add(a, b):\n    return a + b  # sum\n",
    "  leading and    multiple   spaces\t\ttabs\n\n\nnewlines  ",
    "Ünïcödé façade — naïve café, 東京, Привет мир",
    "Emoji: 🦀🔥👍🏽 done 🇫🇷",
    "don't I'll we've THEY'RE o'clock",
    "<|im_start|>user\nHi<|im_end|>",
]

# ---------------------------------------------------------------------------
# Minimal GGUF reader (header + tensor directory) and Q4_1 / Q8_0 decoding.
# ---------------------------------------------------------------------------

GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q4_1, GGML_Q8_0 = 0, 1, 2, 3, 8
# (block elements, block bytes)
BLOCK = {GGML_Q4_0: (32, 18), GGML_Q4_1: (32, 20), GGML_Q8_0: (32, 34), GGML_F32: (1, 4), GGML_F16: (1, 2)}


class Cursor:
    def __init__(self, buf):
        self.buf = buf
        self.pos = 0

    def take(self, fmt):
        vals = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return vals[0] if len(vals) == 1 else vals

    def string(self):
        n = self.take("Q")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8")
        self.pos += n
        return s

    def value(self, vtype):
        scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
        if vtype in scalar:
            return self.take(scalar[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            item_type = self.take("I")
            n = self.take("Q")
            return [self.value(item_type) for _ in range(n)]
        raise ValueError(f"unknown GGUF value type {vtype}")


def read_gguf_directory(path):
    with open(path, "rb") as f:
        buf = memoryview(f.read())
    c = Cursor(buf)
    assert bytes(buf[:4]) == b"GGUF", "not a GGUF file"
    c.pos = 4
    version = c.take("I")
    n_tensors = c.take("Q")
    n_kv = c.take("Q")
    kv = {}
    for _ in range(n_kv):
        key = c.string()
        kv[key] = c.value(c.take("I"))
    tensors = {}
    for _ in range(n_tensors):
        name = c.string()
        n_dims = c.take("I")
        dims = [c.take("Q") for _ in range(n_dims)]
        ttype = c.take("I")
        offset = c.take("Q")
        tensors[name] = {"dims": dims, "type": ttype, "offset": offset}
    align = kv.get("general.alignment", 32)
    data_start = (c.pos + align - 1) // align * align
    return buf, version, kv, tensors, data_start


def f16(b):
    return float(np.frombuffer(bytes(b), dtype="<f2")[0])


def dequant_row_prefix(buf, data_start, info, row, ncols):
    """First `ncols` values of row `row` (ne0 = row length, contiguous) of a GGUF tensor."""
    ne0 = info["dims"][0]
    bk, bb = BLOCK[info["type"]]
    row_bytes = ne0 // bk * bb
    base = data_start + info["offset"] + row * row_bytes
    out = []
    for col in range(ncols):
        blk, j = divmod(col, bk)
        p = base + blk * bb
        t = info["type"]
        if t == GGML_F32:
            out.append(struct.unpack_from("<f", buf, base + 4 * col)[0])
        elif t == GGML_Q8_0:
            d = f16(buf[p:p + 2])
            q = struct.unpack_from("<b", buf, p + 2 + j)[0]
            out.append(d * q)
        elif t == GGML_Q4_1:
            d = f16(buf[p:p + 2])
            m = f16(buf[p + 2:p + 4])
            byte = buf[p + 4 + (j % 16)]
            q = (byte & 0x0F) if j < 16 else (byte >> 4)
            out.append(d * q + m)
        elif t == GGML_Q4_0:
            d = f16(buf[p:p + 2])
            byte = buf[p + 2 + (j % 16)]
            q = (byte & 0x0F) if j < 16 else (byte >> 4)
            out.append(d * (q - 8))
        else:
            raise ValueError(f"type {t} not handled")
    return out


def hf_row_to_gguf_row(r, n_head, head_dim):
    """llama.cpp's converter interleaves the two rope halves of each q/k head;
    transformers undoes it. HF row h*hd + s*hd/2 + i  <->  GGUF row h*hd + 2*i + s."""
    h, rem = divmod(r, head_dim)
    s, i = divmod(rem, head_dim // 2)
    return h * head_dim + 2 * i + s


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def as_list(ids):
    if isinstance(ids, torch.Tensor):
        return ids.tolist()
    if hasattr(ids, "keys") and "input_ids" in ids:
        return as_list(ids["input_ids"])
    return list(ids)


def greedy(model, ids, new_tokens, eos):
    input_ids = torch.tensor([ids], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            eos_token_id=eos,
            pad_token_id=eos,
            output_logits=True,
            return_dict_in_generate=True,
        )
    new = out.sequences[0, len(ids):].tolist()
    margins = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.logits]
    return new, min(margins)


def main():
    ap = argparse.ArgumentParser(description="SmolLM2 GGUF reference outputs via transformers")
    ap.add_argument("--gguf", default=DEFAULT_GGUF)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not os.path.exists(args.gguf):
        sys.exit(f"{args.gguf} not found: run scripts/fetch-assets.sh first")
    gdir, gname = os.path.split(os.path.abspath(args.gguf))

    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
    model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    eos = tok.eos_token_id
    assert eos == model.config.eos_token_id == 2, (eos, model.config.eos_token_id)

    # ---- chat prompt ----
    prompt_text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    prompt_ids = as_list(tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True))
    if prompt_ids and isinstance(prompt_ids[0], list):
        prompt_ids = prompt_ids[0]
    assert prompt_ids == tok(prompt_text, add_special_tokens=False)["input_ids"], "template ids != text ids"
    output_ids, chat_margin = greedy(model, prompt_ids, CHAT_NEW_TOKENS, eos)
    output_text = tok.decode(output_ids, skip_special_tokens=True)

    # Cross-check with transformers' SDPA attention (same tokens expected).
    sdpa = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32,
                                                attn_implementation="sdpa").eval()
    sdpa_ids, _ = greedy(sdpa, prompt_ids, CHAT_NEW_TOKENS, eos)
    assert sdpa_ids == output_ids, ("eager and sdpa disagree", sdpa_ids, output_ids)
    del sdpa

    # ---- raw prompt ----
    raw_ids = tok(RAW_PROMPT, add_special_tokens=False)["input_ids"]
    raw_out, raw_margin = greedy(model, raw_ids, RAW_NEW_TOKENS, eos)

    greedy_json = {
        "gguf_file": gname,
        "gguf_sha256": sha256(args.gguf),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "dtype": "float32",
        "attn_implementation": "eager (sdpa gives the same tokens)",
        "eos_token_id": eos,
        "messages": MESSAGES,
        "prompt_text": prompt_text,
        "prompt_ids": prompt_ids,
        "max_new_tokens": CHAT_NEW_TOKENS,
        "output_ids": output_ids,
        "output_text": output_text,
        "output_stopped_at_eos": bool(output_ids and output_ids[-1] == eos),
        "min_top2_logit_margin": chat_margin,
        "raw_prompt_text": RAW_PROMPT,
        "raw_prompt_ids": raw_ids,
        "raw_max_new_tokens": RAW_NEW_TOKENS,
        "raw_output_ids": raw_out,
        "raw_output_text": tok.decode(raw_out, skip_special_tokens=True),
        "raw_min_top2_logit_margin": raw_margin,
        "notes": (
            "output_ids are the new tokens only; when the model emits eos (<|im_end|>, id 2) it is "
            "included as the last element and generation stops there. Greedy = argmax of float32 "
            "logits; min_top2_logit_margin is the smallest top-1 minus top-2 logit gap over the steps."
        ),
    }

    # ---- checks ----
    encodings = [{"text": s, "ids": tok(s, add_special_tokens=False)["input_ids"]} for s in TOKENIZER_SAMPLES]
    for e in encodings:
        assert tok.decode(e["ids"]) == e["text"], ("round trip", e)

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids])).logits[0, -1]
    assert int(logits.argmax()) == output_ids[0]

    sd = model.state_dict()
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    hf_to_gguf = {
        "model.embed_tokens.weight": ("token_embd.weight", None),
        "model.layers.0.self_attn.q_proj.weight": ("blk.0.attn_q.weight", cfg.num_attention_heads),
        "model.layers.0.self_attn.k_proj.weight": ("blk.0.attn_k.weight", cfg.num_key_value_heads),
    }
    buf, version, kv, tensors, data_start = read_gguf_directory(args.gguf)
    type_names = {GGML_F32: "F32", GGML_F16: "F16", GGML_Q4_0: "Q4_0", GGML_Q4_1: "Q4_1", GGML_Q8_0: "Q8_0"}
    weights = {}
    for hf_name, (g_name, n_head) in hf_to_gguf.items():
        t = sd[hf_name]
        info = tensors[g_name]
        rows = t[:3, :8].tolist()
        gguf_rows = []
        for r in range(3):
            gr = r if n_head is None else hf_row_to_gguf_row(r, n_head, head_dim)
            hand = dequant_row_prefix(buf, data_start, info, gr, 8)
            # Independent check: the hand-decoded GGUF row equals transformers' value exactly.
            assert np.array_equal(np.float32(hand), np.float32(rows[r])), (hf_name, r, hand, rows[r])
            gguf_rows.append({"gguf_row": gr, "values": hand})
        weights[hf_name] = {
            "gguf_tensor": g_name,
            "gguf_type": type_names.get(info["type"], str(info["type"])),
            "gguf_dims_ne": info["dims"],
            "torch_shape": list(t.shape),
            "rows_0_2_cols_0_7": rows,
            "gguf_rows": gguf_rows,
        }

    # Spelled-out hand decoding of one Q4_1 value: q_proj HF row 1 = GGUF row 2, column 20
    # (column 20 lies in block 0 at index 20 >= 16, i.e. the high nibble of byte 4).
    qi = tensors["blk.0.attn_q.weight"]
    assert qi["type"] == GGML_Q4_1
    ne0 = qi["dims"][0]
    p = data_start + qi["offset"] + 2 * (ne0 // 32) * 20
    d, m = f16(buf[p:p + 2]), f16(buf[p + 2:p + 4])
    nib = buf[p + 4 + 4] >> 4
    hand_value = d * nib + m
    tf_value = float(sd["model.layers.0.self_attn.q_proj.weight"][1, 20])
    assert np.float32(hand_value) == np.float32(tf_value), (hand_value, tf_value)

    checks = {
        "gguf_file": gname,
        "gguf_sha256": greedy_json["gguf_sha256"],
        "gguf_version": version,
        "transformers_version": transformers.__version__,
        "tokenizer_encodings": encodings,
        "tokenizer_notes": "ids from tokenizer(text, add_special_tokens=False); special-token text such as "
                           "<|im_start|> is matched as the special token (HF default). Decode round-trips.",
        "weights": weights,
        "weights_notes": (
            "rows_0_2_cols_0_7: transformers' float32 dequantised tensor (HF layout, [out, in]). "
            "gguf_rows: the same values decoded by hand from the GGUF bytes, with the GGUF row they come "
            "from. llama.cpp stores attn_q/attn_k with each head's two rope halves interleaved; HF row "
            "h*hd + s*hd/2 + i is GGUF row h*hd + 2*i + s (hd = head_dim = 64). token_embd is Q8_0, "
            "the layer matrices Q4_1; GGUF dims are ne0 (row length) first."
        ),
        "hand_decoded_q4_1": {
            "tensor": "blk.0.attn_q.weight",
            "gguf_row": 2, "col": 20, "hf_row": 1,
            "block_d": d, "block_m": m, "nibble": int(nib),
            "value": hand_value, "transformers_value": tf_value,
        },
        "chat_prompt_last_position_logits_0_7": logits[:8].tolist(),
        "chat_prompt_last_position_argmax": int(logits.argmax()),
    }

    with open(os.path.join(FIX, "smollm2_greedy.json"), "w") as f:
        json.dump(greedy_json, f, indent=2, ensure_ascii=False)
        f.write("\n")
    with open(os.path.join(FIX, "smollm2_checks.json"), "w") as f:
        json.dump(checks, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(json.dumps({k: greedy_json[k] for k in ("prompt_ids", "output_ids", "output_text",
                                                   "raw_prompt_ids", "raw_output_ids", "raw_output_text",
                                                   "min_top2_logit_margin", "raw_min_top2_logit_margin")},
                     ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
