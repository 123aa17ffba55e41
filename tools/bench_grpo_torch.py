#!/usr/bin/env python3
"""TRL (PyTorch + PEFT, CPU) side of `temper bench --workload grpo`: LoRA GRPO training steps on a
random-init LlamaForCausalLM, through TRL's own GRPOTrainer.train() (transformers generate, no vLLM).

    /work/venv/bin/python tools/bench_grpo_torch.py --shape tiny|smollm2 [--threads 2] [--steps 3]
        [--batch P] [--seq T] [--num-generations G] [--new-tokens M] [--rank 16]

Prints one JSON object on stdout:
  {"impl": "trl", "workload": "grpo", "shape": ..., "batch": P, "seq": T, "num_generations": G,
   "new_tokens": M, "rank": R, "steps": S, "threads": N, "step_ms": X, "rollout_ms": Y,
   "update_ms": X - Y, "rollout_tokens_per_s": P*G*M / Y, "tokens_per_s": P*G*(T+M) / X,
   "peak_rss_bytes": B, "final_loss": L, "trl_version": ..., "torch_version": ..., ...}

Model: the shapes of tools/bench_sft_torch.py (float32 LlamaForCausalLM from a config, random
weights, seed 0, eager attention). The base model and a LoraConfig (r = --rank, lora_alpha =
2 * rank, dropout 0, all seven projections q, k, v, o, gate, up, down) are handed to
trl.GRPOTrainer, which wraps the model with PEFT itself. beta 0 (TRL's default): no reference
model and no reference forward.

One step = one optimizer step of GRPOTrainer.train() = one generation batch: P prompts (--batch)
of exactly T tokens (--seq), G completions each (--num-generations), every completion exactly M
tokens (--new-tokens). GRPOConfig: per_device_train_batch_size = P*G, gradient_accumulation_steps
1, so steps_per_generation 1 and generation_batch_size P*G: every step generates the P*G
completions (one model.generate call on a [P*G, T] batch), scores them, and trains on all of them
in one micro-batch. num_iterations 1 with steps_per_generation == gradient_accumulation_steps
means TRL computes no separate "old" log-probs (the importance ratio is exp(logp - logp.detach())
= 1), so the update is one policy forward + backward over the P*G rows of T + M tokens (logits
only for the completion positions), then AdamW. loss_type: TRL's default ("dapo": token losses
averaged over all completion tokens of the batch); scale_rewards TRL's default ("group"),
epsilon 0.2. lr 1e-4, constant schedule, weight decay 0, no gradient clipping (max_grad_norm 0),
float32 (bf16 off), gradient_checkpointing off (TRL defaults it on and Trainer.train() would turn
it on; bench_dpo_torch.py never calls train(), so it runs without it too), logging off.

Sampling: TRL's transformers path (GRPOTrainer._generate_single_turn -> model.generate with a
KV cache): do_sample, temperature 1.0, top_p 1.0, top_k 0 (off), no min_p, repetition penalty
1: plain multinomial sampling from softmax(logits). Fixed-length completions: max_completion_length
= M and generation_kwargs {"min_new_tokens": M}, so transformers masks the EOS id (2) for all M
steps and every completion runs to max_new_tokens; TRL's EOS mask therefore keeps all M tokens.
Both are checked every step (prompt ids seen by generate are exactly [P*G, T] with no padding;
every completion has exactly M ids).

Prompts: TRL 1.16's GRPOTrainer takes text prompts and tokenizes them itself
(processing_class(text=prompts)). The processing class here is a WordLevel tokenizer over the
model's whole vocabulary: id i <-> word "t<i>" (ids 0, 1, 2 are <pad>, <s>, </s>), whitespace
split, no BOS/EOS added. A prompt of T ids drawn as bench_dpo_torch.py draws them
(torch.Generator seeded 1, torch.randint(3, vocab)) is given as the text "t.. t.. ...", which
tokenizes back to exactly those T ids. The dataset holds P * (1 + steps) such prompts, in order
(shuffle_dataset False), so each step sees P fresh prompts. Reward (one function): the fraction
of odd ids in the completion's ids: deterministic, cheap, and different within a group.

Timing: a TrainerCallback reads the clock at every on_step_end; step_ms = (last - first) / steps,
i.e. everything train() does per optimizer step after 1 warm-up step (data loading, generation,
reward, advantages, forward, backward, optimizer, callbacks). rollout_ms = mean wall time of
GRPOTrainer._generate_single_turn over the timed steps (padding the prompts, model.generate,
the EOS mask); update_ms = step_ms - rollout_ms (reward, advantages, the policy forward and
backward, the optimizer). rollout_tokens_per_s = P*G*M / rollout seconds; tokens_per_s =
P*G*(T+M) / step seconds. final_loss: the loss training_step returned on the last step (about 0
on every step here: on-policy the ratio is 1, the advantages are centred per group and all
completions have the same length, so the dapo loss -sum(A_i * M) / (P*G*M) cancels).
peak_rss_bytes: VmHWM of /proc/self/status after the run.

Run with OMP_WAIT_POLICY=PASSIVE on a shared machine (tools/bench_grpo_compare.sh sets it by
default); see tools/bench_sft_torch.py.
"""

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sft_torch import SHAPES, TARGET_MODULES, build_model, peak_rss_mb  # noqa: E402

