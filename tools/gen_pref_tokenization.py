#!/usr/bin/env python3
"""How TRL tokenizes preference (DPO) and KTO datasets: reference ids for the Rust data loader.

Writes small JSONL datasets in the formats TRL accepts (plain strings, conversational with an explicit prompt,
conversational with an implicit prompt, conversational KTO) and, for each record, the ids TRL's own dataset
preparation produces for it: `DPOTrainer._prepare_dataset` / `KTOTrainer._prepare_dataset`, run by the trainers'
constructors on a `datasets.Dataset` of the records, with the character-level tokenizer
tests/fixtures/tokenizers/tiny_chat and its own chat template. Nothing of TRL's preprocessing is re-implemented;
the script only checks a few properties of what TRL returned.

Run from the repository root (CPU only, a few seconds, deterministic):

    /work/venv/bin/python tools/gen_pref_tokenization.py

Output (tests/fixtures/preference/):
    data/pairs_strings.jsonl, data/pairs_conversational.jsonl, data/pairs_implicit.jsonl,
    data/kto_conversational.jsonl      the input records
    tokenization.json                  TRL's prompt/completion ids per record (schema in README.md)
and the "Tokenization fixtures" section of README.md (replaced in place; the rest of the file is left alone).
"""

import json
import os
import shutil
import sys
import tempfile
import warnings

import torch

torch.set_num_threads(1)

import datasets  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer  # noqa: E402

TOOLS = os.path.dirname(os.path.abspath(__file__))
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)
# the trainer arguments (CPU, one batch of n, no checkpoints) and the JSON layout of gen_pref_fixtures.py
from gen_pref_fixtures import common_args, fmt  # noqa: E402

ROOT = os.path.dirname(TOOLS)
OUT = os.path.join(ROOT, "tests", "fixtures", "preference")
DATA = os.path.join(OUT, "data")
TOKENIZER_REL = "tests/fixtures/tokenizers/tiny_chat"
TOKENIZER_DIR = os.path.join(ROOT, TOKENIZER_REL)
README = os.path.join(OUT, "README.md")
SECTION_START = "<!-- gen_pref_tokenization: start -->"
SECTION_END = "<!-- gen_pref_tokenization: end -->"

# tiny_chat is character level (BPE without merges): 0 <pad>, 1 <|im_start|>, 2 <|im_end|> (EOS), 3 <unk>,
# 4 "\n", then every printable ASCII character c (" " .. "~") -> ord(c) - 27. Everything below stays in that set.


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


PAIRS_STRINGS = [
    {"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5"},
    {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},
    # chosen already ends with the EOS text: TRL's add_eos leaves it alone (no second EOS), rejected gets one
    {"prompt": "Capital of France?", "chosen": "Paris<|im_end|>", "rejected": "Rome, I think"},
]

PAIRS_CONVERSATIONAL = [
    {"prompt": [user("2+2?")], "chosen": [assistant("4")], "rejected": [assistant("22")]},
    {
        "prompt": [system("Answer in capitals."), user("Say yes.")],
        "chosen": [assistant("YES")],
        "rejected": [assistant("yes")],
    },
    {
        "prompt": [user("Pick a color."), assistant("Blue."), user("Another?")],
        "chosen": [assistant("Red.")],
        "rejected": [assistant("Blue.")],
    },
]

# no "prompt": TRL's extract_prompt takes the longest common prefix of messages as the prompt
PAIRS_IMPLICIT = [
    {
        "chosen": [user("Is 7 prime?"), assistant("Yes.")],
        "rejected": [user("Is 7 prime?"), assistant("No, 7 = 1*7.")],
    },
    {
        "chosen": [system("Be brief."), user("Hi"), assistant("Hello."), user("Name?"), assistant("Temper.")],
        "rejected": [system("Be brief."), user("Hi"), assistant("Hello."), user("Name?"), assistant("I am a model.")],
    },
]

KTO_CONVERSATIONAL = [
    {"prompt": [user("3*3?")], "completion": [assistant("9")], "label": True},
    {"prompt": [user("3*3?")], "completion": [assistant("6")], "label": False},
    {
        "prompt": [system("Answer in capitals."), user("Say no.")],
        "completion": [assistant("NO")],
        "label": True,
    },
    {
        "prompt": [user("Pick a color."), assistant("Blue."), user("Another?")],
        "completion": [assistant("blue again")],
        "label": False,
    },
]

FILES = [
    ("pairs_strings.jsonl", PAIRS_STRINGS, "dpo"),
    ("pairs_conversational.jsonl", PAIRS_CONVERSATIONAL, "dpo"),
    ("pairs_implicit.jsonl", PAIRS_IMPLICIT, "dpo"),
    ("kto_conversational.jsonl", KTO_CONVERSATIONAL, "kto"),
]


