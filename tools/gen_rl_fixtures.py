#!/usr/bin/env python3
"""Reference numbers for the on-policy RL objectives (GRPO advantages and losses, PPO rollout maths).

GRPO: the numbers come from *TRL 1.16's own methods*. A `GRPOTrainer` is created with
`object.__new__` (no model, no dataset), given the handful of attributes the methods read,
and then:

  * `GRPOTrainer._generate_and_score_completions` is run for real; the only stand-ins are a
    `rollout_func` (TRL's supported hook that replaces generation, returning fixed token ids)
    and plain-Python reward functions that return the fixture's rewards. Reward weighting,
    group/batch statistics, the advantage normalisation and every logged metric are TRL's.
  * `GRPOTrainer._compute_loss` is run for real with `_get_per_token_logps_and_entropies`
    replaced by a function returning a float64 leaf tensor, so `loss.backward()` gives
    d loss / d per_token_logps through TRL's own loss code.

PPO: TRL 1.16.0 no longer ships a PPO trainer (there is no `trl/experimental/ppo` in the
1.16.0 wheel, nor `masked_whiten` anywhere in it). The last release this script was checked
against that has one is TRL v1.9.0 (commit 35def3ee000a87f6839e66f4b7749b06274ed1b3,
`trl/experimental/ppo/ppo_trainer.py`; unchanged on main up to 1.10.0.dev0). Its rollout maths
is inline in `PPOTrainer.train`, so it is re-derived below with a file:line citation for every
step, keeping TRL's order of operations. `--check-ppo-source FILE` (FILE = that
ppo_trainer.py) additionally executes TRL's own statements, cut out of FILE by `ast`, on the
same inputs and asserts the results are bit-identical to the re-derivation.

Run from the repository root (CPU only, about a second, deterministic: re-running gives
byte-identical files):

    /work/venv/bin/python tools/gen_rl_fixtures.py [--check-ppo-source /path/to/ppo_trainer.py]

Output: tests/fixtures/rl/{grpo_advantages.json, grpo_loss.json, ppo.json, README.md}.
"""

import argparse
import ast
import contextlib
import io
import json
import math
import os
import textwrap
import types
import warnings
from collections import defaultdict, deque

import torch

torch.set_num_threads(1)  # fixed reduction order
torch.use_deterministic_algorithms(True)
# TRL's `_calculate_rewards` allocates `rewards_per_func` with `torch.zeros(...)` (default dtype):
# with float64 as the default every tensor below is float64.
torch.set_default_dtype(torch.float64)

with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
    warnings.simplefilter("ignore")
    import transformers  # noqa: E402,F401
    import trl  # noqa: E402
    from accelerate import Accelerator  # noqa: E402
    from trl import GRPOConfig, GRPOTrainer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "rl")
SEED = 20240617
EOS, PAD = 2, 0

PPO_SOURCE = "TRL v1.9.0 trl/experimental/ppo/ppo_trainer.py"


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def tolist(x):
    """Tensor -> nested Python lists of float (float64) / int / bool, row-major."""
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bool:
            return x.to(torch.int64).tolist()
        if x.is_floating_point():
            assert x.dtype == torch.float64, x.dtype
        return x.tolist()
    return x


def check_finite(obj, where):
    if isinstance(obj, float):
        assert math.isfinite(obj), where
    elif isinstance(obj, list):
        for v in obj:
            check_finite(v, where)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            check_finite(v, f"{where}.{k}")