try:
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
except ImportError as e:  # pragma: no cover - reported as a clear failure below
    trl = None
    IMPORT_ERROR = e

WARMUP_STEPS = 1
SPECIAL = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2: the model config's pad, bos and eos


def vocab_tokenizer(vocab_size):
    """A fast tokenizer whose words are the model's ids: "t<i>" <-> i, whitespace split, nothing added."""
    vocab = {w: i for i, w in enumerate(SPECIAL)}
    vocab.update({f"t{i}": i for i in range(len(SPECIAL), vocab_size)})
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="</s>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", padding_side="left")


def prompt_ids(n, seq, vocab_size):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab_size, (seq,), generator=g).tolist() for _ in range(n)]


def odd_fraction_reward(completion_ids, **kwargs):
    """Fraction of odd token ids in each completion: deterministic, cheap, varies within a group."""
    return [sum(i & 1 for i in ids) / max(len(ids), 1) for ids in completion_ids]


if trl is not None:

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())


def build_trainer(shape, batch, seq, gens, new_tokens, rank, steps, out_dir):
    model = build_model(shape)
    vocab = model.config.vocab_size
    tok = vocab_tokenizer(vocab)
    prompts = prompt_ids(batch * (WARMUP_STEPS + steps), seq, vocab)
    texts = [" ".join(f"t{i}" for i in p) for p in prompts]
    assert tok(texts[0])["input_ids"] == prompts[0], "the vocabulary tokenizer must round-trip prompt ids"
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGET_MODULES,
                      bias="none", task_type="CAUSAL_LM")
    args = GRPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=batch * gens,
        gradient_accumulation_steps=1,
        num_generations=gens,
        num_iterations=1,
        max_completion_length=new_tokens,
        generation_kwargs={"min_new_tokens": new_tokens},
        temperature=1.0,
        beta=0.0,
        shuffle_dataset=False,
        max_steps=WARMUP_STEPS + steps,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        gradient_checkpointing=False,
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    assert args.generation_batch_size == batch * gens and args.steps_per_generation == 1
    clock = StepClock()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=odd_fraction_reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": texts}),
        processing_class=tok,
        peft_config=lora,
        callbacks=[clock],
    )
    assert trainer.ref_model is None and trainer.beta == 0.0
    return trainer, clock


