#!/usr/bin/env python3
"""Reference numbers from TRL for the preference-optimisation and reward-model losses.

Builds three tiny random Llama checkpoints (a policy, a reference model and a
reward model), then *calls TRL's own trainers* (DPOTrainer, CPOTrainer for
SimPO, ORPOTrainer, KTOTrainer, RewardTrainer) on hand-written batches and
records what they return: the loss, the metrics TRL logs, and the gradients of
a few parameters after `loss.backward()`. Nothing of TRL's loss code is
re-implemented here; the token ids are produced by TRL's own dataset
preprocessing (EOS appending, KTO's KL pairing) from strings that the
character-level tiny_chat tokenizer maps one character to one id, and are
recorded so that the Rust side only needs the ids.

Run from the repository root (CPU only, a few seconds, deterministic):

    /work/venv/bin/python tools/gen_pref_fixtures.py

Output: tests/fixtures/preference/ (see the README.md written there):
    policy/, reference/      LlamaForCausalLM, config.json + model.safetensors (float32)
    reward_model/            LlamaForSequenceClassification (num_labels 1), same layout
    cases.json               ids, log-probs, losses, metrics, gradients, notes
    README.md                what the files are and how TRL computes each loss

Precision: the checkpoints are float32; every recorded number comes from those
weights upcast to float64, and float64 throughout: transformers' Llama normalises
(RMSNorm) and builds the RoPE cos/sin in float32 even for a float64 model, and TRL
1.16's DPO/KTO trainers score tokens with a fused LM head that always works in
float32; those three are swapped for float64 versions of the same formulas
(`precision`). Every case is also run with stock TRL + transformers and the largest
difference recorded (`stock_diff`, ~1e-7).
"""

import contextlib
import json
import math
import os
import shutil
import tempfile
import types
import warnings

import torch

torch.set_num_threads(1)  # fixed reduction order: bit-identical files on every run
torch.use_deterministic_algorithms(True)

import datasets  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)
from transformers.models.llama import modeling_llama  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, RewardConfig, RewardTrainer  # noqa: E402
from trl.trainer import dpo_trainer as trl_dpo_module  # noqa: E402
from trl.trainer import kto_trainer as trl_kto_module  # noqa: E402
from trl.trainer.utils import FusedCausalLMOutput  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "preference")
TOKENIZER_DIR = os.path.join(ROOT, "tests", "fixtures", "tokenizers", "tiny_chat")

# tiny_chat ids: 0 <pad>, 1 <|im_start|>, 2 <|im_end|> (EOS), 3 <unk>, 4 "\n", then chr(32).. : id = ord(c) - 27.
# The model vocabulary is cut to 32, so every character below is in " !\"#$%&'()*+,-./0123456789:".
VOCAB = 32
PAD, EOS = 0, 2
DIMS = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
POLICY_SEED, REFERENCE_SEED, REWARD_SEED = 11, 22, 33
GRAD_PARAMS = ["model.norm.weight", "model.layers.1.self_attn.q_proj.weight", "lm_head.weight"]
REWARD_GRAD_PARAMS = ["score.weight", "model.norm.weight", "model.layers.1.self_attn.q_proj.weight"]
GRAD_DIGITS = 10  # significant digits kept for gradient entries (scalars keep all 17): keeps cases.json small

# (prompt, chosen, rejected): different prompt and completion lengths
PAIRS = [
    ("12+3:", "15", "123"),
    ("7*8:", "56", "54!!"),
    ("(9-4)/5:", "1.0", "1"),
    ("2:", "#2 3'", "&"),
]
# (prompt, completion, label) for KTO: 6 unpaired items, 4 desirable / 2 undesirable
KTO_ITEMS = [
    ("12+3:", "15", True),
    ("7*8:", "54!!", False),
    ("(9-4)/5:", "1.0", True),
    ("2:", "&", False),
    ("9/3:", "3", True),
    ("0-1:", "-1.", True),
]
REWARD_MARGINS = [0.5, -0.25, 1.0, 0.0]  # exactly representable in float32 (TRL's collator makes them float32)

DPO_CASES = [
    ("sigmoid", dict(loss_type=["sigmoid"], loss_weights=None, beta=0.1, label_smoothing=0.0)),
    ("sigmoid_label_smoothing", dict(loss_type=["sigmoid"], loss_weights=None, beta=0.1, label_smoothing=0.2)),
    ("robust", dict(loss_type=["robust"], loss_weights=None, beta=0.1, label_smoothing=0.2)),
    ("ipo", dict(loss_type=["ipo"], loss_weights=None, beta=0.5, label_smoothing=0.0)),
    # beta 0.5 rather than 0.3: with 0.3 every pair is inside the hinge (1 - beta*d > 0); with 0.5 the last pair
    # (index 3) is past it, so both branches of the relu are covered
    ("hinge", dict(loss_type=["hinge"], loss_weights=None, beta=0.5, label_smoothing=0.0)),
    ("sigmoid_ipo_mix", dict(loss_type=["sigmoid", "ipo"], loss_weights=[0.8, 0.2], beta=0.1, label_smoothing=0.0)),
    ("sigmoid_sft_rpo", dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], beta=0.1, label_smoothing=0.0)),
]
SIMPO_CASES = [
    ("simpo", dict(loss_type="simpo", beta=2.0, simpo_gamma=1.0, cpo_alpha=0.0, label_smoothing=0.0)),
    ("cpo_simpo", dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=1.0, label_smoothing=0.0)),
]
ORPO_CASES = [
    ("orpo", dict(beta=0.1)),  # one case: beta only scales the odds-ratio term, which the metrics expose
]
KTO_CASES = [
    ("kto", dict(loss_type="kto", beta=0.1, desirable_weight=1.0, undesirable_weight=1.0)),
    ("kto_weighted", dict(loss_type="kto", beta=0.5, desirable_weight=0.8, undesirable_weight=1.5)),
]
REWARD_CASES = [
    ("plain", dict(center_rewards_coefficient=None), False),
    ("margin", dict(center_rewards_coefficient=None), True),
    ("center_rewards", dict(center_rewards_coefficient=0.01), False),
    ("margin_and_center", dict(center_rewards_coefficient=0.01), True),
]