def fmt(obj, indent=0):
    """JSON with one key per line and every array on a single line (small, diff-friendly)."""
    pad = " " * indent
    if isinstance(obj, dict):
        items = [f"{pad}  {json.dumps(k)}: {fmt(v, indent + 2)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and obj and isinstance(obj[0], dict):
        items = [pad + "  " + fmt(v, indent + 2) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(obj, allow_nan=False, separators=(", ", ": "))


def write_json(name, doc):
    check_finite(doc, name)
    path = os.path.join(OUT, name)
    with open(path, "w") as f:
        f.write(fmt(doc) + "\n")
    return path


def dyadic(gen, shape, lo, hi, denom=8):
    """Random multiples of 1/denom in [lo, hi]: exact in float32 *and* float64 (TRL stores
    reward-function outputs as float32 before they reach float64 arithmetic)."""
    n = torch.randint(int(lo * denom), int(hi * denom) + 1, shape, generator=gen)
    return n.to(torch.float64) / denom


def q4(x):
    """Round to 4 decimals: the nearest float64 to a 4-decimal number, so the JSON stays short
    and every reader parses the very same float64."""
    return torch.round(x * 10000) / 10000


def uniform(gen, shape, lo, hi):
    return q4(lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64))


def accelerator():
    # a fresh one each time: building a GRPOConfig (TrainingArguments) resets accelerate's shared state
    return Accelerator(cpu=True)


# ----------------------------------------------------------------------------------------------
# GRPO: advantages via GRPOTrainer._generate_and_score_completions
# ----------------------------------------------------------------------------------------------


def bare_grpo_trainer(args: GRPOConfig):
    """A GRPOTrainer without __init__: only the attributes the two driven methods read."""
    t = object.__new__(GRPOTrainer)
    t.args = args
    t.accelerator = accelerator()
    t.model = types.SimpleNamespace(training=True, is_gradient_checkpointing=False)
    t.state = types.SimpleNamespace(global_step=0, num_input_tokens_seen=0)
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    n = args.generation_batch_size
    t._logs = {
        "images": deque(maxlen=n),
        "prompt": deque(maxlen=n),
        "completion": deque(maxlen=n),
        "rewards": defaultdict(lambda: deque(maxlen=n)),
        "advantages": deque(maxlen=n),
        "extra": defaultdict(lambda: deque(maxlen=n)),
    }
    t._pending_extra_logs = defaultdict(list)
    t._pending_metrics = defaultdict(list)
    t.log_multimodal = args.log_multimodal
    # the same assignments GRPOTrainer.__init__ makes from args (grpo_trainer.py 782-946)
    t.num_generations = args.num_generations
    t.num_generations_eval = args.num_generations_eval or args.num_generations
    t.max_completion_length = args.max_completion_length
    t.num_iterations = args.num_iterations
    t.beta = args.beta
    t.loss_type = args.loss_type
    t.scale_rewards = args.scale_rewards
    t.multi_objective_aggregation = args.multi_objective_aggregation
    t.importance_sampling_level = args.importance_sampling_level
    t.off_policy_mask_threshold = args.off_policy_mask_threshold
    t.top_entropy_quantile = args.top_entropy_quantile
    t.mask_truncated_completions = args.mask_truncated_completions
    t.epsilon_low = args.epsilon
    t.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    t.use_vllm = args.use_vllm
    t.vllm_importance_sampling_correction = args.vllm_importance_sampling_correction
    t.entropy_coef = args.entropy_coef
    t.use_adaptive_entropy = args.use_adaptive_entropy
    t._entropy_bonus_enabled = t.entropy_coef != 0.0 or t.use_adaptive_entropy
    t.aux_loss_enabled = False
    t.pad_to_multiple_of = None
    t.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    # no tools / environments / vision
    t.tools = None
    t.environment_factories = None
    t.environments = None
    t.ref_model = None
    return t


def grpo_config(**kw):
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        return GRPOConfig(output_dir="/tmp/gen_rl_fixtures_unused", use_cpu=True, bf16=False, report_to="none", **kw)


def grpo_advantage_case(name, G, scale_rewards, reward_weights, rewards_per_func, completion_lengths, truncated):
    N, F = rewards_per_func.shape
    assert N % G == 0 and len(reward_weights) == F
    args = grpo_config(
        num_generations=G,
        scale_rewards=scale_rewards,
        reward_weights=list(reward_weights),
        per_device_train_batch_size=N,
        max_completion_length=max(completion_lengths),
    )
    t = bare_grpo_trainer(args)
    t._tokenizer = types.SimpleNamespace(pad_token_id=PAD)
    t.eos_token_ids = [EOS]
    t.processing_class = types.SimpleNamespace(batch_decode=lambda ids, **kw: [f"c{len(x)}" for x in ids])

    # rollout_func: fixed prompt/completion ids instead of sampling (a completion ends with EOS
    # unless it is marked truncated)
    def rollout_func(prompts, trainer):
        prompt_ids = [[5, 6 + (i // G)] for i in range(N)]
        completion_ids = []
        for i in range(N):
            ids = [7 + (j % 5) for j in range(completion_lengths[i])]
            if not truncated[i]:
                ids[-1] = EOS
            completion_ids.append(ids)
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}

    t.rollout_func = rollout_func

    # reward functions: return column f of the fixture table for the rows they are given
    table = rewards_per_func.tolist()

    def make_reward_func(f):
        def reward(prompts, completions, completion_ids, row, **kwargs):
            return [table[r][f] for r in row]

        reward.__name__ = f"r{f}"
        return reward

    t.reward_funcs = [make_reward_func(f) for f in range(F)]
    t.reward_func_names = [f"r{f}" for f in range(F)]
    t.reward_processing_classes = [None] * F
    # GRPOTrainer.__init__ builds this as float32 (grpo_trainer.py 574); the fixture weights are
    # exact in float32, so building it as float64 changes nothing but the dtype of the sums.
    t.reward_weights = torch.tensor(reward_weights, dtype=torch.float64)

    inputs = [{"prompt": f"p{i // G}", "row": i} for i in range(N)]
    out = t._generate_and_score_completions(inputs)
    m = {k: v[-1] for k, v in t._metrics["train"].items() if k != "num_tokens"}
    rewards = (rewards_per_func * t.reward_weights.unsqueeze(0)).nansum(dim=1)
    return {
        "name": name,
        "num_generations": G,
        "scale_rewards": scale_rewards,
        "reward_weights": list(reward_weights),
        "rewards_per_func": tolist(rewards_per_func),
        "rewards": tolist(rewards),
        "advantages": tolist(out["advantages"]),
        "reward": m["reward"],
        "reward_std": m["reward_std"],
        "frac_reward_zero_std": m["frac_reward_zero_std"],
        "rewards_func_mean": [m[f"rewards/r{f}/mean"] for f in range(F)],
        "rewards_func_std": [m[f"rewards/r{f}/std"] for f in range(F)],
        "completion_lengths": list(completion_lengths),
        "truncated": [int(x) for x in truncated],
        "completions_mean_length": m["completions/mean_length"],
        "completions_min_length": m["completions/min_length"],
        "completions_max_length": m["completions/max_length"],
        "completions_clipped_ratio": m["completions/clipped_ratio"],
        "completions_mean_terminated_length": m["completions/mean_terminated_length"],
        "completions_min_terminated_length": m["completions/min_terminated_length"],
        "completions_max_terminated_length": m["completions/max_terminated_length"],
        "num_items_in_batch": int(out["num_items_in_batch"]),
    }


def gen_grpo_advantages(gen):
    cases = []
    T = torch.tensor
    # 2 groups of 4, one reward function; group 1 has identical rewards (std 0)
    r = T([[1.0], [0.0], [0.5], [0.25], [0.75], [0.75], [0.75], [0.75]])
    lens = [3, 5, 2, 7, 4, 4, 6, 1]
    trunc = [False, False, False, True, False, False, True, False]
    for scale in ("group", "batch", "none"):
        cases.append(grpo_advantage_case(f"one_func_zero_std_group_{scale}", 4, scale, [1.0], r, lens, trunc))
    # 2 functions with weights, G=3, 2 groups; in group 1 both functions are constant
    r2 = T([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, -2.0], [0.5, -2.0], [0.5, -2.0]])
    lens2 = [2, 3, 4, 5, 6, 7]
    trunc2 = [False, True, False, False, False, True]
    for scale in ("group", "batch"):
        cases.append(grpo_advantage_case(f"two_funcs_weighted_{scale}", 3, scale, [1.0, 0.5], r2, lens2, trunc2))
    # 2 functions whose weighted sum is constant in group 0 although each function varies
    r3 = T([[1.0, 0.0], [0.0, 2.0], [0.5, 1.0], [0.0, 0.0], [1.0, 0.0], [0.25, 0.5]])
    cases.append(
        grpo_advantage_case("two_funcs_weighted_sum_constant", 3, "group", [1.0, 0.5], r3, lens2, [False] * 6)
    )
    # random: 3 groups of 2, 2 functions, negative weight
    r4 = dyadic(gen, (6, 2), -2.0, 2.0)
    cases.append(grpo_advantage_case("random_g2_neg_weight_group", 2, "group", [2.0, -0.25], r4, lens2, trunc2))
    cases.append(grpo_advantage_case("random_g2_neg_weight_batch", 2, "batch", [2.0, -0.25], r4, lens2, trunc2))
    # TRL default G=8, one group, weights default (all ones)
    r5 = dyadic(gen, (8, 1), 0.0, 1.0)
    lens5 = [1, 2, 3, 4, 5, 6, 7, 7]
    cases.append(grpo_advantage_case("default_g8_one_group", 8, "group", [1.0], r5, lens5, [False] * 7 + [True]))
    # every group constant: all advantages 0, frac_reward_zero_std 1
    r6 = T([[0.5], [0.5], [-1.0], [-1.0]])
    cases.append(grpo_advantage_case("all_groups_constant", 2, "group", [1.0], r6, [1, 2, 3, 4], [False] * 4))
    return cases


# ----------------------------------------------------------------------------------------------
# GRPO: loss via GRPOTrainer._compute_loss
# ----------------------------------------------------------------------------------------------


def grpo_loss_case(name, loss_type, beta, eps_low, eps_high, max_completion_length, logps, old_logps, ref_logps,
                   advantages, mask, entropies, on_policy=False, use_bias_correction_kl=True,
                   num_items_in_batch=None, gradient_accumulation_steps=1, steps_per_generation=1):
    B, T = logps.shape
    args = grpo_config(
        loss_type=loss_type,
        beta=beta,
        epsilon=eps_low,
        epsilon_high=eps_high,
        max_completion_length=max_completion_length,
        use_bias_correction_kl=use_bias_correction_kl,
        per_device_train_batch_size=B,
        num_generations=B,  # unused by _compute_loss; must divide the generation batch
        gradient_accumulation_steps=gradient_accumulation_steps,
        steps_per_generation=steps_per_generation,
    )
    t = bare_grpo_trainer(args)
    leaf = logps.clone().requires_grad_(True)
    t._get_per_token_logps_and_entropies = lambda *a, **k: (leaf, entropies, None)
    if num_items_in_batch is None:
        num_items_in_batch = int(mask.sum())
    inputs = {
        "prompt_ids": torch.full((B, 1), 5, dtype=torch.long),
        "prompt_mask": torch.ones((B, 1), dtype=torch.long),
        "completion_ids": torch.full((B, T), 7, dtype=torch.long),
        "completion_mask": mask.to(torch.long),
        "advantages": advantages,
        "num_items_in_batch": torch.tensor(num_items_in_batch),
    }
    if not on_policy:  # on-policy TRL leaves it out and uses per_token_logps.detach() instead
        inputs["old_per_token_logps"] = old_logps
    if beta != 0.0:
        inputs["ref_per_token_logps"] = ref_logps
    loss = t._compute_loss(None, inputs)
    loss.backward()
    m = {k: v[-1] for k, v in t._metrics["train"].items()}
    case = {
        "name": name,
        "loss_type": loss_type,
        "beta": beta,
        "epsilon_low": eps_low,
        "epsilon_high": eps_high,
        "max_completion_length": max_completion_length,
        "use_bias_correction_kl": use_bias_correction_kl,
        "num_items_in_batch": num_items_in_batch,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "steps_per_generation": steps_per_generation,
        "num_processes": 1,
        "per_token_logps": tolist(logps),
        "old_per_token_logps": tolist(old_logps),
        "ref_per_token_logps": tolist(ref_logps),
        "advantages": tolist(advantages),
        "completion_mask": tolist(mask.to(torch.long)),
        "entropies": tolist(entropies),
        "loss": loss.item(),
        "grad_per_token_logps": tolist(leaf.grad),
        "kl": m.get("kl"),
        "entropy": m["entropy"],
        "clip_ratio_low_mean": m["clip_ratio/low_mean"],
        "clip_ratio_high_mean": m["clip_ratio/high_mean"],
        "clip_ratio_region_mean": m["clip_ratio/region_mean"],
        "clip_ratio_low_min": m["clip_ratio/low_min"],
        "clip_ratio_high_max": m["clip_ratio/high_max"],
    }
    assert set(m) == {"kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                      "clip_ratio/low_min", "clip_ratio/high_max"} - ({"kl"} if beta == 0.0 else set()), sorted(m)
    return case


def gen_grpo_loss(gen):
    B, T = 5, 7
    lengths = [7, 4, 6, 2, 5]
    mask = (torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).to(torch.long)
    logps = uniform(gen, (B, T), -3.0, -0.1)
    # old - new spread over about +-0.45, so exp(new - old) leaves [0.8, 1.28] on both sides
    old = q4(logps + uniform(gen, (B, T), -0.45, 0.45))
    ref = q4(logps + uniform(gen, (B, T), -0.6, 0.6))
    adv = torch.tensor([1.25, -0.75, 0.5, -1.5, 0.0])
    ent = uniform(gen, (B, T), 0.2, 2.5)
    cases = []
    for loss_type in ("grpo", "dr_grpo", "dapo", "bnpo"):
        for beta in (0.0, 0.04):
            cases.append(grpo_loss_case(f"{loss_type}_beta{beta}", loss_type, beta, 0.2, 0.28, T, logps, old, ref,
                                        adv, mask, ent))
    # on-policy (old == new: ratio 1 everywhere, no clipping), for every loss type, with beta > 0
    for loss_type in ("grpo", "dr_grpo", "dapo", "bnpo"):
        cases.append(grpo_loss_case(f"{loss_type}_on_policy", loss_type, 0.04, 0.2, 0.28, T, logps, logps, ref,
                                    adv, mask, ent, on_policy=True))
    # KL without the importance-sampling correction (use_bias_correction_kl=False)
    cases.append(grpo_loss_case("grpo_beta0.04_no_kl_is_correction", "grpo", 0.04, 0.2, 0.28, T, logps, old, ref,
                                adv, mask, ent, use_bias_correction_kl=False))
    # dr_grpo with max_completion_length larger than T (the padded width)
    cases.append(grpo_loss_case("dr_grpo_max_len_16", "dr_grpo", 0.0, 0.2, 0.28, 16, logps, old, ref, adv, mask,
                                ent))
    # an all-masked row (what mask_truncated_completions produces for a truncated completion)
    mask2 = mask.clone()
    mask2[3] = 0
    for loss_type in ("grpo", "bnpo"):
        cases.append(grpo_loss_case(f"{loss_type}_masked_row", loss_type, 0.04, 0.2, 0.28, T, logps, old, ref, adv,
                                    mask2, ent))
    # dapo where the generation batch is two micro-batches (this one holds 24 of the 40 tokens):
    # normaliser = num_items_in_batch / num_processes * gradient_accumulation_steps / steps_per_generation
    cases.append(grpo_loss_case("dapo_two_micro_batches", "dapo", 0.04, 0.2, 0.28, T, logps, old, ref, adv, mask,
                                ent, num_items_in_batch=40, gradient_accumulation_steps=2, steps_per_generation=2))
    cases.append(grpo_loss_case("grpo_two_micro_batches", "grpo", 0.04, 0.2, 0.28, T, logps, old, ref, adv, mask,
                                ent, num_items_in_batch=40, gradient_accumulation_steps=2, steps_per_generation=2))
    # symmetric epsilon (TRL default: epsilon_high = epsilon = 0.2)
    cases.append(grpo_loss_case("dapo_symmetric_eps", "dapo", 0.0, 0.2, 0.2, T, logps, old, ref, adv, mask, ent))
    return cases


# ----------------------------------------------------------------------------------------------
# PPO (re-derived from TRL v1.9.0 trl/experimental/ppo/ppo_trainer.py; cited line by line)
# ----------------------------------------------------------------------------------------------

INVALID_LOGPROB = 1.0  # ppo_trainer.py:69


def ppo_masked_mean(values, mask, axis=None):  # ppo_trainer.py:237-242
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    return (values * mask).sum() / mask.sum()


def ppo_masked_var(values, mask, unbiased=True):  # ppo_trainer.py:245-261, Bessel-corrected
    mean = ppo_masked_mean(values, mask)
    variance = ppo_masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        assert n > 1
        variance = variance * (n / (n - 1))
    return variance


def ppo_masked_whiten(values, mask, shift_mean=True):  # ppo_trainer.py:264-270, eps 1e-8 inside rsqrt
    mean, var = ppo_masked_mean(values, mask), ppo_masked_var(values, mask)
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out += mean
    return out


def ppo_rewards(logprobs, ref_logprobs, scores, sequence_lengths, kl_coef, kl_estimator, whiten_rewards):
    B, T = logprobs.shape
    idx = torch.arange(T).repeat(B, 1)  # :763
    padding_mask = idx > sequence_lengths.unsqueeze(1)  # :764
    logprobs = torch.masked_fill(logprobs, padding_mask, INVALID_LOGPROB)  # :765
    ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, INVALID_LOGPROB)  # :766
    seq_p1 = sequence_lengths + 1  # :767
    padding_mask_p1 = idx > seq_p1.unsqueeze(1)  # :768
    logr = ref_logprobs - logprobs  # :773
    kl = -logr if kl_estimator == "k1" else (logr.exp() - 1) - logr  # :774 (k3 otherwise)
    non_score_reward = -kl_coef * kl  # :775
    rewards = non_score_reward.clone()  # :776
    end = torch.where(seq_p1 < T, seq_p1, sequence_lengths)  # :778, score goes one past the last token
    rewards[torch.arange(B), end] += scores  # :777-779
    if whiten_rewards:  # :782-784
        rewards = ppo_masked_whiten(rewards, ~padding_mask_p1, shift_mean=False)
        rewards = torch.masked_fill(rewards, padding_mask_p1, 0)
    metrics = {  # :882-893 (single process: gather is the identity)
        "objective/kl": kl.sum(1).mean().item(),
        "objective/entropy": (-logprobs).sum(1).mean().item(),
        "objective/non_score_reward": non_score_reward.sum(1).mean().item(),
        "objective/rlhf_reward": (non_score_reward.sum(1).mean() + scores.mean()).item(),
        "objective/scores": scores.mean().item(),
    }
    return dict(logprobs_masked=logprobs, ref_logprobs_masked=ref_logprobs, padding_mask=padding_mask,
                padding_mask_p1=padding_mask_p1, kl=kl, non_score_reward=non_score_reward, rewards=rewards,
                metrics=metrics)


def ppo_gae(values, rewards, padding_mask, padding_mask_p1, gamma, lam):
    values = torch.masked_fill(values, padding_mask_p1, 0)  # :769
    T = rewards.shape[1]
    lastgaelam = 0
    rev = []
    for t in reversed(range(T)):  # :787-794
        nextvalues = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        rev.append(lastgaelam)
    adv_raw = torch.stack(rev[::-1], axis=1)  # :795
    returns = adv_raw + values  # :796
    adv = ppo_masked_whiten(adv_raw, ~padding_mask)  # :797 (shift_mean=True: zero mean)
    adv = torch.masked_fill(adv, padding_mask, 0)  # :798
    return dict(values_masked=values, advantages_unwhitened=adv_raw, returns=returns, advantages=adv)


def ppo_loss(new_logprobs_raw, vpred_raw, old_logprobs, old_values, advantages, returns, padding_mask,
             padding_mask_p1, cliprange, cliprange_value, vf_coef):
    new_lp = new_logprobs_raw.clone().requires_grad_(True)
    vp = vpred_raw.clone().requires_grad_(True)
    new_logprobs = torch.masked_fill(new_lp, padding_mask, INVALID_LOGPROB)  # :824-826
    vpred = torch.masked_fill(vp, padding_mask_p1, 0)  # :828
    vpredclipped = torch.clamp(vpred, old_values - cliprange_value, old_values + cliprange_value)  # :829-833
    vf_losses1 = torch.square(vpred - returns)  # :834
    vf_losses2 = torch.square(vpredclipped - returns)  # :835
    vf_loss_max = torch.max(vf_losses1, vf_losses2)  # :836
    vf_loss = 0.5 * ppo_masked_mean(vf_loss_max, ~padding_mask_p1)  # :837
    vf_clipfrac = ppo_masked_mean((vf_losses2 > vf_losses1).float(), ~padding_mask_p1)  # :838-840
    logprobs_diff = new_logprobs - old_logprobs  # :841
    ratio = torch.exp(logprobs_diff)  # :842
    pg_losses = -advantages * ratio  # :843
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)  # :844
    pg_loss_max = torch.max(pg_losses, pg_losses2)  # :845
    pg_loss = ppo_masked_mean(pg_loss_max, ~padding_mask)  # :846
    loss = pg_loss + vf_coef * vf_loss  # :847
    loss.backward()  # :848 accelerator.backward
    with torch.no_grad():
        pg_clipfrac = ppo_masked_mean((pg_losses2 > pg_losses).float(), ~padding_mask)  # :852-854
        approxkl = 0.5 * (logprobs_diff**2).mean()  # :857, plain mean over all B*T positions
    return dict(pg_loss=pg_loss.item(), vf_loss=vf_loss.item(), loss=loss.item(), pg_clipfrac=pg_clipfrac.item(),
                vf_clipfrac=vf_clipfrac.item(), approxkl=approxkl.item(), ratio_mean=ratio.mean().item(),
                grad_new_logprobs=new_lp.grad, grad_vpred=vp.grad)


def gen_ppo(gen, check_source=None):
    rewards_cases, gae_cases, loss_cases = [], [], []
    T = 7
    configs = [
        # name, sequence_lengths, kl_coef, estimator, whiten_rewards, gamma, lam
        ("k1_defaults", [6, 3, 4, 1, 6], 0.05, "k1", False, 1.0, 0.95),
        ("k3_defaults", [6, 3, 4, 1, 6], 0.05, "k3", False, 1.0, 0.95),
        ("k1_whiten_rewards_discount", [2, 6, 5, 0], 0.2, "k1", True, 0.9, 0.8),
        ("k3_big_coef_discount", [4, 6, 2, 5, 3, 6], 0.5, "k3", False, 0.99, 0.9),
    ]
    for name, seq, kl_coef, est, whiten, gamma, lam in configs:
        B = len(seq)
        seq = torch.tensor(seq)
        logprobs = uniform(gen, (B, T), -3.0, -0.05)
        ref_logprobs = q4(logprobs + uniform(gen, (B, T), -0.8, 0.8))
        scores = uniform(gen, (B,), -2.0, 2.0)
        values = uniform(gen, (B, T), -1.0, 1.0)
        r = ppo_rewards(logprobs, ref_logprobs, scores, seq, kl_coef, est, whiten)
        rewards_cases.append({
            "name": name,
            "kl_coef": kl_coef,
            "kl_estimator": est,
            "whiten_rewards": whiten,
            "logprobs": tolist(logprobs),
            "ref_logprobs": tolist(ref_logprobs),
            "scores": tolist(scores),
            "sequence_lengths": tolist(seq),
            "padding_mask": tolist(r["padding_mask"]),
            "padding_mask_p1": tolist(r["padding_mask_p1"]),
            "logprobs_masked": tolist(r["logprobs_masked"]),
            "ref_logprobs_masked": tolist(r["ref_logprobs_masked"]),
            "kl": tolist(r["kl"]),
            "non_score_reward": tolist(r["non_score_reward"]),
            "rewards": tolist(r["rewards"]),
            "metrics": r["metrics"],
        })
        g = ppo_gae(values, r["rewards"], r["padding_mask"], r["padding_mask_p1"], gamma, lam)
        gae_cases.append({
            "name": name,
            "gamma": gamma,
            "lam": lam,
            "sequence_lengths": tolist(seq),
            "padding_mask": tolist(r["padding_mask"]),
            "padding_mask_p1": tolist(r["padding_mask_p1"]),
            "values": tolist(values),
            "rewards": tolist(r["rewards"]),
            "values_masked": tolist(g["values_masked"]),
            "advantages_unwhitened": tolist(g["advantages_unwhitened"]),
            "advantages": tolist(g["advantages"]),
            "returns": tolist(g["returns"]),
        })
        # one minibatch of the update: a shuffled subset of the rollout's rows
        rows = torch.randperm(B, generator=gen)[: max(2, B - 1)]
        pm, pm1 = r["padding_mask"][rows], r["padding_mask_p1"][rows]
        old_lp, old_v = r["logprobs_masked"][rows], g["values_masked"][rows]
        new_lp = q4(logprobs[rows] + uniform(gen, (len(rows), T), -0.5, 0.5))
        vpred = q4(old_v + uniform(gen, (len(rows), T), -0.6, 0.6))
        for cliprange, cliprange_value, vf_coef in ((0.2, 0.2, 0.1), (0.1, 0.3, 0.5)):
            lo = ppo_loss(new_lp, vpred, old_lp, old_v, g["advantages"][rows], g["returns"][rows], pm, pm1,
                          cliprange, cliprange_value, vf_coef)
            loss_cases.append({
                "name": f"{name}_clip{cliprange}_vclip{cliprange_value}_vf{vf_coef}",
                "cliprange": cliprange,
                "cliprange_value": cliprange_value,
                "vf_coef": vf_coef,
                "rollout_rows": tolist(rows),
                "padding_mask": tolist(pm),
                "padding_mask_p1": tolist(pm1),
                "new_logprobs": tolist(new_lp),
                "old_logprobs": tolist(old_lp),
                "vpred": tolist(vpred),
                "old_values": tolist(old_v),
                "advantages": tolist(g["advantages"][rows]),
                "returns": tolist(g["returns"][rows]),
                "pg_loss": lo["pg_loss"],
                "vf_loss": lo["vf_loss"],
                "loss": lo["loss"],
                "pg_clipfrac": lo["pg_clipfrac"],
                "vf_clipfrac": lo["vf_clipfrac"],
                "approxkl": lo["approxkl"],
                "ratio_mean": lo["ratio_mean"],
                "grad_new_logprobs": tolist(lo["grad_new_logprobs"]),
                "grad_vpred": tolist(lo["grad_vpred"]),
            })
    doc = {"source": PPO_SOURCE, "rewards": rewards_cases, "gae": gae_cases, "loss": loss_cases}
    if check_source is not None:
        check_ppo_against_trl_source(check_source, doc)
    return doc


# ----------------------------------------------------------------------------------------------
# --check-ppo-source: execute TRL's own PPO statements on the fixture inputs
# ----------------------------------------------------------------------------------------------


def _trl_ppo_pieces(path):
    src = open(path).read()
    tree = ast.parse(src)
    ns = {"torch": torch}
    train = None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in ("masked_mean", "masked_var", "masked_whiten"):
            exec(compile(ast.Module([node], []), path, "exec"), ns)
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "INVALID_LOGPROB":
            exec(compile(ast.Module([node], []), path, "exec"), ns)
        if isinstance(node, ast.ClassDef) and node.name == "PPOTrainer":
            train = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    lines = src.splitlines()

    def block(first, last):
        """Source lines of train() from the line starting with `first` to the line starting with `last`."""
        body = [ln.strip() for ln in lines[train.lineno - 1: train.end_lineno]]
        i = next(k for k, ln in enumerate(body) if ln.startswith(first))
        j = next(k for k in range(i, len(body)) if body[k].startswith(last))
        seg = lines[train.lineno - 1 + i: train.lineno + j]
        # closing lines of a multi-line statement
        k = train.lineno + j
        while lines[k - 1].rstrip().endswith(("(", ",")) or lines[k].strip().startswith(")"):
            seg.append(lines[k])
            k += 1
        return textwrap.dedent("\n".join(seg))

    rollout = block("response_idxs = torch.arange", "advantages = torch.masked_fill(advantages, padding_mask, 0)")
    update = block("vpredclipped = torch.clamp(", "loss = pg_loss + args.vf_coef * vf_loss")
    clipfrac = block("pg_clipfrac = masked_mean(", "pg_clipfrac = masked_mean(")
    approxkl = block("approxkl = 0.5", "approxkl = 0.5")
    metrics = block("mean_kl = kl.sum(1).mean()", "rlhf_reward = ")
    return ns, rollout, update, clipfrac, approxkl, metrics


def check_ppo_against_trl_source(path, doc):
    ns0, rollout, update, clipfrac, approxkl, metrics = _trl_ppo_pieces(path)
    t = torch.tensor
    n_checked = 0
    for rc, gc in zip(doc["rewards"], doc["gae"], strict=True):
        ns = dict(ns0)
        B = len(rc["scores"])
        ns.update(
            args=types.SimpleNamespace(kl_estimator=rc["kl_estimator"], kl_coef=rc["kl_coef"],
                                       whiten_rewards=rc["whiten_rewards"], gamma=gc["gamma"], lam=gc["lam"]),
            responses=torch.zeros(B, len(rc["logprobs"][0]), dtype=torch.long),
            logprobs=t(rc["logprobs"]), ref_logprobs=t(rc["ref_logprobs"]), scores=t(rc["scores"]),
            sequence_lengths=t(rc["sequence_lengths"]), values=t(gc["values"]), empty_cache=lambda: None,
        )
        exec(rollout, ns)
        exec(metrics, ns)
        got = {
            "padding_mask": ns["padding_mask"], "padding_mask_p1": ns["padding_mask_p1"],
            "logprobs_masked": ns["logprobs"], "ref_logprobs_masked": ns["ref_logprobs"], "kl": ns["kl"],
            "non_score_reward": ns["non_score_reward"], "rewards": ns["rewards"],
        }
        for k, v in got.items():
            assert tolist(v) == rc[k], (rc["name"], k)
        for k, v in {"values_masked": ns["values"], "returns": ns["returns"], "advantages": ns["advantages"]}.items():
            assert tolist(v) == gc[k], (gc["name"], k)
        assert ns["mean_kl"].item() == rc["metrics"]["objective/kl"]
        assert ns["mean_entropy"].item() == rc["metrics"]["objective/entropy"]
        assert ns["mean_non_score_reward"].item() == rc["metrics"]["objective/non_score_reward"]
        assert ns["rlhf_reward"].item() == rc["metrics"]["objective/rlhf_reward"]
        n_checked += 1
    for lc in doc["loss"]:
        ns = dict(ns0)
        pm, pm1 = t(lc["padding_mask"]).bool(), t(lc["padding_mask_p1"]).bool()
        new_lp = t(lc["new_logprobs"]).requires_grad_(True)
        vp = t(lc["vpred"]).requires_grad_(True)
        ns.update(
            args=types.SimpleNamespace(cliprange=lc["cliprange"], cliprange_value=lc["cliprange_value"],
                                       vf_coef=lc["vf_coef"]),
            micro_batch_inds=slice(None), padding_mask=pm, padding_mask_p1=pm1,
            new_logprobs=torch.masked_fill(new_lp, pm, ns0["INVALID_LOGPROB"]),  # :824-826
            vpred=torch.masked_fill(vp, pm1, 0),  # :828
            mb_values=t(lc["old_values"]), mb_return=t(lc["returns"]), mb_logprobs=t(lc["old_logprobs"]),
            mb_advantage=t(lc["advantages"]),
        )
        exec(update, ns)
        ns["loss"].backward()
        with torch.no_grad():
            exec(clipfrac, ns)
            exec(approxkl, ns)
        for k in ("pg_loss", "vf_loss", "loss", "pg_clipfrac", "vf_clipfrac", "approxkl"):
            assert ns[k].item() == lc[k], (lc["name"], k)
        assert ns["ratio"].mean().item() == lc["ratio_mean"]
        assert tolist(new_lp.grad) == lc["grad_new_logprobs"], lc["name"]
        assert tolist(vp.grad) == lc["grad_vpred"], lc["name"]
        n_checked += 1
    print(f"PPO re-derivation matches {path} bit for bit on {n_checked} cases")


# ----------------------------------------------------------------------------------------------
# README
# ----------------------------------------------------------------------------------------------

GRPO_DEFAULT_KEYS = [
    "num_generations", "beta", "epsilon", "epsilon_high", "loss_type", "scale_rewards", "temperature", "top_p",
    "top_k", "min_p", "max_completion_length", "num_iterations", "steps_per_generation", "mask_truncated_completions",
    "importance_sampling_level", "use_bias_correction_kl", "top_entropy_quantile", "delta", "off_policy_mask_threshold",
    "multi_objective_aggregation", "reward_weights", "entropy_coef", "use_vllm", "vllm_importance_sampling_correction",
    "vllm_importance_sampling_mode", "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps",
]

# TRL v1.9.0 trl/experimental/ppo/ppo_config.py (and its docstring for the TrainingArguments overrides)
PPO_DEFAULTS = [
    ("kl_coef", "0.05"), ("kl_estimator", '"k1"'), ("cliprange", "0.2"), ("cliprange_value", "0.2"),
    ("vf_coef", "0.1"), ("gamma", "1.0"), ("lam", "0.95"), ("num_ppo_epochs", "4"), ("num_mini_batches", "1"),
    ("whiten_rewards", "False"), ("temperature", "0.7"), ("response_length", "53"), ("missing_eos_penalty", "None"),
    ("stop_token", "None"), ("stop_token_id", "None"), ("learning_rate", "3e-6"),
    ("local_rollout_forward_batch_size", "64"), ("num_sample_generations", "10"),
    ("logging_steps", "10 (TrainingArguments: 500)"), ("bf16", "True unless fp16"),
]


def grpo_defaults_table():
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(GRPOConfig)}
    rows = []
    for k in GRPO_DEFAULT_KEYS:
        f = fields[k]
        v = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append(f"| `{k}` | `{v!r}` |")
    return "\n".join(rows)