def instrument(trainer, batch, seq, gens, new_tokens):
    """Times every generation call, checks its shapes, and keeps the loss of every training step."""
    rollouts, losses = [], []  # (start time, seconds) per generation call; loss per step
    generate_single_turn = trainer._generate_single_turn
    training_step = trainer.training_step

    def timed_generate(prompt_ids, *args, **kwargs):
        assert len(prompt_ids) == batch * gens, len(prompt_ids)
        assert all(len(p) == seq for p in prompt_ids), sorted({len(p) for p in prompt_ids})
        t0 = time.perf_counter()
        completion_ids, logprobs = generate_single_turn(prompt_ids, *args, **kwargs)
        rollouts.append((t0, time.perf_counter() - t0))
        assert all(len(c) == new_tokens for c in completion_ids), sorted({len(c) for c in completion_ids})
        return completion_ids, logprobs

    # The input_ids the model's generate sees: [P*G, T], no padding column.
    seen = []
    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    model_generate = model.generate

    def checked_generate(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        seen.append(tuple(ids.shape))
        assert tuple(ids.shape) == (batch * gens, seq), tuple(ids.shape)
        assert bool(kwargs["attention_mask"].all()), "prompts must not be padded"
        return model_generate(*args, **kwargs)

    def recorded_step(*args, **kwargs):
        loss = training_step(*args, **kwargs)
        losses.append(float(loss))
        return loss

    trainer._generate_single_turn = timed_generate
    model.generate = checked_generate
    trainer.training_step = recorded_step
    return rollouts, losses, seen


def main():
    ap = argparse.ArgumentParser(description="TRL GRPOTrainer + PEFT LoRA CPU baseline for temper bench --workload grpo")
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4, help="prompts per step (P)")
    ap.add_argument("--seq", type=int, default=32, help="prompt tokens (T)")
    ap.add_argument("--num-generations", type=int, default=4, help="completions per prompt (G, >= 2)")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens per completion (M)")
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    if trl is None:
        print(f"error: trl / peft / datasets not importable in this Python: {IMPORT_ERROR}", file=sys.stderr)
        return 2
    P, T, G, M = args.batch, args.seq, args.num_generations, args.new_tokens
    if min(P, T, M, args.steps, args.rank, args.threads) < 1 or G < 2:
        print("error: --batch, --seq, --new-tokens, --steps, --rank and --threads must be >= 1, "
              "--num-generations >= 2", file=sys.stderr)
        return 2

    torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("trl").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory(prefix="bench_grpo_") as out_dir:
        trainer, clock = build_trainer(args.shape, P, T, G, M, args.rank, args.steps, out_dir)
        rollouts, losses, seen = instrument(trainer, P, T, G, M)
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in trainer.model.parameters())
        with contextlib.redirect_stdout(sys.stderr):  # train() prints its summary metrics
            trainer.train()
        gc_on = bool(getattr(trainer.accelerator.unwrap_model(trainer.model), "is_gradient_checkpointing", False))
    rss = peak_rss_mb()
    n = WARMUP_STEPS + args.steps
    if len(clock.ends) != n or len(rollouts) != n or len(losses) != n:
        print(f"error: expected {n} steps, got {len(clock.ends)} step ends, {len(rollouts)} generation calls, "
              f"{len(losses)} training steps", file=sys.stderr)
        return 1
    elapsed = clock.ends[-1] - clock.ends[WARMUP_STEPS - 1]
    timed_rollouts = [d for t0, d in rollouts if t0 > clock.ends[WARMUP_STEPS - 1]]
    assert len(timed_rollouts) == args.steps
    step_s = elapsed / args.steps
    rollout_s = sum(timed_rollouts) / args.steps
    import peft
    print(json.dumps({
        "impl": "trl",
        "workload": "grpo",
        "shape": args.shape,
        "batch": P,
        "seq": T,
        "num_generations": G,
        "new_tokens": M,
        "rank": args.rank,
        "steps": args.steps,
        "threads": args.threads,
        "step_ms": round(step_s * 1000.0, 3),
        "rollout_ms": round(rollout_s * 1000.0, 3),
        "update_ms": round((step_s - rollout_s) * 1000.0, 3),
        "rollout_tokens_per_s": round(P * G * M / rollout_s, 3),
        "tokens_per_s": round(P * G * (T + M) / step_s, 3),
        "peak_rss_bytes": int(rss * 2**20) if rss is not None else None,
        "final_loss": losses[-1],
        "warmup_steps": WARMUP_STEPS,
        "generate_input_shape": list(seen[-1]) if seen else None,
        "loss_type": trainer.loss_type,
        "beta": trainer.beta,
        "per_device_train_batch_size": trainer.args.per_device_train_batch_size,
        "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
        "generation_batch_size": trainer.args.generation_batch_size,
        "gradient_checkpointing": gc_on,
        "optim": str(trainer.args.optim.value if hasattr(trainer.args.optim, "value") else trainer.args.optim),
        "trainable_params": trainable,
        "total_params": total,
        "trl_version": trl.__version__,
        "torch_version": torch.__version__,
        "peft_version": peft.__version__,
        "elapsed_s": round(elapsed, 4),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "load_avg_1m": os.getloadavg()[0],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