# --------------------------------------------------------------------------- notes (cases.json "notes" and README.md)

# TRL paths below are relative to site-packages/
NOTES = {
    "general": (
        "Precision: every number is float64 throughout. The checkpoints are float32; they are loaded with "
        "dtype=torch.float64 (sdpa attention, float64 on CPU). Three places compute in float32 even for a float64 "
        "model and are swapped, for the recorded numbers only, for float64 versions of the same formulas "
        "(tools/gen_pref_fixtures.py `precision`): transformers' LlamaRMSNorm.forward (casts to float32 to "
        "normalise), LlamaRotaryEmbedding.forward (inv_freq, cos, sin in float32) and TRL's fused LM head used by "
        "DPOTrainer/KTOTrainer (trl/trainer/utils.py add_fused_lm_head -> trl/kernels/chunked_logprob.py "
        "ChunkedLogProbFunction: log-softmax, entropy and their gradient in float32). Nothing else is touched. "
        "Every case was also run with stock TRL + stock transformers: `stock_diff` (per case: largest |difference| "
        "of loss, of any metric, of any gradient entry) and `stock_diff_logps` / `stock_diff_rewards` are ~1e-7 to "
        "1e-6 absolute -- the tolerance to use against stock TRL, or for a float32 implementation; a float64 "
        "implementation should match the recorded numbers to ~1e-12 relative (gradients: to the "
        "grad_significant_digits rounding). Exception: ORPO casts its log-probs to float32 inside TRL itself (see "
        "orpo). "
        "Data: one process, the whole list of pairs/items is one batch and one step. "
        "Sequences are right-padded with pad id 0 and attention_mask 0, so padding never changes a real position "
        "(causal attention, positions 0..L-1); prompt_ids + completion ids is the whole unpadded sequence. "
        "Token t (t >= 1) is scored by the log-softmax of the logits at position t-1. "
        "'Summed completion log-prob' = sum of log p(token) over the completion tokens (EOS included), prompt excluded. "
        "TRL appends EOS (id 2, '<|im_end|>') to every completion of non-conversational text data (DPO/KTO/Reward: "
        "_prepare_dataset's add_eos; CPO/ORPO: trl/experimental/utils.py add_eos_token_if_needed), so every recorded "
        "completion id list already ends with 2; the tokenizer has no BOS and none is added. "
        "Metrics are what TRL logs for the step (its `log()` averages the values appended since the last log: one "
        "value each here). "
        "Gradients: d loss / d param after loss.backward(), flat row-major (PyTorch [out, in] layout), rounded to "
        "grad_significant_digits significant digits; scalars keep full float64 precision."
    ),
    "dpo": (
        "trl/trainer/dpo_trainer.py DPOTrainer._compute_loss (ref log-probs: same function, or compute_ref_log_probs). "
        "Batch (DataCollatorForPreference): rows = [prompt_i + chosen_i for all i] + [prompt_i + rejected_i for all i]; "
        "labels = input_ids where completion_mask else -100. "
        "logps = SUM of per-token log-probs over the completion (ld_alpha=None), no length normalisation: "
        "policy_{chosen,rejected}_logps, ref_{chosen,rejected}_logps. "
        "chosen_logratio = policy_chosen_logps - ref_chosen_logps, rejected_logratio likewise; "
        "d = chosen_logratio - rejected_logratio (f_divergence_type 'reverse_kl'). Per-pair losses: "
        "sigmoid: -logsigmoid(beta*d). label_smoothing is IGNORED by 'sigmoid' in TRL 1.16 (there is no cDPO "
        "any more: label_smoothing is read only by 'robust', 'exo_pair', 'aot', 'aot_unpaired'), so case "
        "sigmoid_label_smoothing is bit-identical to sigmoid. "
        "robust (rDPO, eps = label_smoothing): (-(1-eps)*logsigmoid(beta*d) + eps*logsigmoid(-beta*d)) / (1-2*eps). "
        "hinge: relu(1 - beta*d). "
        "ipo: n_c, n_r = number of completion tokens of the chosen / rejected sequence (EOS included; "
        "completion_mask.sum, clamp min 1); (chosen_logratio/n_c - rejected_logratio/n_r - 1/(2*beta))^2 "
        "(beta is IPO's tau). "
        "sft: -(sum of the policy's per-token log-probs over ALL chosen completion tokens of the batch) / (total "
        "number of chosen completion tokens of the batch): one token-level mean for the whole batch, the same "
        "value for every pair. TRL 1.16 has no rpo_alpha; RPO = loss_type ['sigmoid','sft'] with loss_weights "
        "[1, alpha] (case sigmoid_sft_rpo, alpha 0.5). "
        "loss = sum over k of loss_weights[k] * mean over pairs of per-pair loss_k (loss_weights default 1.0 each; "
        "one beta shared by all loss types). "
        "Metrics (each a mean over the pairs unless said): rewards/chosen = mean(beta*chosen_logratio), "
        "rewards/rejected = mean(beta*rejected_logratio) (beta*logratio for every loss type, IPO too: no length "
        "normalisation), rewards/accuracies = mean(beta*chosen_logratio > beta*rejected_logratio) (strict), "
        "rewards/margins = mean(beta*(chosen_logratio - rejected_logratio)), logps/chosen = mean(policy_chosen_logps), "
        "logps/rejected = mean(policy_rejected_logps); token-weighted over the batch: logits/chosen = sum over chosen "
        "completion tokens of (mean over the vocabulary of the logits predicting that token) / number of chosen "
        "completion tokens, logits/rejected likewise; entropy = token-weighted mean, over the completion tokens of "
        "chosen AND rejected rows, of the entropy of the predictive distribution (policy); mean_token_accuracy = "
        "fraction of chosen completion tokens whose id is the argmax of its predicting logits (first index on "
        "ties); num_tokens = sum of attention_mask over all 2B rows (TRL accumulates it over steps; one step here)."
    ),
    "simpo": (
        "trl/experimental/cpo/cpo_trainer.py CPOTrainer with CPOConfig(loss_type='simpo'): concatenated_forward, "
        "get_batch_logps, cpo_loss, get_batch_loss_metrics. Reference-free. Ids: tokenize_row gives the same ids as "
        "DPO (prompt, completion + EOS; labels -100 on the prompt). "
        "Log-probs are AVERAGED per token: avg_c = (sum of per-token log-probs over the chosen completion) / (number "
        "of chosen completion tokens, EOS included), avg_r likewise (get_batch_logps(average_log_prob=True), used for "
        "'simpo' and 'ipo'); recorded per pair as policy_chosen_logps / policy_rejected_logps of each case. "
        "z = avg_c - avg_r - simpo_gamma/beta; per-pair loss = -(1-ls)*logsigmoid(beta*z) - ls*logsigmoid(-beta*z) "
        "(ls = label_smoothing = 0 here, so -logsigmoid(beta*(avg_c - avg_r) - simpo_gamma)). "
        "nll_loss = 0 when cpo_alpha == 0 (not computed); otherwise torch CrossEntropyLoss (mean) over the chosen rows "
        "with the completion labels: -(sum of log-probs of all chosen completion tokens of the batch) / (their total "
        "count), token-level over the batch. loss = mean over pairs of per-pair loss + cpo_alpha * nll_loss "
        "(case cpo_simpo = CPO-SimPO). "
        "Metrics (means over pairs): rewards/chosen = mean(beta*avg_c), rewards/rejected = mean(beta*avg_r) (no "
        "gamma), rewards/accuracies = mean(beta*avg_c > beta*avg_r), rewards/margins = mean(beta*(avg_c - avg_r)), "
        "logps/chosen = mean(avg_c), logps/rejected = mean(avg_r), nll_loss; logits/chosen and logits/rejected = "
        "plain mean of EVERY entry of the [B, padded_width, vocab] logits of the chosen / rejected rows, prompt and "
        "pad positions included (padded_width = longest prompt+completion of all 2B rows; pad id 0, attention 0) "
        "-- depends on padding, not worth matching."
    ),
    "orpo": (
        "trl/experimental/orpo/orpo_trainer.py ORPOTrainer: concatenated_forward, get_batch_logps, odds_ratio_loss, "
        "log1mexp, get_batch_loss_metrics. Reference-free; same ids as DPO. "
        "Log-probs AVERAGED per token over the completion (EOS included): avg_c, avg_r (get_batch_logps("
        "average_log_prob=True)); recorded per pair in each case. odds_ratio_loss first CASTS them to float32 "
        "(`.float()`), so the odds-ratio term of the loss (and its gradient), rewards/* and log_odds_* carry float32 "
        "rounding, in stock TRL as here (compare those with ~1e-6 relative tolerance); nll_loss, logps/* and "
        "policy_*_logps stay float64. "
        "log1mexp(x) = log(1 - exp(x)), computed as log1p(-exp(x)) if x < -ln 2 else log(-expm1(x)). "
        "log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r)); ratio = logsigmoid(log_odds). "
        "nll_loss = torch CrossEntropyLoss (mean) over the chosen rows with labels = input_ids wherever "
        "attention_mask is 1 -- PROMPT AND COMPLETION tokens: -(sum of log-probs of tokens 1..L_i-1 of every chosen "
        "sequence) / sum_i (L_i - 1), token-level over the batch (the first token of each row is never a target). "
        "loss = nll_loss - mean over pairs of (beta * ratio). "
        "Metrics (means over pairs): rewards/chosen = mean(beta*avg_c), rewards/rejected = mean(beta*avg_r), "
        "rewards/accuracies = mean(beta*avg_c > beta*avg_r), rewards/margins = mean(beta*(avg_c - avg_r)), "
        "logps/chosen = mean(avg_c), logps/rejected = mean(avg_r), nll_loss, log_odds_ratio = mean(ratio), "
        "log_odds_chosen = mean(log_odds); logits/chosen, logits/rejected = plain mean of every entry of "
        "logits[:, :-1, :] of the chosen / rejected rows at padded_width (prompt and pad positions included)."
    ),
    "kto": (
        "trl/trainer/kto_trainer.py KTOTrainer._prepare_dataset (add_eos, add_kl_completion_ids), "
        "_compute_kl_logps, _compute_loss. Unpaired items (prompt_ids, completion_ids ending in EOS, label). "
        "KL items: the completions are rotated by +1 inside each batch of per_device_train_batch_size items (6 here, "
        "the whole list): KL item i = (prompt_ids of item i, completion_ids of item i-1), item 0 takes the last "
        "item's completion; recorded as kl_items. "
        "logps = SUMMED completion log-probs (policy with gradient: policy_logps; reference: ref_logps); "
        "KL_logps = summed completion log-probs of the KL items under the policy computed under torch.no_grad "
        "(policy_kl_logps; NO gradient flows through the KL term), ref_kl_logps under the reference. "
        "kl = max(0, mean over ALL KL items (6, desirable and undesirable alike) of (policy_kl_logps - "
        "ref_kl_logps)), detached. logratio_i = policy_logps_i - ref_logps_i. "
        "Desirable (label true): loss_i = desirable_weight * (1 - sigmoid(beta*(logratio_i - kl))); undesirable: "
        "loss_i = undesirable_weight * (1 - sigmoid(beta*(kl - logratio_i))). "
        "loss = (sum of the 6 weighted loss_i) / 6 (nanmean over items: divided by the item count, NOT by the sum of "
        "weights). "
        "Metrics: kl; rewards/chosen = sum over desirable of beta*logratio / #desirable, rewards/rejected likewise over "
        "undesirable, rewards/margins = rewards/chosen - rewards/rejected; logps/chosen = mean of policy_logps over "
        "desirable, logps/rejected over undesirable; logits/chosen (/rejected) = token-weighted mean over the "
        "completion tokens of the desirable (undesirable) items of the per-position mean-over-vocabulary logits; "
        "entropy = token-weighted mean over the completion tokens of all items (not the KL items); num_tokens = sum of "
        "attention_mask of the 6 main sequences (KL sequences not counted)."
    ),
    "reward": (
        "trl/trainer/reward_trainer.py RewardTrainer._prepare_dataset / DataCollatorForPreference / compute_loss; "
        "reward = transformers/modeling_layers.py GenericForSequenceClassification.forward "
        "(LlamaForSequenceClassification, num_labels 1, score.weight [1, hidden], no bias). "
        "Ids: with an explicit prompt TRL tokenizes prompt + chosen + EOS (and prompt + rejected + EOS): "
        "reward.pairs[i].chosen_ids = pairs[i].prompt_ids + pairs[i].chosen_ids. Batch rows = [chosen...] + "
        "[rejected...], right-padded with pad id 0 (padded_input_ids). "
        "reward of a row = score(final-norm hidden state) at the RIGHTMOST position whose input id != "
        "config.pad_token_id (argmax of position * (id != pad); the attention mask is not used); with EOS appended "
        "and right padding that is the EOS position, i.e. the last token of the unpadded sequence. "
        "loss = -mean over pairs of logsigmoid(r_c - r_r - margin_i) (margin term only when the data has a "
        "'margin' column; the collator makes it float32, the values here are exact in float32) + "
        "center_rewards_coefficient * mean over pairs of (r_c + r_r)^2 (only when the coefficient is set). "
        "Metrics: min_reward, mean_reward, max_reward over all 2B rewards; accuracy = mean over pairs of (r_c > r_r); "
        "margin = mean over pairs of (r_c - r_r) (the margin column is NOT subtracted); num_tokens = sum of "
        "attention_mask over the 2B rows."
    ),
}


