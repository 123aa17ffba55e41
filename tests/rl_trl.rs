//! GRPO and PPO maths against TRL: the fixtures of `tools/gen_rl_fixtures.py`
//! (tests/fixtures/rl, float64) hold TRL 1.16's own GRPO advantages, losses, gradients and
//! metrics, and TRL's PPO reward, GAE and loss computations (v1.9.0, the last TRL with PPO).
//! Also: the rollout's recorded log-probs equal the training forward's, and a GRPO step runs.

mod common;

use serde_json::Value;
use temper::generate::{GenerationConfig, Sampling};
use temper::loss::{grpo, ppo_clip, ref_kl, token_weights, value_loss, LossType, PolicyCx, Term, TermLog};
use temper::rl::{gae, group_advantages, masked_whiten, ScaleRewards};
use temper::{DType, Tensor};

fn load(name: &str) -> Value {
    let text = std::fs::read_to_string(common::fixture(&format!("rl/{name}"))).expect("fixture");
    serde_json::from_str(&text).expect("json")
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().expect("list").iter().map(|x| x.as_f64().expect("float")).collect()
}

fn rows(v: &Value) -> Vec<Vec<f64>> {
    v.as_array().expect("rows").iter().map(floats).collect()
}

fn close(a: f64, b: f64, tol: f64, what: &str) {
    assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{what}: {a} vs TRL {b}");
}

#[test]
fn grpo_advantages_match_trl() {
    for c in load("grpo_advantages.json")["cases"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let g = c["num_generations"].as_u64().unwrap() as usize;
        let scale = ScaleRewards::parse(c["scale_rewards"].as_str().unwrap()).unwrap();
        let w = floats(&c["reward_weights"]);
        let per = rows(&c["rewards_per_func"]);
        let rewards: Vec<f64> = per.iter().map(|r| r.iter().zip(&w).map(|(x, w)| x * w).sum()).collect();
        for (a, b) in rewards.iter().zip(floats(&c["rewards"])) {
            close(*a, b, 1e-12, &format!("{name}: reward"));
        }
        let (adv, stds) = group_advantages(&rewards, g, scale).unwrap();
        for (a, b) in adv.iter().zip(floats(&c["advantages"])) {
            close(*a, b, 1e-9, &format!("{name}: advantage"));
        }
        close(temper::rl::advantages::std(&rewards), c["reward_std"].as_f64().unwrap(), 1e-12, &format!("{name}: reward_std"));
        let zero = temper::rl::advantages::frac_zero_std(&rewards, &stds, scale);
        close(zero, c["frac_reward_zero_std"].as_f64().unwrap(), 1e-6, &format!("{name}: frac_reward_zero_std"));
    }
}

/// One micro-batch of a loss case: masked tokens flattened, with TRL's normaliser as weights.
fn loss_case(c: &Value) -> (f64, Vec<f64>, TermLog) {
    let lt = LossType::parse(c["loss_type"].as_str().unwrap()).unwrap();
    let mask: Vec<Vec<f64>> = rows(&c["completion_mask"]);
    let (lp, old, rf) = (rows(&c["per_token_logps"]), rows(&c["old_per_token_logps"]), rows(&c["ref_per_token_logps"]));
    let adv_row = floats(&c["advantages"]);
    let flat = |x: &Vec<Vec<f64>>| -> Vec<f64> { x.iter().zip(&mask).flat_map(|(r, m)| r.iter().zip(m).filter(|(_, &m)| m > 0.5).map(|(v, _)| *v)).collect() };
    let lens: Vec<usize> = mask.iter().map(|m| m.iter().filter(|&&x| x > 0.5).count()).collect();
    let adv: Vec<f64> = lens.iter().zip(&adv_row).flat_map(|(&n, &a)| std::iter::repeat_n(a, n)).collect();
    let u = |k: &str| c[k].as_u64().unwrap() as usize;
    let (gas, spg, procs) = (u("gradient_accumulation_steps"), u("steps_per_generation"), u("num_processes"));
    let dapo_norm = u("num_items_in_batch").max(1) * gas / (procs * spg);
    let mut weights = token_weights(lt, &lens, mask.len(), u("max_completion_length"), dapo_norm);
    if lt != LossType::Dapo {
        weights.iter_mut().for_each(|w| *w /= gas as f64);
    }
    let x = Tensor::from_vec(flat(&lp), &[adv.len()], temper::Device::Cpu).unwrap().requires_grad();
    let (old, reff) = (flat(&old), flat(&rf));
    let reference = || Ok(reff.clone());
    let values = || -> temper::Result<Tensor> { unreachable!("GRPO has no critic") };
    let cx = PolicyCx::new(temper::ops::scale(&x, 1.0).unwrap(), &old, &adv, &weights, &[], &[], &reference, &values).unwrap();
    let (beta, lo, hi) = (c["beta"].as_f64().unwrap(), c["epsilon_low"].as_f64().unwrap(), c["epsilon_high"].as_f64().unwrap());
    let policy = grpo().epsilon(lo).epsilon_high(hi);
    let mut log = TermLog::new();
    let loss = if beta == 0.0 {
        policy.eval(&cx, &mut log).unwrap()
    } else {
        (policy + beta * ref_kl().bias_correction(c["use_bias_correction_kl"].as_bool().unwrap())).eval(&cx, &mut log).unwrap()
    };
    let g = loss.backward().unwrap().get(&x).unwrap().to_f64_vec().unwrap();
    (loss.to_scalar().unwrap(), g, log)
}