README = r"""# RL fixtures: GRPO advantages and losses, PPO rollout maths

Written by `tools/gen_rl_fixtures.py` (run `/work/venv/bin/python tools/gen_rl_fixtures.py` from the
repository root; CPU, deterministic, re-running gives byte-identical files). Do not edit by hand.

* GRPO numbers: **TRL __TRL__** (torch __TORCH__), by running TRL's own methods on a `GRPOTrainer`
  built with `object.__new__` (no model): `_generate_and_score_completions` (generation replaced
  through TRL's `rollout_func` hook, reward functions are plain Python functions returning the
  fixture's rewards) and `_compute_loss` (`_get_per_token_logps_and_entropies` replaced by a
  function returning a float64 leaf tensor; gradients from `loss.backward()`).
* PPO numbers: TRL 1.16.0 **has no PPO trainer** (no `trl/experimental/ppo`, no `masked_whiten`
  in the wheel). The newest TRL with one available here is **v1.9.0** (commit
  35def3ee000a87f6839e66f4b7749b06274ed1b3, `trl/experimental/ppo/ppo_trainer.py`, identical on
  main up to 1.10.0.dev0). Its maths is inline in `PPOTrainer.train`; the script re-derives it in
  TRL's order of operations with a line citation per step, and
  `--check-ppo-source <that ppo_trainer.py>` (e.g. `git show v1.9.0:trl/experimental/ppo/ppo_trainer.py`
  in a TRL clone) executes TRL's own statements (cut out with `ast`) on the same inputs: every value
  matched bit for bit when these files were written.

## Conventions (all files)

* JSON; floats are float64 (Python `repr`, round-trips exactly); arrays are nested lists,
  row-major: `[B][T]` is a list of B rows of T values. Masks are 0/1 integers. No NaN/Inf anywhere;
  `null` means "TRL does not log this here".
* Top level of every file: `trl_version`, `torch_version`, `seed`, then the cases.
* Random inputs are drawn rounded to 4 decimals (short JSON); GRPO rewards are multiples of 1/8
  (exact in float32, see below). Computed values are full float64.
* Single process, train mode. Tolerances: float64 results agree with TRL to ~1e-15; but TRL computes
  **count ratios in float32** (`.float()`): `frac_reward_zero_std`, all `clip_ratio*`, `pg_clipfrac`,
  `vf_clipfrac`, `completions_*` — the stored value is that float32 result widened (e.g.
  1/3 -> 0.3333333432674408), so compare those with ~1e-7 relative tolerance.

## grpo_advantages.json — `{"cases": [...]}`

Inputs: `name`, `num_generations` G, `scale_rewards` ("group" | "batch" | "none"),
`reward_weights` [F], `rewards_per_func` [N][F] (N = groups·G; rows `g*G .. g*G+G-1` are the G
completions of prompt g), `completion_lengths` [N], `truncated` [N] (1 = no EOS at the end).
Expected: `rewards` [N], `advantages` [N], `reward`, `reward_std`, `frac_reward_zero_std`,
`rewards_func_mean` [F], `rewards_func_std` [F], `completions_mean_length`, `completions_min_length`,
`completions_max_length`, `completions_clipped_ratio`, `completions_mean_terminated_length`,
`completions_min_terminated_length`, `completions_max_terminated_length`, `num_items_in_batch`.

TRL 1.16 (`trl/trainer/grpo_trainer.py`, `multi_objective_aggregation="sum_then_normalize"`, the
default; lines 2763-2810):

* `rewards[i] = nansum_f(w_f * rewards_per_func[i][f])`.
* `mean_i` = mean of the rewards of i's group (always per group, also for "batch").
* `std`: `nanstd` = **unbiased** (Bessel, divide by n-1) standard deviation
  (`trl/trainer/utils.py:1021`). "group" and "none": std of i's group; "batch": one std over all N
  rewards (only the std is batch-wide, the mean stays per group).
* `advantages = (rewards - mean_i) / (std + 1e-4)`; for "none": `rewards - mean_i` (no division).
  A constant group gives exactly 0. Then `nan_to_num(nan=0)`.
* `frac_reward_zero_std = mean_i[isclose(std_i, 0)]` (torch defaults rtol=1e-5, atol=1e-8), over the
  N rows of the std tensor that was used: per-group std for "group"/"none", but the **batch std for
  "batch"**, so there it is 0 or 1 even if some groups are constant (case `..._batch`).
* `reward` = mean(rewards); `reward_std` = unbiased std of all N rewards (independent of
  `scale_rewards`); `rewards/<name>/mean`, `/std` = mean and unbiased std of column f.
* Reward-function outputs are stored as float32 by TRL (`grpo_trainer.py:1637`) and
  `reward_weights` is a float32 tensor; the fixture values are exact in float32, so float64
  arithmetic on them is what TRL computes.
* `completions/*` come from `_generate` (lines 2293-2310): lengths are token counts;
  `clipped_ratio` = fraction whose last id is neither EOS nor pad; the `*_terminated_length` stats are
  over the non-truncated ones (0 if none). `num_items_in_batch` = number of completion tokens in the
  generation batch (sum of `completion_mask`, summed over processes; line 2498).

## grpo_loss.json — `{"cases": [...]}`

Inputs: `name`, `loss_type` ("grpo" | "dr_grpo" | "dapo" | "bnpo"), `beta`, `epsilon_low`
(= `GRPOConfig.epsilon`), `epsilon_high`, `max_completion_length`, `use_bias_correction_kl`,
`num_items_in_batch`, `gradient_accumulation_steps`, `steps_per_generation`, `num_processes` (1),
`per_token_logps` [B][T], `old_per_token_logps` [B][T], `ref_per_token_logps` [B][T] (unused when
beta = 0), `advantages` [B], `completion_mask` [B][T], `entropies` [B][T] (only feeds the entropy
metric). Expected: `loss`, `grad_per_token_logps` [B][T] (d loss / d per_token_logps; 0 where the
mask is 0), `kl` (null when beta = 0), `entropy`, `clip_ratio_low_mean`, `clip_ratio_high_mean`,
`clip_ratio_region_mean`, `clip_ratio_low_min`, `clip_ratio_high_max` (logged as `kl`, `entropy`,
`clip_ratio/low_mean`, ...). Cases `*_on_policy` have `old == per_token_logps`: there TRL gets no
`old_per_token_logps` and uses `per_token_logps.detach()` (line 3066) — same values and gradient.

`_compute_loss` (lines 3020-3292), token-level importance sampling (the default), m = mask, A = advantage:

```
r     = exp(logp - old)                                   # coef_1
l     = -min(r*A, clamp(r, 1-eps_low, 1+eps_high)*A)      # two-sided clip; delta=None: no extra cap
kl_t  = exp(ref - logp) - (ref - logp) - 1                # k3 estimator, only if beta != 0
kl_t *= r        if use_bias_correction_kl (default True; r carries gradient, even when r == 1)
l    += beta * kl_t
grpo    : loss = mean_b( sum_t(m*l) / max(sum_t m, 1) ) / gas
bnpo    : loss = sum(m*l) / max(sum m, 1) / gas
dr_grpo : loss = sum(m*l) / (B * max_completion_length) / gas
dapo    : loss = sum(m*l) / ( max(num_items_in_batch, 1) / num_processes * gas / steps_per_generation )
```

gas = `current_gradient_accumulation_steps` (train mode). dapo's normaliser `num_items_in_batch`
counts the loss tokens of the whole generation batch (all `steps_per_generation` micro-batches, all
processes) and is handed unchanged to every micro-batch; with the default
`steps_per_generation == gradient_accumulation_steps` and one process dapo is
sum(m*l) / num_items_in_batch, i.e. bnpo over the whole accumulated batch (bnpo and dapo are equal
in the single-micro-batch cases here). An all-masked row (case `*_masked_row`) adds 0 to grpo's
mean but still counts in B.

Metrics (line 3253-3283; masked means are `sum(x*m) / max(sum m, 1)` over all tokens, reduced over
processes): `kl` = masked mean of `kl_t` after the `*r` correction; `entropy` = masked mean of
entropies; `is_low = (r < 1-eps_low) & (A < 0)`, `is_high = (r > 1+eps_high) & (A > 0)`;
`clip_ratio/low_mean`, `/high_mean`, `/region_mean` = masked means of `is_low`, `is_high`,
`is_low | is_high`; `clip_ratio/low_min` = min over rows of the row's masked mean of `is_low`
(rows with no tokens give NaN and are skipped), `clip_ratio/high_max` = max over rows of that of
`is_high`.

Not exercised (defaults, all off): `importance_sampling_level="token"` ("sequence" = GSPO),
`top_entropy_quantile=1.0` (no entropy mask), `delta=None`, `off_policy_mask_threshold=None`,
vLLM importance-sampling correction (default `True` but only applies with `use_vllm=True`,
`vllm_importance_sampling_mode="sequence_mask"`), `entropy_coef=0.0`, no MoE aux loss. TRL 1.16
also implements loss types `cispo`, `sapo`, `luspo`, `vespo` (not covered). The per-token log-probs
TRL feeds in are computed from logits divided by `temperature` (default 1.0).

### GRPOConfig defaults (TRL __TRL__)

| field | default |
|---|---|
__GRPO_DEFAULTS__

`epsilon_high=None` means `epsilon_high = epsilon` (grpo_trainer.py:946); `reward_weights=None`
means all 1.0; `steps_per_generation=None` becomes `gradient_accumulation_steps`; `bf16` becomes
True unless fp16 is set; `temperature` is applied both when sampling and when scoring (the
fused LM head divides the logits by it). Default `loss_type` is **"dapo"** and default `beta` is **0.0** (no reference model).

### GRPO metric names (TRL __TRL__; averaged over the steps in a logging window, NaNs skipped)

* `reward` — mean over the generation batch (all processes) of the weighted reward sum.
* `reward_std` — unbiased std of those rewards.
* `rewards/<func_name>/mean`, `rewards/<func_name>/std` — nanmean / unbiased nanstd of one function's raw rewards.
* `frac_reward_zero_std` — fraction of completions whose std (group std, or batch std for `scale_rewards="batch"`) is ~0.
* `kl` — masked token mean of the per-token k3 KL to the reference (times the ratio if `use_bias_correction_kl`), before multiplying by beta; only when beta != 0.
* `entropy` — masked token mean of the policy's per-token entropy.
* `clip_ratio/low_mean`, `clip_ratio/high_mean`, `clip_ratio/region_mean`, `clip_ratio/low_min`, `clip_ratio/high_max` — see above.
* `completions/mean_length`, `/min_length`, `/max_length` — completion token counts.
* `completions/clipped_ratio` — fraction of completions that did not end in EOS (or pad).
* `completions/mean_terminated_length`, `/min_terminated_length`, `/max_terminated_length` — lengths of the EOS-terminated ones.
* `num_tokens` — cumulative prompt + completion tokens seen; `step_time` — seconds per optimizer step.
* Only in some setups: `policy_loss` and `entropy_coef` (entropy bonus on), `aux_loss` (MoE),
  `cispo_clip_ratio`, `vespo/phi_seq_mean`, `sampling/sampling_logp_difference/{mean,max}` and
  `sampling/importance_sampling_ratio/{min,mean,max}` (vLLM), `tools/call_frequency`,
  `tools/failure_frequency`, plus anything reward functions log with `log_metric`.

## ppo.json — `{"source": ..., "rewards": [...], "gae": [...], "loss": [...]}`

Line numbers below are in TRL v1.9.0 `trl/experimental/ppo/ppo_trainer.py`. The i-th `rewards`,
`gae` case come from the same rollout (same `name`), and `loss` cases use a minibatch of it; every
case is self-contained. `INVALID_LOGPROB = 1.0` (line 69). `sequence_lengths[b]` = index of the last
response token (`first_true_indices(response == pad) - 1`, line 727; T-1 when there is no pad).

**`rewards`** inputs: `kl_coef`, `kl_estimator` ("k1" | "k3"), `whiten_rewards`, `logprobs` [B][T],
`ref_logprobs` [B][T] (both as scored, before masking), `scores` [B] (reward-model score, after any
`missing_eos_penalty`), `sequence_lengths` [B]. Expected: `padding_mask`, `padding_mask_p1`
[B][T] (0/1), `logprobs_masked`, `ref_logprobs_masked`, `kl`, `non_score_reward`, `rewards` [B][T],
`metrics` {`objective/kl`, `objective/entropy`, `objective/non_score_reward`,
`objective/rlhf_reward`, `objective/scores`}.

```
padding_mask[b,t]    = t > seq[b]                       # 763-764
padding_mask_p1[b,t] = t > seq[b] + 1                   # 767-768
logprobs, ref_logprobs: masked_fill(padding_mask, INVALID_LOGPROB)    # 765-766
logr = ref_logprobs - logprobs                          # 773
kl   = -logr (k1)   |   (exp(logr) - 1) - logr (k3)     # 774   (0 on padding: 1 - 1)
non_score_reward = -kl_coef * kl                        # 775
rewards = non_score_reward; rewards[b, e_b] += scores[b],
   e_b = seq[b]+1 if seq[b]+1 < T else seq[b]           # 776-779: the score lands ONE PAST the last
                                                        # token (a padding position) unless the row is full
if whiten_rewards: rewards = masked_whiten(rewards, ~padding_mask_p1, shift_mean=False),
                   then 0 where padding_mask_p1          # 782-784
```

**`gae`** inputs: `gamma`, `lam`, `sequence_lengths`, `padding_mask`, `padding_mask_p1`, `values`
[B][T] (value head output, before masking), `rewards` [B][T] (= the `rewards` output above).
Expected: `values_masked` (0 where padding_mask_p1, line 769 — the value one past the last token is
kept), `advantages_unwhitened`, `returns` (= advantages_unwhitened + values_masked, line 796),
`advantages` (= masked_whiten(advantages_unwhitened, ~padding_mask), then 0 where padding_mask;
797-798).

```
lastgaelam = 0; for t = T-1 .. 0:                       # 787-795
  next  = values_masked[:, t+1] if t < T-1 else 0
  delta = rewards[:, t] + gamma*next - values_masked[:, t]
  lastgaelam = delta + gamma*lam*lastgaelam;  adv[:, t] = lastgaelam
masked_mean(x, m) = sum(x*m) / sum(m)                   # 237-242
masked_var(x, m)  = masked_mean((x - masked_mean(x,m))^2, m) * n/(n-1),  n = sum(m)   # 245-261 (unbiased)
masked_whiten(x, m, shift_mean=True) = (x - mean) * rsqrt(var + 1e-8)  (+ mean if not shift_mean)  # 264-270
```
Mean/var are over all masked entries of the whole [B][T] batch (not per row).

**`loss`** (one minibatch, lines 819-868) inputs: `cliprange`, `cliprange_value`, `vf_coef`,
`rollout_rows` (rows of the rollout used, informational), `padding_mask`, `padding_mask_p1`,
`new_logprobs` [b][T] (policy log-probs now, before masking; the leaf), `old_logprobs` (rollout
log-probs, already INVALID_LOGPROB on padding), `vpred` [b][T] (value head now, before masking; the
leaf), `old_values` (= rollout `values_masked`), `advantages` (whitened), `returns`. Expected:
`pg_loss`, `vf_loss`, `loss`, `pg_clipfrac`, `vf_clipfrac`, `approxkl`, `ratio_mean`,
`grad_new_logprobs` [b][T], `grad_vpred` [b][T] (d loss / d leaf; 0 on the masked positions).

```
new = masked_fill(new_logprobs, padding_mask, 1.0);  v = masked_fill(vpred, padding_mask_p1, 0)   # 824-828
vclip = clamp(v, old_values - cliprange_value, old_values + cliprange_value)
vf_loss = 0.5 * masked_mean(max((v - returns)^2, (vclip - returns)^2), ~padding_mask_p1)
vf_clipfrac = masked_mean((vclip - returns)^2 > (v - returns)^2, ~padding_mask_p1)
ratio = exp(new - old_logprobs)
pg_loss = masked_mean(max(-A*ratio, -A*clamp(ratio, 1-cliprange, 1+cliprange)), ~padding_mask)
loss = pg_loss + vf_coef * vf_loss
pg_clipfrac = masked_mean(-A*clamp(ratio,..) > -A*ratio, ~padding_mask)
approxkl = 0.5 * mean((new - old_logprobs)^2)       # plain mean over ALL b*T entries (padding = 0)
ratio_mean = mean(ratio)                             # plain mean, padding entries are exactly 1
```

### PPO defaults (PPOConfig, TRL v1.9.0)

| field | default |
|---|---|
__PPO_DEFAULTS__

Sampling uses `temperature + 1e-7`, `top_k=0`, `top_p=1.0`, `do_sample=True`,
`max_new_tokens=response_length`; logits are divided by `temperature + 1e-7` before log-softmax
for the policy, the reference and in the update. With `stop_token="eos"` (or `stop_token_id`)
responses are cut after the first stop token and padded.

### PPO metric names (logged once per rollout batch; `*_avg` = mean over the
[num_ppo_epochs, num_mini_batches, gradient_accumulation_steps] stats array; lines 880-906)

* `eps` — episodes per second since training start.
* `objective/kl` — `kl.sum(1).mean()`: per-sequence summed KL estimate, mean over the batch.
* `objective/entropy` — `(-logprobs).sum(1).mean()` on the masked log-probs, so **every padding position
  contributes -1** (INVALID_LOGPROB = 1).
* `objective/non_score_reward` — `non_score_reward.sum(1).mean()`.
* `objective/rlhf_reward` — `objective/non_score_reward + scores.mean()`.
* `objective/scores` — `scores.mean()` (after missing_eos_penalty).
* `policy/approxkl_avg` — mean of the minibatch `approxkl` values.
* `policy/clipfrac_avg` — mean of `pg_clipfrac`.
* `loss/policy_avg` — mean of `pg_loss`.
* `loss/value_avg` — mean of `vf_loss` (already contains the 0.5, not vf_coef).
* `val/clipfrac_avg` — mean of `vf_clipfrac`.
* `policy/entropy_avg` — mean of per-minibatch `entropy.mean()`, entropy = logsumexp(logits) - sum(softmax*logits)
  of the temperature-scaled logits, a plain mean over all positions incl. padding.
* `val/ratio` — mean of per-minibatch `ratio.mean()` (plain mean incl. padding, where ratio = 1).
* `val/ratio_var` — variance (unbiased, torch `.var()`) of those per-minibatch ratio means.
* `val/num_eos_tokens` — count of EOS tokens in the raw (untruncated) responses.
* `lr`, `episode`.
"""