# --------------------------------------------------------------------------- models


def llama_config(**over):
    kw = dict(
        vocab_size=VOCAB,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        initializer_range=0.2,
        bos_token_id=None,
        eos_token_id=EOS,
        pad_token_id=PAD,
        tie_word_embeddings=False,
        hidden_act="silu",
        attention_dropout=0.0,
        **DIMS,
    )
    kw.update(over)
    return LlamaConfig(**kw)


@torch.no_grad()
def randomize(model, seed):
    """Weights ~ N(0, 0.2^2); norm weights ~ 1 + N(0, 0.1^2) so a missing norm scale is caught."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.1 * noise)
        else:
            p.copy_(0.2 * noise)


def save_checkpoint(model, out):
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    gen = os.path.join(out, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)  # not needed: only config.json + model.safetensors are part of the fixture


def build_models():
    for sub, seed in (("policy", POLICY_SEED), ("reference", REFERENCE_SEED)):
        torch.manual_seed(seed)
        m = LlamaForCausalLM(llama_config()).to(torch.float32)
        randomize(m, seed)
        save_checkpoint(m, os.path.join(OUT, sub))
    torch.manual_seed(REWARD_SEED)
    rm = LlamaForSequenceClassification(llama_config(num_labels=1)).to(torch.float32)
    randomize(rm, REWARD_SEED)
    save_checkpoint(rm, os.path.join(OUT, "reward_model"))


def load_causal(sub):
    m = AutoModelForCausalLM.from_pretrained(os.path.join(OUT, sub), dtype=torch.float64, attn_implementation="sdpa")
    assert m.dtype == torch.float64
    return m


def load_reward():
    m = AutoModelForSequenceClassification.from_pretrained(
        os.path.join(OUT, "reward_model"), dtype=torch.float64, attn_implementation="sdpa"
    )
    assert m.dtype == torch.float64 and m.config.num_labels == 1 and m.config.pad_token_id == PAD
    return m


def load_tokenizer():
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    assert tok.pad_token_id == PAD and tok.eos_token_id == EOS and tok.bos_token_id is None
    return tok


# --------------------------------------------------------------------------- float64 throughout


def exact_add_fused_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",)):
    """Drop-in for `trl.trainer.utils.add_fused_lm_head` that keeps the log-softmax in the model dtype.

    Same contract as TRL's fused head (FusedCausalLMOutput; per-token fields are zero where the shifted label is
    -100; `is_top1` = label is the first argmax): `labels[:, 1:]` are scored by `hidden[:, :-1] @ lm_head.weight.T`.
    TRL's kernel (trl/kernels/chunked_logprob.py) runs this in float32 whatever the model dtype; this one runs it
    in float64. Only the per-token log-prob kernel is replaced; the losses, metrics and reductions that use it are
    TRL's own code.
    """
    assert temperature == 1.0 and not cast_lm_head_to_fp32
    original_forward = model.forward

    def _exact_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kw):
        if not fused_lm_head:
            if labels is not None:
                kw["labels"] = labels
            return original_forward(*args, **kw)
        assert shift_labels is None
        kw["use_cache"] = False
        hidden = self.base_model(*args, **kw).last_hidden_state[:, :-1]
        labels = labels[:, 1:]
        mask = labels != -100
        logits = self.get_output_embeddings()(hidden)
        logp = torch.log_softmax(logits, dim=-1)
        target = labels.clamp(min=0)
        log_probs = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).masked_fill(~mask, 0.0)
        entropy = -(logp.exp() * logp).sum(-1).masked_fill(~mask, 0.0)
        mean_logits = logits.detach().mean(-1).masked_fill(~mask, 0.0)
        is_top1 = (logits.detach().argmax(-1) == target) & mask
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(
            loss=loss, log_probs=log_probs, entropy=entropy, mean_logits=mean_logits, is_top1=is_top1, label_mask=mask
        )

    model.forward = types.MethodType(_exact_forward, model)


def rms_norm_f64(self, hidden_states):
    # transformers' LlamaRMSNorm.forward, minus its cast to float32 (a downcast for a float64 model)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def rotary_f64(self, x, position_ids):
    # transformers' LlamaRotaryEmbedding.forward for rope_type "default", with inv_freq, cos and sin in float64
    # instead of float32
    assert self.rope_type == "default"
    theta = self.config.rope_parameters["rope_theta"]
    dim = 2 * self.inv_freq.numel()
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    freqs = position_ids[..., None].to(torch.float64) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


@contextlib.contextmanager
def precision(exact):
    """exact=True: float64 everywhere. transformers' Llama computes RMSNorm and the RoPE cos/sin in float32 even
    for a float64 model, and TRL's fused LM head (DPO, KTO) works in float32; those three are swapped for float64
    versions of the same formulas. exact=False: stock TRL + stock transformers (used for `stock_diff`)."""
    if not exact:
        yield
        return
    saved = (
        modeling_llama.LlamaRMSNorm.forward,
        modeling_llama.LlamaRotaryEmbedding.forward,
        trl_dpo_module.add_fused_lm_head,
        trl_kto_module.add_fused_lm_head,
    )
    modeling_llama.LlamaRMSNorm.forward = rms_norm_f64
    modeling_llama.LlamaRotaryEmbedding.forward = rotary_f64
    trl_dpo_module.add_fused_lm_head = exact_add_fused_lm_head
    trl_kto_module.add_fused_lm_head = exact_add_fused_lm_head
    try:
        yield
    finally:
        (
            modeling_llama.LlamaRMSNorm.forward,
            modeling_llama.LlamaRotaryEmbedding.forward,
            trl_dpo_module.add_fused_lm_head,
            trl_kto_module.add_fused_lm_head,
        ) = saved


# --------------------------------------------------------------------------- helpers


def common_args(tmp, batch_size):
    return dict(
        output_dir=tmp,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        per_device_train_batch_size=batch_size,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def plain_logps(model, prompt_ids, completion_ids):
    """Summed completion log-probs from a plain transformers forward of the unpadded sequence (independent of TRL)."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    logp = torch.log_softmax(logits[:-1], -1)
    per_tok = logp.gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)
    return per_tok[len(prompt_ids) - 1 :].sum().item()