def load_tokenizer():
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    # the template comes from tokenizer_config.json; none is substituted
    assert tok.chat_template, "tiny_chat has no chat template"
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.pad_token == "<pad>" and tok.pad_token_id == 0
    assert tok.bos_token is None and tok.bos_token_id is None
    return tok


def tiny_model(vocab_size):
    torch.manual_seed(0)  # the weights play no part in the ids; seeded anyway
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=None,
    )
    return LlamaForCausalLM(cfg)


def to_dataset(records):
    # from_list keeps the message lists as lists of {"role", "content"} structs, as load_dataset("json") would
    return datasets.Dataset.from_list(records)


def prepare(kind, records, tok, tmp):
    """TRL's dataset preparation, run by the trainer constructor (train_dataset = _prepare_dataset(...))."""
    ds = to_dataset(records)
    model = tiny_model(len(tok))
    ref = tiny_model(len(tok))  # passed explicitly: without one TRL would load the reference from the hub
    n = len(records)
    if kind == "dpo":
        args = DPOConfig(**common_args(tmp, n))
        trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
        keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    else:
        args = KTOConfig(**common_args(tmp, n))
        trainer = KTOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
        keys = ("prompt_ids", "completion_ids", "label")
    out = trainer.train_dataset
    assert len(out) == n  # nothing dropped or reordered (KTO: data already unpaired)
    # the constructor's result is exactly what _prepare_dataset returns for the same dataset
    again = trainer._prepare_dataset(to_dataset(records), tok, args, "eval")
    rows = [{k: out[i][k] for k in keys} for i in range(n)]
    assert rows == [{k: again[i][k] for k in keys} for i in range(n)]
    for rec, row in zip(records, rows, strict=True):
        if kind == "kto":
            assert row["label"] == rec["label"]
    return rows


def check_rows(name, records, rows, tok):
    """Sanity checks on TRL's output (not a re-implementation; fails loudly if TRL's behaviour shifts)."""
    eos, nl = tok.eos_token_id, tok.convert_tokens_to_ids("\n")
    for rec, row in zip(records, rows, strict=True):
        comps = [k for k in ("chosen_ids", "rejected_ids", "completion_ids") if k in row]
        for k in comps:
            ids = row[k]
            if name == "pairs_strings.jsonl":
                assert ids[-1] == eos and ids.count(eos) == 1, (name, k, ids)  # exactly one EOS, last
            else:
                assert ids[-2:] == [eos, nl], (name, k, ids)  # the template's "<|im_end|>\n" ends the completion
        # the tokenized prompt is a prefix of prompt + completion, so TRL kept all of it
        if name == "pairs_strings.jsonl":
            prompt = rec["prompt"]
            assert row["prompt_ids"] == tok(prompt)["input_ids"]
        else:
            prompt = rec["prompt"] if "prompt" in rec else rec["chosen"][:-1]  # implicit: all but the last message
            whole = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
            assert row["prompt_ids"] == whole["input_ids"], (name, row)
        if name != "pairs_strings.jsonl":
            # the prompt ends with the generation prompt "<|im_start|>assistant\n"
            gen = tok("assistant\n")["input_ids"]
            assert row["prompt_ids"][-len(gen) - 1 :] == [tok.convert_tokens_to_ids("<|im_start|>")] + gen


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=True) + "\n")


