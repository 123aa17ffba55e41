#!/usr/bin/env python3
"""A character-level tokenizer for the tiny fixture models (vocab 128), with a ChatML template.

ids: 0 <pad>, 1 <|im_start|>, 2 <|im_end|>, 3 <unk>, then "\\n" and printable ASCII (32..126).
Written with Hugging Face `tokenizers` so transformers loads it as it is:

    /work/venv/bin/python tools/gen_tiny_tokenizer.py   # -> tests/fixtures/tokenizers/tiny_chat/
"""
import json
import os

from tokenizers import Tokenizer, decoders, models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "tokenizers", "tiny_chat")
SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def main():
    os.makedirs(OUT, exist_ok=True)
    vocab = {t: i for i, t in enumerate(SPECIAL + CHARS)}
    assert len(vocab) <= 128
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL)
    tok.save(os.path.join(OUT, "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "chat_template": CHATML,
        "model_max_length": 128,
    }
    with open(os.path.join(OUT, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    ids = tok.encode("<|im_start|>user\nHi!<|im_end|>\n").ids
    print(OUT, len(vocab), ids)


if __name__ == "__main__":
    main()