#[test]
fn grpo_losses_gradients_and_metrics_match_trl() {
    for c in load("grpo_loss.json")["cases"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let (loss, grad, log) = loss_case(c);
        close(loss, c["loss"].as_f64().unwrap(), 1e-10, &format!("{name}: loss"));
        let mask = rows(&c["completion_mask"]);
        let want: Vec<f64> = rows(&c["grad_per_token_logps"]).iter().zip(&mask).flat_map(|(r, m)| r.iter().zip(m).filter(|(_, &m)| m > 0.5).map(|(v, _)| *v).collect::<Vec<_>>()).collect();
        assert_eq!(grad.len(), want.len());
        for (a, b) in grad.iter().zip(&want) {
            close(*a, *b, 1e-10, &format!("{name}: gradient"));
        }
        let get = |k: &str| log.iter().find(|(n, _)| *n == k).map(|(_, v)| *v);
        for (key, field) in [("clip_ratio/low_mean", "clip_ratio_low_mean"), ("clip_ratio/high_mean", "clip_ratio_high_mean"), ("clip_ratio/region_mean", "clip_ratio_region_mean"), ("kl", "kl")] {
            match (get(key), c[field].as_f64()) {
                (Some(a), Some(b)) => close(a, b, 1e-6, &format!("{name}: {key}")),
                (None, None) => {}
                (a, b) => panic!("{name}: {key} is {a:?}, TRL logs {b:?}"),
            }
        }
    }
}

#[test]
fn ppo_gae_and_whitening_match_trl() {
    let f = load("ppo.json");
    for c in f["gae"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let (values, rewards) = (rows(&c["values_masked"]), rows(&c["rewards"]));
        let (adv, ret) = gae(&rewards, &values, c["gamma"].as_f64().unwrap(), c["lam"].as_f64().unwrap());
        for (a, b) in adv.iter().flatten().zip(rows(&c["advantages_unwhitened"]).iter().flatten()) {
            close(*a, *b, 1e-12, &format!("{name}: advantage"));
        }
        for (a, b) in ret.iter().flatten().zip(rows(&c["returns"]).iter().flatten()) {
            close(*a, *b, 1e-12, &format!("{name}: return"));
        }
        // Whitening over the unpadded tokens; padding is 0 afterwards.
        let pad = rows(&c["padding_mask"]);
        let mut kept: Vec<Vec<f64>> = adv.iter().zip(&pad).map(|(r, p)| r.iter().zip(p).filter(|(_, &p)| p < 0.5).map(|(v, _)| *v).collect()).collect();
        masked_whiten(&mut kept, true);
        let want: Vec<f64> = rows(&c["advantages"]).iter().zip(&pad).flat_map(|(r, p)| r.iter().zip(p).filter(|(_, &p)| p < 0.5).map(|(v, _)| *v).collect::<Vec<_>>()).collect();
        for (a, b) in kept.iter().flatten().zip(&want) {
            close(*a, *b, 1e-9, &format!("{name}: whitened advantage"));
        }
    }
}

