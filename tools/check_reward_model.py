#!/usr/bin/env python3
"""Check that a reward model temper saved loads in transformers as a sequence classifier and
scores pairs as `temper reward` does.

    /work/venv/bin/python tools/check_reward_model.py out/reward-caps/reward_model \
        examples/data/caps_pref_eval.jsonl [--temper target/release/temper]

Loads the folder with AutoModelForSequenceClassification and AutoTokenizer, renders each pair the
way TRL 1.16's RewardTrainer does (chat template over prompt + reply for conversational records,
prompt + reply + EOS for strings), scores chosen and rejected, and prints the pairwise accuracy.
With --temper it also runs `temper reward --json` on the same file and reports the largest
difference between the two implementations' rewards. With --adapter DIR --base BASE it also loads
the PEFT adapter folder temper wrote (task_type SEQ_CLS, the score head as a module to save) onto
transformers' `…ForSequenceClassification` of BASE with PEFT, and reports the largest difference
from the merged model's rewards.

    /work/venv/bin/python tools/check_reward_model.py OUT/reward_model DATA.jsonl --adapter OUT --base BASE_DIR
"""

import argparse
import json
import subprocess
import sys

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def render(tok, prompt, reply):
    if isinstance(prompt, list) or isinstance(reply, list):
        p = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        r = reply if isinstance(reply, list) else [{"role": "assistant", "content": reply}]
        return tok.apply_chat_template(p + r, tokenize=True, return_dict=False)
    text = prompt + reply
    if not text.endswith(tok.eos_token):
        text += tok.eos_token
    return tok(text)["input_ids"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("dataset")
    ap.add_argument("--temper", default=None, help="a temper binary to compare with")
    ap.add_argument("--adapter", default=None, help="a PEFT SEQ_CLS adapter folder temper wrote")
    ap.add_argument("--base", default=None, help="the Hugging Face base model folder the adapter belongs to")
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForSequenceClassification.from_pretrained(a.model, dtype=torch.float32).eval()
    assert type(model).__name__.endswith("ForSequenceClassification"), type(model).__name__
    rows = [json.loads(l) for l in open(a.dataset) if l.strip()]
    peft_model = None
    if a.adapter:
        from peft import PeftModel

        base = AutoModelForSequenceClassification.from_pretrained(a.base, num_labels=1, dtype=torch.float32)
        base.config.pad_token_id = model.config.pad_token_id
        peft_model = PeftModel.from_pretrained(base, a.adapter).eval()
    rewards, peft_diff = [], 0.0
    with torch.no_grad():
        for r in rows:
            pair = []
            for side in ("chosen", "rejected"):
                ids = render(tok, r["prompt"], r[side])
                ids = ids["input_ids"] if isinstance(ids, dict) else ids
                x = torch.tensor([ids])
                pair.append(model(input_ids=x).logits[0, 0].item())
                if peft_model is not None:
                    peft_diff = max(peft_diff, abs(peft_model(input_ids=x).logits[0, 0].item() - pair[-1]))
            rewards.append(pair)
    acc = sum(c > rj for c, rj in rewards) / len(rewards)
    margin = sum(c - rj for c, rj in rewards) / len(rewards)
    out = {"impl": "transformers", "class": type(model).__name__, "pairs": len(rewards), "accuracy": acc, "mean_margin": margin}
    if peft_model is not None:
        out["peft_adapter_vs_merged_max_abs_diff"] = peft_diff
    if a.temper:
        res = subprocess.run([a.temper, "reward", a.model, "--dataset", a.dataset, "--json"], capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stderr, file=sys.stderr)
            sys.exit(1)
        lines = [json.loads(l) for l in res.stdout.splitlines()]
        ours = [(l["chosen"], l["rejected"]) for l in lines[:-1]]
        diff = max(abs(x - y) for p, q in zip(rewards, ours) for x, y in zip(p, q))
        out.update({"temper_accuracy": lines[-1]["accuracy"], "max_abs_reward_diff": diff, "max_abs_reward": max(abs(x) for p in rewards for x in p)})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