def raw_grads(model, names):
    params = dict(model.named_parameters())
    out = {}
    for n in names:
        g = params[n].grad
        assert g is not None and g.dtype == torch.float64, n
        out[n] = g.detach().clone()
    return out


def rounded(grads):
    return {n: [float(f"{x:.{GRAD_DIGITS}g}") for x in g.reshape(-1).tolist()] for n, g in grads.items()}


def averaged_metrics(store):
    # what TRL's `log()` writes: the mean of the values appended since the last log (one call here)
    return {k: float(sum(v) / len(v)) for k, v in sorted(store.items())}


def tensor_list(t):
    return [float(x) for x in t.reshape(-1).tolist()]


def max_abs_diff(a, b):
    if isinstance(a, dict):
        return max((max_abs_diff(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, torch.Tensor):
        return (a - b).abs().max().item()
    if isinstance(a, list):
        return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)
    return abs(a - b)


def with_stock(run, *args):
    """Run a case in float64 (recorded) and through stock TRL + transformers (only the differences are kept)."""
    with precision(True):
        res = run(*args)
    with precision(False):
        stock = run(*args)
    case = {k: v for k, v in res.items() if k != "grads"}
    case["grads"] = rounded(res["grads"])
    case["stock_diff"] = {k: max_abs_diff(res[k], stock[k]) for k in ("loss", "metrics", "grads")}
    return case


def columns_dataset(records, names, **extra):
    """A datasets.Dataset with one column per tuple position of `records` (named by `names`), plus `extra`."""
    cols = {name: [rec[i] for rec in records] for i, name in enumerate(names)}
    return datasets.Dataset.from_dict({**cols, **extra})


def make_trainer(trainer_cls, args, dataset, n, **models):
    """A TRL trainer in train mode on `dataset` (its preprocessing run by the constructor), its n prepared rows
    and their collated batch."""
    trainer = trainer_cls(**models, args=args, train_dataset=dataset, processing_class=load_tokenizer())
    trainer.model.train()
    rows = [trainer.train_dataset[i] for i in range(n)]
    return trainer, rows, trainer.data_collator(rows)


def loss_case(trainer, inputs, grad_params):
    """TRL's compute_loss on one batch: the loss, the metrics TRL logs for the step, the gradients after backward."""
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return {
        "loss": loss.item(),
        "metrics": averaged_metrics(trainer._metrics["train"]),
        "grads": raw_grads(trainer.model, grad_params),
    }


# --------------------------------------------------------------------------- DPO and KTO (policy + reference)

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
# family -> (trainer, config, records, their dataset columns, the two outputs of compute_ref_log_probs)
WITH_REFERENCE = {
    "dpo": (DPOTrainer, DPOConfig, PAIRS, PAIR_COLUMNS, ("chosen_", "rejected_")),
    "kto": (KTOTrainer, KTOConfig, KTO_ITEMS, ("prompt", "completion", "label"), ("", "kl_")),
}
# (key prefix, trainer attribute) of the two models whose log-probs are recorded
LOGP_MODELS = (("ref", "ref_model"), ("policy", "model"))


def make_ref_trainer(tmp, family, cfg):
    trainer_cls, config_cls, records, columns, _ = WITH_REFERENCE[family]
    policy, ref = load_causal("policy"), load_causal("reference")
    args = config_cls(**common_args(tmp, len(records)), max_length=None, **cfg)
    dataset = columns_dataset(records, columns)
    return make_trainer(trainer_cls, args, dataset, len(records), model=policy, ref_model=ref)


def run_ref_case(tmp, family, cfg):
    trainer, _, batch = make_ref_trainer(tmp, family, cfg)
    return loss_case(trainer, batch, GRAD_PARAMS)


def ref_policy_logps(tmp, family, cfg):
    """Ids exactly as TRL's preprocessing produces them; per-row summed completion log-probs via TRL's own
    compute_ref_log_probs, under the reference then the policy: `{who}_{part}logps` -> list, `part` naming each of
    its two outputs (DPO: chosen, rejected; KTO: the items, the KL items)."""
    *_, parts = WITH_REFERENCE[family]
    trainer, rows, batch = make_ref_trainer(tmp, family, cfg)
    logps = {}
    with torch.no_grad():
        for who, attr in LOGP_MODELS:
            out = trainer.compute_ref_log_probs(getattr(trainer, attr), batch)
            for part, t in zip(parts, out, strict=True):
                logps[f"{who}_{part}logps"] = tensor_list(t)
    return trainer, rows, logps


def check_plain_logps(trainer, logps, i, prompt_ids, completions):
    """Row i of each `{who}_{part}logps` against a plain transformers forward of prompt_ids + completions[part]."""
    for who, attr in LOGP_MODELS:
        for part, completion_ids in completions.items():
            want = plain_logps(getattr(trainer, attr), prompt_ids, completion_ids)
            got = logps[f"{who}_{part}logps"][i]
            assert abs(want - got) < 1e-12, (who, part, i, want, got)


# --------------------------------------------------------------------------- DPO


def gen_dpo(tmp, fixture):
    with precision(True):
        trainer, rows, logps = ref_policy_logps(tmp, "dpo", DPO_CASES[0][1])
        pairs = []
        for (p, c, r), row in zip(PAIRS, rows, strict=True):
            assert row["chosen_ids"][-1] == EOS and row["rejected_ids"][-1] == EOS
            pairs.append(
                {
                    "prompt": p,
                    "chosen": c,
                    "rejected": r,
                    "prompt_ids": row["prompt_ids"],
                    "chosen_ids": row["chosen_ids"],
                    "rejected_ids": row["rejected_ids"],
                }
            )
        # cross-check against a plain transformers forward, one unpadded sequence at a time
        for i, pr in enumerate(pairs):
            sides = {"chosen_": pr["chosen_ids"], "rejected_": pr["rejected_ids"]}
            check_plain_logps(trainer, logps, i, pr["prompt_ids"], sides)
    with precision(False):
        _, _, stock_logps = ref_policy_logps(tmp, "dpo", DPO_CASES[0][1])
    fixture["pairs"] = pairs
    fixture.update(logps)
    fixture["stock_diff_logps"] = max_abs_diff(logps, stock_logps)

    cases = [{"name": name, "config": cfg, **with_stock(run_ref_case, tmp, "dpo", cfg)} for name, cfg in DPO_CASES]
    by_name = {c["name"]: c for c in cases}
    # TRL 1.16 ignores label_smoothing for loss_type "sigmoid" (no cDPO): bit-identical to the plain case
    a, b = by_name["sigmoid"], by_name["sigmoid_label_smoothing"]
    assert a["loss"] == b["loss"] and a["grads"] == b["grads"] and a["metrics"] == b["metrics"]
    # the hinge case has pairs on both sides of the hinge
    beta = by_name["hinge"]["config"]["beta"]
    deltas = [
        (logps["policy_chosen_logps"][i] - logps["ref_chosen_logps"][i])
        - (logps["policy_rejected_logps"][i] - logps["ref_rejected_logps"][i])
        for i in range(len(PAIRS))
    ]
    assert any(beta * d > 1 for d in deltas) and any(beta * d < 1 for d in deltas), deltas
    fixture["dpo"] = cases


# --------------------------------------------------------------------------- SimPO (CPO trainer) and ORPO


def check_cpo_like_ids(rows, pairs):
    for row, pr in zip(rows, pairs, strict=True):
        n = len(pr["prompt_ids"])
        assert row["prompt_input_ids"] == pr["prompt_ids"], (row["prompt_input_ids"], pr["prompt_ids"])
        assert row["chosen_input_ids"] == pr["prompt_ids"] + pr["chosen_ids"]
        assert row["rejected_input_ids"] == pr["prompt_ids"] + pr["rejected_ids"]
        assert row["chosen_labels"] == [-100] * n + pr["chosen_ids"]
        assert row["rejected_labels"] == [-100] * n + pr["rejected_ids"]


def run_cpo_like(tmp, trainer_cls, config_cls, cfg, pairs):
    policy = load_causal("policy")
    args = config_cls(**common_args(tmp, len(PAIRS)), remove_unused_columns=False, **cfg)
    dataset = columns_dataset(PAIRS, PAIR_COLUMNS)
    trainer, rows, batch = make_trainer(trainer_cls, args, dataset, len(PAIRS), model=policy)
    check_cpo_like_ids(rows, pairs)
    with torch.no_grad():
        fwd = trainer.concatenated_forward(trainer.model, batch)
    trainer.model.zero_grad(set_to_none=True)
    loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch, train_eval="train")
    loss.backward()
    return {
        "loss": loss.item(),
        "metrics": {k: float(v) for k, v in sorted(metrics.items())},
        "policy_chosen_logps": tensor_list(fwd[0]),
        "policy_rejected_logps": tensor_list(fwd[1]),
        "padded_width": max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1]),
        "grads": raw_grads(trainer.model, GRAD_PARAMS),
    }