#[test]
fn ppo_policy_and_value_losses_match_trl() {
    let f = load("ppo.json");
    for c in f["loss"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let pick = |k: &str, mask: &str| -> Vec<f64> {
            rows(&c[k]).iter().zip(rows(&c[mask])).flat_map(|(r, p)| r.iter().zip(p.iter()).filter(|(_, p)| **p < 0.5).map(|(v, _)| *v).collect::<Vec<_>>()).collect()
        };
        let (clip, vclip, vf) = (c["cliprange"].as_f64().unwrap(), c["cliprange_value"].as_f64().unwrap(), c["vf_coef"].as_f64().unwrap());
        let none = || -> temper::Result<Vec<f64>> { unreachable!() };
        // Policy: a token mean over the unpadded tokens.
        let (lp, old, adv) = (pick("new_logprobs", "padding_mask"), pick("old_logprobs", "padding_mask"), pick("advantages", "padding_mask"));
        let w = vec![1.0 / lp.len() as f64; lp.len()];
        let x = Tensor::from_vec(lp.clone(), &[lp.len()], temper::Device::Cpu).unwrap().requires_grad();
        let novalue = || -> temper::Result<Tensor> { unreachable!() };
        let cx = PolicyCx::new(temper::ops::scale(&x, 1.0).unwrap(), &old, &adv, &w, &[], &[], &none, &novalue).unwrap();
        let pg = ppo_clip(clip).eval(&cx, &mut TermLog::new()).unwrap();
        close(pg.to_scalar().unwrap(), c["pg_loss"].as_f64().unwrap(), 1e-10, &format!("{name}: pg_loss"));
        let g = pg.backward().unwrap().get(&x).unwrap().to_f64_vec().unwrap();
        for (a, b) in g.iter().zip(pick("grad_new_logprobs", "padding_mask")) {
            close(*a, b, 1e-10, &format!("{name}: policy gradient"));
        }
        // Value: ½ · token mean over the unpadded tokens plus one (TRL's padding_mask_p1).
        let (v, ov, ret) = (pick("vpred", "padding_mask_p1"), pick("old_values", "padding_mask_p1"), pick("returns", "padding_mask_p1"));
        let wv = vec![1.0 / v.len() as f64; v.len()];
        let vt = Tensor::from_vec(v.clone(), &[v.len()], temper::Device::Cpu).unwrap().requires_grad();
        let vt2 = temper::ops::scale(&vt, 1.0).unwrap();
        let values = || Ok(vt2.clone());
        let dummy = vec![0.0; v.len()];
        let cxv = PolicyCx::new(temper::ops::scale(&vt, 0.0).unwrap(), &dummy, &dummy, &wv, &ov, &ret, &none, &values).unwrap();
        let vl = value_loss(vclip).eval(&cxv, &mut TermLog::new()).unwrap();
        close(vl.to_scalar().unwrap(), c["vf_loss"].as_f64().unwrap(), 1e-10, &format!("{name}: vf_loss"));
        close(pg.to_scalar().unwrap() + vf * vl.to_scalar().unwrap(), c["loss"].as_f64().unwrap(), 1e-10, &format!("{name}: loss"));
        let gv = temper::ops::scale(&vl, vf).unwrap().backward().unwrap().get(&vt).unwrap().to_f64_vec().unwrap();
        for (a, b) in gv.iter().zip(pick("grad_vpred", "padding_mask_p1")) {
            close(*a, b, 1e-10, &format!("{name}: value gradient"));
        }
    }
}

fn tiny_lora() -> temper::models::Llama<temper::adapters::Lora> {
    let base = temper::models::Llama::load(&common::fixture("models/llama_gqa_llama3rope"), DType::F32).unwrap();
    base.with_adapter("default", &temper::adapters::Lora::config(8, 16.0)).unwrap()
}

#[test]
fn rollout_logprobs_equal_the_training_forward() {
    let model = tiny_lora();
    let prompts = vec![vec![1u32, 5, 9, 3], vec![2, 7], vec![4, 4, 8, 1, 6, 2]];
    for (temperature, top_k, top_p) in [(1.0, None, None), (0.7, Some(5), None), (1.3, None, Some(0.9))] {
        let gen = GenerationConfig { max_new_tokens: 12, sampling: Sampling::Sample { temperature, top_k, top_p, seed: 11 }, eos_token_ids: vec![0], ..Default::default() };
        let gap = temper::train::rl::rollout_logprob_gap(&model, &prompts, 4, &gen).unwrap();
        assert!(gap <= 1e-5, "temperature {temperature}: max |sampled − training| log-prob {gap}");
    }
}

#[test]
fn samples_share_the_prompt_and_rows_leave_when_done() {
    let model = tiny_lora();
    let prompts = vec![vec![1u32, 5, 9, 3], vec![2, 7]];
    let gen = GenerationConfig { max_new_tokens: 10, sampling: Sampling::Sample { temperature: 1.0, top_k: None, top_p: None, seed: 5 }, eos_token_ids: vec![0, 1, 2, 3], ..Default::default() };
    let r = temper::generate::rollout(&model, &prompts, 3, &gen, None).unwrap();
    assert_eq!(r.tokens.len(), 6);
    assert_eq!(r.prompt_tokens, 6, "each prompt is prefilled once");
    // Rows that stopped early (EOS ids 0..=3 of a 128-token vocabulary) end at their EOS.
    for (t, f) in r.tokens.iter().zip(&r.finish) {
        assert_eq!(*f == temper::generate::FinishReason::Eos, t.last().is_some_and(|x| *x <= 3));
        assert!(t[..t.len() - 1].iter().all(|x| *x > 3) || *f != temper::generate::FinishReason::Eos);
    }
    assert!(r.finish.iter().any(|f| *f == temper::generate::FinishReason::Eos), "some rows finish early");
    // Each sample continues its own prompt: decoding the prompt once per sample gives the same first token's log-prob distribution.
    let single = temper::generate::rollout(&model, &[prompts[0].clone()], 1, &gen, None).unwrap();
    assert_eq!(single.tokens[0][0], r.tokens[0][0], "the first sample of a prompt draws as a lone rollout does");
}