def write_readme():
    text = (README.replace("__TRL__", trl.__version__)
            .replace("__TORCH__", torch.__version__.split("+")[0])
            .replace("__GRPO_DEFAULTS__", grpo_defaults_table())
            .replace("__PPO_DEFAULTS__", "\n".join(f"| `{k}` | `{v}` |" for k, v in PPO_DEFAULTS)))
    path = os.path.join(OUT, "README.md")
    with open(path, "w") as f:
        f.write(text)
    return path


# ----------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check-ppo-source", metavar="PPO_TRAINER_PY",
                    help="TRL's trl/experimental/ppo/ppo_trainer.py (v1.9.0) to cross-check the PPO numbers against")
    a = ap.parse_args()
    assert trl.__version__ == "1.16.0", trl.__version__
    os.makedirs(OUT, exist_ok=True)
    gen = torch.Generator().manual_seed(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adv = gen_grpo_advantages(gen)
        loss = gen_grpo_loss(gen)
    ppo = gen_ppo(gen, a.check_ppo_source)
    meta = {"trl_version": trl.__version__, "torch_version": torch.__version__.split("+")[0], "seed": SEED}
    paths = [
        write_json("grpo_advantages.json", {**meta, "cases": adv}),
        write_json("grpo_loss.json", {**meta, "cases": loss}),
        write_json("ppo.json", {**meta, **ppo}),
        write_readme(),
    ]
    for p in paths:
        print(f"{os.path.relpath(p, ROOT)}: {os.path.getsize(p)} bytes")


if __name__ == "__main__":
    main()