def gen_simpo_orpo(tmp, fixture):
    for key, cases, trainer_cls, config_cls in (
        ("simpo", SIMPO_CASES, CPOTrainer, CPOConfig),
        ("orpo", ORPO_CASES, ORPOTrainer, ORPOConfig),
    ):
        fixture[key] = []
        for name, cfg in cases:
            case = with_stock(run_cpo_like, tmp, trainer_cls, config_cls, cfg, fixture["pairs"])
            fixture[key].append({"name": name, "config": cfg, **case})


# --------------------------------------------------------------------------- KTO


def gen_kto(tmp, fixture):
    with precision(True):
        trainer, rows, logps = ref_policy_logps(tmp, "kto", KTO_CASES[0][1])
        items, kl_items = [], []
        for (p, c, lab), row in zip(KTO_ITEMS, rows, strict=True):
            assert row["completion_ids"][-1] == EOS and row["label"] == lab
            items.append(
                {
                    "prompt": p,
                    "completion": c,
                    "prompt_ids": row["prompt_ids"],
                    "completion_ids": row["completion_ids"],
                    "label": lab,
                }
            )
            kl_items.append({"prompt_ids": row["prompt_ids"], "completion_ids": row["KL_completion_ids"]})
        n = len(rows)
        for i in range(n):
            # the rotation TRL applies: item i is paired with the completion of item i-1 (item 0 with item n-1)
            assert kl_items[i]["completion_ids"] == items[(i - 1) % n]["completion_ids"]
            completions = {"": items[i]["completion_ids"], "kl_": kl_items[i]["completion_ids"]}
            check_plain_logps(trainer, logps, i, items[i]["prompt_ids"], completions)
    with precision(False):
        _, _, stock_logps = ref_policy_logps(tmp, "kto", KTO_CASES[0][1])
    fixture["kto"] = {
        "items": items,
        "kl_items": kl_items,
        **logps,
        "stock_diff_logps": max_abs_diff(logps, stock_logps),
        "cases": [
            {"name": name, "config": cfg, **with_stock(run_ref_case, tmp, "kto", cfg)} for name, cfg in KTO_CASES
        ],
    }