README_SECTION = """{start}
## Tokenization fixtures (`data/`, `tokenization.json`)

Generated by `tools/gen_pref_tokenization.py` (independent of `gen_pref_fixtures.py`; regenerate from the
repository root with `/work/venv/bin/python tools/gen_pref_tokenization.py`: CPU only, a few seconds,
byte-identical output; it rewrites only this section of README.md, so run it after `gen_pref_fixtures.py`, which
rewrites the whole file). They record how TRL {trl_version} (transformers {transformers_version}) turns
preference and KTO records into token ids: the ids are what `DPOTrainer._prepare_dataset` /
`KTOTrainer._prepare_dataset` return (the trainers are built on a throwaway random tiny Llama with the tokenizer's
vocabulary; its weights play no part), with the tokenizer `{tokenizer}` and the chat
template of its own tokenizer_config.json (ChatML, no default system prompt; recorded as `chat_template`).

| file | records |
|---|---|
| `data/pairs_strings.jsonl` | 3 x `{{"prompt", "chosen", "rejected"}}`, plain strings; one `chosen` already ends with the EOS text `<\\|im_end\\|>` |
| `data/pairs_conversational.jsonl` | 3 x `{{"prompt": [messages], "chosen": [assistant], "rejected": [assistant]}}`; one prompt with a system message, one two-turn prompt (user, assistant, user) |
| `data/pairs_implicit.jsonl` | 2 x `{{"chosen": [...], "rejected": [...]}}`, full conversations, no `prompt` (one multi-turn with a system message) |
| `data/kto_conversational.jsonl` | 4 x `{{"prompt": [messages], "completion": [assistant], "label": bool}}` |
| `tokenization.json` | TRL's ids for every record of those files |

`tokenization.json`: `trl_version`, `transformers_version`, `generator`, `tokenizer` (path), `chat_template` (the
Jinja string in effect), `special_tokens` (`eos_token`, `eos_token_id`, `bos_token`, `bos_token_id`, `pad_token`,
`pad_token_id`; tiny_chat: `<|im_end|>` = 2, no BOS, `<pad>` = 0), and `files`: file name -> list, in file order,
of `{{"prompt_ids", "chosen_ids", "rejected_ids"}}` (pairs files) or `{{"prompt_ids", "completion_ids", "label"}}`
(KTO). The training sequence is `prompt_ids + chosen_ids` (resp. `+ rejected_ids`, `+ completion_ids`).

What TRL does (trl/trainer/dpo_trainer.py, kto_trainer.py `_prepare_dataset`; trl/data_utils.py):

- No `prompt` key (checked on the first record only): `extract_prompt` makes the longest common prefix of the
  chosen and rejected MESSAGE lists the prompt, the rest the completions (here: every message but the last).
- Plain strings only (`is_conversational` of the first record false): `add_eos` appends the EOS text
  (`<|im_end|>`) to `chosen` / `rejected` (KTO: `completion`) unless the string already ends with it; then
  `prompt_ids = tok(prompt)`, `full = tok(prompt + chosen)` (string concatenation, then one tokenization; no BOS
  here, none added). So every string completion ends with exactly one 2.
- Conversational: `prompt_ids = apply_chat_template(prompt, add_generation_prompt=True)` (ends with
  `<|im_start|>assistant\\n`), `full = apply_chat_template(prompt + chosen)` (message lists concatenated; no
  generation prompt). No EOS is added: the completion ends with the template's `<|im_end|>\\n`, i.e. `[..., 2, 4]`.
- The completion starts where `prompt_ids` and `full` first differ: DPO takes `prompt_len` = min over chosen and
  rejected of the common-prefix length, `prompt_ids = prompt_ids[:prompt_len]`, `chosen_ids = full_chosen[prompt_len:]`,
  `rejected_ids = full_rejected[prompt_len:]` (KTO: one completion). With this tokenizer and template the prompt is
  always a prefix, so `prompt_ids` is the whole tokenized prompt.
- No truncation at this stage (`max_length`, 1024 by default, is applied by the collator), but records whose
  prompt alone has >= `max_length` tokens are dropped (DPO: only with `truncation_mode="keep_start"`, the default;
  KTO: always). None is dropped here. KTO also adds `KL_completion_ids` (the completions rotated by +1 within each
  batch, see `kto` above); not recorded here.
{end}
"""


def update_readme(meta):
    section = README_SECTION.format(
        start=SECTION_START,
        end=SECTION_END,
        trl_version=meta["trl_version"],
        transformers_version=meta["transformers_version"],
        tokenizer=TOKENIZER_REL,
    )
    with open(README) as f:
        text = f.read()
    if SECTION_START in text:
        head, rest = text.split(SECTION_START, 1)
        _, tail = rest.split(SECTION_END + "\n", 1)
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(README, "w") as f:
        f.write(text)


def main():
    hf_logging.set_verbosity_error()
    warnings.simplefilter("ignore")
    datasets.disable_progress_bars()
    datasets.disable_caching()
    os.makedirs(DATA, exist_ok=True)
    tok = load_tokenizer()
    fixture = {
        "trl_version": trl.__version__,
        "transformers_version": transformers.__version__,
        "generator": "tools/gen_pref_tokenization.py",
        "tokenizer": TOKENIZER_REL,
        "chat_template": tok.chat_template,
        "special_tokens": {
            "eos_token": tok.eos_token,
            "eos_token_id": tok.eos_token_id,
            "bos_token": tok.bos_token,
            "bos_token_id": tok.bos_token_id,
            "pad_token": tok.pad_token,
            "pad_token_id": tok.pad_token_id,
        },
        "files": {},
    }
    tmp = tempfile.mkdtemp(prefix="gen_pref_tokenization_")
    try:
        for name, records, kind in FILES:
            for r in records:  # only characters tiny_chat maps to real tokens (no <unk>)
                enc = tok(json.dumps(r))["input_ids"]
                assert tok.unk_token_id not in enc, (name, r)
            write_jsonl(os.path.join(DATA, name), records)
            rows = prepare(kind, records, tok, tmp)
            check_rows(name, records, rows, tok)
            fixture["files"][name] = rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with open(os.path.join(OUT, "tokenization.json"), "w") as f:
        f.write(fmt(fixture) + "\n")
    update_readme(fixture)
    print("wrote", DATA, "and", os.path.join(OUT, "tokenization.json"))


if __name__ == "__main__":
    main()