# --------------------------------------------------------------------------- reward model


def make_reward_trainer(tmp, cfg, with_margin):
    args = RewardConfig(**common_args(tmp, len(PAIRS)), max_length=None, **cfg)
    dataset = columns_dataset(PAIRS, PAIR_COLUMNS, **({"margin": REWARD_MARGINS} if with_margin else {}))
    return make_trainer(RewardTrainer, args, dataset, len(PAIRS), model=load_reward())


def run_reward(tmp, cfg, with_margin):
    trainer, _, batch = make_reward_trainer(tmp, cfg, with_margin)
    return loss_case(trainer, dict(batch), REWARD_GRAD_PARAMS)


def reward_values(tmp):
    trainer, rows, batch = make_reward_trainer(tmp, REWARD_CASES[0][1], False)
    with torch.no_grad():
        rewards = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    rc, rr = rewards.squeeze(-1).chunk(2)
    return trainer, rows, batch, {"rewards_chosen": tensor_list(rc), "rewards_rejected": tensor_list(rr)}


def gen_reward(tmp, fixture):
    with precision(True):
        trainer, rows, batch, rewards = reward_values(tmp)
        for r, pr in zip(rows, fixture["pairs"], strict=True):
            assert r["chosen_ids"] == pr["prompt_ids"] + pr["chosen_ids"]
            assert r["rejected_ids"] == pr["prompt_ids"] + pr["rejected_ids"]
        # each sequence alone, unpadded: the reward is the score at its last token
        for i, r in enumerate(rows):
            for side in ("chosen", "rejected"):
                with torch.no_grad():
                    v = trainer.model(input_ids=torch.tensor([r[f"{side}_ids"]])).logits.item()
                assert abs(v - rewards[f"rewards_{side}"][i]) < 1e-12, (side, i)
    with precision(False):
        *_, stock_rewards = reward_values(tmp)
    cases = []
    for name, cfg, with_margin in REWARD_CASES:
        case = with_stock(run_reward, tmp, cfg, with_margin)
        cases.append({"name": name, "config": {**cfg, "margin": REWARD_MARGINS if with_margin else None}, **case})
    fixture["reward"] = {
        "pairs": [{"chosen_ids": r["chosen_ids"], "rejected_ids": r["rejected_ids"]} for r in rows],
        "padded_input_ids": batch["input_ids"].tolist(),
        **rewards,
        "stock_diff_rewards": max_abs_diff(rewards, stock_rewards),
        "grad_params": REWARD_GRAD_PARAMS,
        "cases": cases,
    }


# --------------------------------------------------------------------------- output


def fmt(obj, indent=0):
    """JSON with numbers lists on one line (keeps the file small and diffable)."""
    pad = "  " * indent
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f'{pad}  {json.dumps(k)}: {fmt(v, indent + 1)}' for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list):
        if all(not isinstance(x, (dict, list)) for x in obj):
            return "[" + ", ".join(fmt(x) for x in obj) + "]"
        items = [pad + "  " + fmt(x, indent + 1) for x in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    if isinstance(obj, float):
        assert math.isfinite(obj)
        return repr(obj)
    return json.dumps(obj)


README_HEAD = """# Preference / reward-model reference fixtures (from TRL {trl_version})

Generated by `tools/gen_pref_fixtures.py`; regenerate from the repository root with

    /work/venv/bin/python tools/gen_pref_fixtures.py

(CPU only, about 30 seconds, bit-identical output on every run; needs trl {trl_version}, transformers
{transformers_version}, torch {torch_version} as in /work/venv). The numbers are what TRL's own trainers
return (DPOTrainer, KTOTrainer, RewardTrainer, trl.experimental CPOTrainer for SimPO, ORPOTrainer) when
called on hand-built batches with the ids recorded here; nothing of TRL's loss code is re-implemented.

## Files

| path | what |
|---|---|
| `policy/` | `LlamaForCausalLM`, config.json + model.safetensors (float32): hidden 16, 2 layers, 4 heads / 2 KV heads, intermediate 32, vocab 32, untied `lm_head`, seed {policy_seed} |
| `reference/` | same architecture, seed {reference_seed}: the DPO / KTO reference model |
| `reward_model/` | `LlamaForSequenceClassification`, `num_labels` 1, `pad_token_id` 0, same sizes, seed {reward_seed}; `score.weight` is [1, 16] |
| `cases.json` | ids, log-probs, losses, metrics and gradients (schema below), plus the `notes` repeated in this file |

Norm weights are 1 + N(0, 0.1^2) and all other weights N(0, 0.2^2), so a missing norm scale shows.
Ids come from the character-level tokenizer `tests/fixtures/tokenizers/tiny_chat` (pad 0, EOS 2, no BOS;
character c -> id ord(c) - 27), restricted to characters whose id is below 32.

## cases.json

- `dtype` ("float64": how every number was computed), `trl_version`, `transformers_version`, `torch_version`,
  `vocab_size`, `pad_token_id`, `eos_token_id`, `grad_params`, `grad_significant_digits`, `notes` (per family).
- `pairs[i]`: `prompt_ids`, `chosen_ids`, `rejected_ids` (completion ids as TRL scores them, EOS included:
  the sequence is `prompt_ids + chosen_ids`), plus the source strings.
- `ref_chosen_logps`, `ref_rejected_logps`, `policy_chosen_logps`, `policy_rejected_logps`: summed completion
  log-probs per pair (TRL's `DPOTrainer.compute_ref_log_probs`, checked against a plain transformers forward
  of each unpadded sequence to 1e-12); `stock_diff_logps` (see the general notes).
- `dpo[]`: `name`, `config` (DPOConfig fields), `loss`, `metrics` (TRL's names), `grads` (`grad_params` ->
  flat row-major list), `stock_diff` (`loss`, `metrics`, `grads`: largest |difference| to stock TRL +
  transformers, see the general notes).
- `simpo[]`, `orpo[]`: `name`, `config`, `loss`, `metrics`, `grads`, `policy_chosen_logps` /
  `policy_rejected_logps` (per-token AVERAGED completion log-probs per pair, as these trainers use them),
  `padded_width` (width of the padded batch, only for the logits/* metrics), `stock_diff`.
- `kto`: `items[]` (`prompt_ids`, `completion_ids`, `label`), `kl_items[]` (`prompt_ids`, `completion_ids`),
  `ref_logps`, `ref_kl_logps`, `policy_logps`, `policy_kl_logps` (summed), `stock_diff_logps`, `cases[]` as for
  DPO (config: KTOConfig fields `loss_type`, `beta`, `desirable_weight`, `undesirable_weight`).
- `reward`: `pairs[]` (`chosen_ids`, `rejected_ids`: full sequences, prompt included, EOS last),
  `padded_input_ids` (the collated batch, chosen rows first), `rewards_chosen`, `rewards_rejected`,
  `stock_diff_rewards`, `grad_params` (`score.weight`, `model.norm.weight`,
  `model.layers.1.self_attn.q_proj.weight`), `cases[]` (`name`, `config` with `center_rewards_coefficient` and
  `margin` (per pair, or null: no margin column), `loss`, `metrics`, `grads`, `stock_diff`).

## How TRL {trl_version} computes each loss
"""


def readme(fixture):
    head = README_HEAD.format(
        trl_version=fixture["trl_version"],
        transformers_version=fixture["transformers_version"],
        torch_version=fixture["torch_version"],
        policy_seed=POLICY_SEED,
        reference_seed=REFERENCE_SEED,
        reward_seed=REWARD_SEED,
    )
    titles = {
        "general": "General",
        "dpo": "DPO (`dpo`)",
        "simpo": "SimPO / CPO-SimPO (`simpo`)",
        "orpo": "ORPO (`orpo`)",
        "kto": "KTO (`kto`)",
        "reward": "Reward model (`reward`)",
    }
    parts = [head]
    for key, text in fixture["notes"].items():
        parts.append(f"\n### {titles[key]}\n\n{text}\n")
    cases = {fam: [c["name"] for c in fixture[fam]] for fam in ("dpo", "simpo", "orpo")}
    cases["kto"] = [c["name"] for c in fixture["kto"]["cases"]]
    cases["reward"] = [c["name"] for c in fixture["reward"]["cases"]]
    parts.append("\n## Cases\n\n")
    configs = {fam: [c["config"] for c in fixture[fam]] for fam in ("dpo", "simpo", "orpo")}
    configs["kto"] = [c["config"] for c in fixture["kto"]["cases"]]
    configs["reward"] = [c["config"] for c in fixture["reward"]["cases"]]
    for fam, names in cases.items():
        for name, cfg in zip(names, configs[fam], strict=True):
            parts.append(f"- `{fam}` / `{name}`: `{json.dumps(cfg)}`\n")
    parts.append(
        "\nThe DPO hinge case uses beta 0.5 so that one pair is past the hinge (relu = 0) and three are not. "
        "`sigmoid_label_smoothing` is kept to pin down that TRL 1.16 ignores label_smoothing there.\n"
    )
    return "".join(parts)


def main():
    hf_logging.set_verbosity_error()
    warnings.simplefilter("ignore")
    datasets.disable_progress_bars()
    os.makedirs(OUT, exist_ok=True)
    build_models()
    fixture = {
        "dtype": "float64",
        "trl_version": trl.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "generator": "tools/gen_pref_fixtures.py",
        "models": {"policy": "policy/", "reference": "reference/", "reward": "reward_model/"},
        "vocab_size": VOCAB,
        "pad_token_id": PAD,
        "eos_token_id": EOS,
        "grad_params": GRAD_PARAMS,
        "grad_significant_digits": GRAD_DIGITS,
        "notes": NOTES,
    }
    tmp = tempfile.mkdtemp(prefix="gen_pref_fixtures_")
    try:
        gen_dpo(tmp, fixture)
        gen_simpo_orpo(tmp, fixture)
        gen_kto(tmp, fixture)
        gen_reward(tmp, fixture)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        f.write(fmt(fixture) + "\n")
    readme_path = os.path.join(OUT, "README.md")
    # keep the section that tools/gen_pref_tokenization.py maintains at the end of the file
    kept = ""
    if os.path.exists(readme_path):
        with open(readme_path) as f:
            old = f.read()
        marker = "<!-- gen_pref_tokenization: start -->"
        if marker in old:
            kept = "\n" + marker + old.split(marker, 1)[1]
    with open(readme_path, "w") as f:
        f.write(readme(fixture) + kept)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
