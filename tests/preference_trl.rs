//! Preference and reward-model losses against TRL 1.16: the fixtures of
//! `tools/gen_pref_fixtures.py` (tests/fixtures/preference, float64) hold TRL's own losses, metrics
//! and gradients for DPO (sigmoid, robust, IPO, hinge, a weighted mix, RPO), SimPO, CPO-SimPO,
//! ORPO, KTO and the Bradley–Terry reward loss on a tiny Llama. temper computes the same from
//! the same token ids, packed and unpacked.

mod common;

use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use temper::data::preference::{KtoItem, PreferencePair, Sequence};
use temper::loss::{bradley_terry, kto, Dpo, DpoLoss, Orpo, PairTerm, Simpo, TermLog, Weighted};
use temper::models::Llama;
use temper::optim::AdamW;
use temper::train::preference::{kl_sequences, kto_batches, pair_batches, Reference};
use temper::train::Trainer;
use temper::{DType, ModuleExt, Tensor};

fn cases() -> Value {
    let text = std::fs::read_to_string(common::fixture("preference/cases.json")).expect("cases.json");
    serde_json::from_str(&text).expect("json")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("ids").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().expect("floats").iter().map(|x| x.as_f64().expect("float")).collect()
}

fn model(dir: &str) -> Llama {
    let mut m = Llama::load(&common::fixture(&format!("preference/{dir}")), DType::F64).expect("fixture model");
    m.unfreeze(".").expect("unfreeze");
    m
}

fn pairs(c: &Value) -> Vec<PreferencePair> {
    c["pairs"]
        .as_array()
        .expect("pairs")
        .iter()
        .enumerate()
        .map(|(i, p)| PreferencePair {
            chosen: Sequence::new(ids(&p["prompt_ids"]), ids(&p["chosen_ids"])),
            rejected: Sequence::new(ids(&p["prompt_ids"]), ids(&p["rejected_ids"])),
            margin: 0.0,
            source: format!("pair {i}"),
        })
        .collect()
}

fn grads_of(m: &Llama, loss: &Tensor, names: &[String]) -> HashMap<String, Vec<f64>> {
    let g = loss.backward().expect("backward");
    let params: HashMap<String, Tensor> = m.named_parameters().into_iter().collect();
    names
        .iter()
        .map(|n| {
            let t = params.get(n).unwrap_or_else(|| panic!("no parameter {n}; have {:?}", params.keys().collect::<Vec<_>>()));
            (n.clone(), g.get(t).unwrap_or_else(|| panic!("no gradient for {n} (requires_grad {})", t.requires_grad_flag())).to_f64_vec().expect("grad"))
        })
        .collect()
}

/// Loss to 1e-9 relative, the TRL metrics temper logs to 1e-9, gradients to 1e-7 (the fixture
/// rounds them to 10 digits).
fn check(name: &str, loss: f64, log: &TermLog, grads: &HashMap<String, Vec<f64>>, case: &Value, loss_tol: f64) {
    let want = case["loss"].as_f64().expect("loss");
    assert!((loss - want).abs() <= loss_tol * want.abs().max(1.0), "{name}: loss {loss} vs TRL {want}");
    let mut compared = 0;
    for (k, v) in log {
        if let Some(w) = case["metrics"].get(*k).and_then(|w| w.as_f64()) {
            assert!((v - w).abs() <= loss_tol * w.abs().max(1.0), "{name}: {k} {v} vs TRL {w}");
            compared += 1;
        }
    }
    assert!(compared >= 4, "{name}: only {compared} metrics matched TRL's names: {log:?}");
    for (p, w) in case["grads"].as_object().expect("grads") {
        let err = common::relative_error(&grads[p], &floats(w));
        assert!(err < 1e-7, "{name}: gradient of {p} off by {err}");
    }
}

fn pair_case<L: for<'a> temper::loss::Term<temper::loss::PairCx<'a>>>(c: &Value, case: &Value, loss: L, pack: bool, tol: f64) {
    let name = case["name"].as_str().expect("name");
    let trainer = Trainer::preference(model("policy"), loss, AdamW::lr(0.0));
    let mut b = pair_batches(&pairs(c), 4, 0, pack).expect("batch").remove(0);
    b.ref_logps = Some((floats(&c["ref_chosen_logps"]), floats(&c["ref_rejected_logps"])));
    let mut log = TermLog::new();
    let l = trainer.pair_loss(&b, &mut log).expect("loss");
    let names: Vec<String> = c["grad_params"].as_array().expect("names").iter().map(|n| n.as_str().expect("name").to_string()).collect();
    let g = grads_of(&trainer.model, &l, &names);
    check(name, l.to_scalar().expect("scalar"), &log, &g, case, tol);
}

fn dpo_terms(case: &Value) -> Weighted<PairTerm> {
    let cfg = &case["config"];
    let beta = cfg["beta"].as_f64().expect("beta");
    let types: Vec<&str> = cfg["loss_type"].as_array().expect("types").iter().map(|t| t.as_str().expect("type")).collect();
    let weights = cfg["loss_weights"].as_array().map(|w| floats(&Value::Array(w.clone()))).unwrap_or_else(|| vec![1.0; types.len()]);
    let eps = cfg["label_smoothing"].as_f64().unwrap_or(0.0);
    Weighted(
        types
            .iter()
            .zip(weights)
            .map(|(t, w)| {
                let term = match *t {
                    "sft" => PairTerm::CeOnChosen,
                    // TRL 1.16's sigmoid ignores label_smoothing (no cDPO); robust reads it.
                    "sigmoid" => PairTerm::Dpo(Dpo { beta, kind: DpoLoss::Sigmoid, label_smoothing: 0.0 }),
                    other => PairTerm::Dpo(Dpo { beta, kind: DpoLoss::parse(other).expect("known loss"), label_smoothing: eps }),
                };
                (w, term)
            })
            .collect(),
    )
}

#[test]
fn dpo_losses_metrics_and_gradients_match_trl() {
    let c = cases();
    for case in c["dpo"].as_array().expect("dpo") {
        for pack in [true, false] {
            pair_case(&c, case, dpo_terms(case), pack, 1e-9);
        }
    }
}

#[test]
fn simpo_and_orpo_match_trl() {
    let c = cases();
    for case in c["simpo"].as_array().expect("simpo") {
        let cfg = &case["config"];
        let mut terms = vec![(1.0, PairTerm::Simpo(Simpo { beta: cfg["beta"].as_f64().unwrap(), gamma: cfg["simpo_gamma"].as_f64().unwrap(), label_smoothing: 0.0 }))];
        let alpha = cfg["cpo_alpha"].as_f64().unwrap();
        if alpha != 0.0 {
            terms.push((alpha, PairTerm::CeOnChosen));
        }
        pair_case(&c, case, Weighted(terms), true, 1e-9);
    }
    for case in c["orpo"].as_array().expect("orpo") {
        let lambda = case["config"]["beta"].as_f64().unwrap();
        // TRL casts ORPO's averaged log-probs to float32 inside its loss: 1e-6.
        pair_case(&c, case, Weighted(vec![(1.0, PairTerm::Orpo(Orpo { lambda }))]), true, 1e-6);
    }
}

#[test]
fn policy_and_reference_log_probs_match_trl_through_every_reference_source() {
    let c = cases();
    let p = pairs(&c);
    let mut b = pair_batches(&p, 4, 0, true).expect("batch").remove(0);
    let policy = model("policy");
    let off = temper::models::Mode { adapters: false, training: false };
    let lp = temper::train::preference::sequence_logps(&policy, &b.seqs, off).expect("logps").to_f64_vec().expect("vec");
    let want: Vec<f64> = floats(&c["policy_chosen_logps"]).into_iter().chain(floats(&c["policy_rejected_logps"])).collect();
    assert!(common::relative_error(&lp, &want) < 1e-12, "{lp:?} vs {want:?}");
    // A frozen reference model gives the recorded reference log-probs; precomputing them from it too.
    let reference = Llama::load(&common::fixture("preference/reference"), DType::F64).expect("reference");
    let trainer = Trainer::preference(model("policy"), dpo_terms(&c["dpo"][0]), AdamW::lr(0.0)).with_reference(Reference::Model(Arc::new(reference.clone())));
    let mut log = TermLog::new();
    let l = trainer.pair_loss(&b, &mut log).expect("loss").to_scalar().expect("scalar");
    assert!((l - c["dpo"][0]["loss"].as_f64().unwrap()).abs() < 1e-9);
    temper::train::preference::precompute_pair_reference(&reference, std::slice::from_mut(&mut b)).expect("precompute");
    let (rc, rr) = b.ref_logps.clone().expect("filled");
    assert!(common::relative_error(&rc, &floats(&c["ref_chosen_logps"])) < 1e-12);
    assert!(common::relative_error(&rr, &floats(&c["ref_rejected_logps"])) < 1e-12);
    // Full fine-tuning with "adapters off" as the reference is refused: the policy is the base.
    let b2 = pair_batches(&p, 4, 0, true).expect("batch").remove(0);
    let e = trainer.pair_loss(&b2, &mut TermLog::new()).map(|_| ());
    assert!(e.is_ok(), "the trainer holds a frozen reference");
    let plain = Trainer::preference(model("policy"), dpo_terms(&c["dpo"][0]), AdamW::lr(0.0));
    let e = plain.pair_loss(&b2, &mut TermLog::new()).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("no adapter") && e.contains("frozen reference"), "{e}");
}

#[test]
fn kto_matches_trl() {
    let c = cases();
    let k = &c["kto"];
    let items: Vec<KtoItem> = k["items"]
        .as_array()
        .expect("items")
        .iter()
        .enumerate()
        .map(|(i, it)| KtoItem { seq: Sequence::new(ids(&it["prompt_ids"]), ids(&it["completion_ids"])), label: it["label"].as_bool().unwrap(), source: format!("item {i}") })
        .collect();
    let reference = Llama::load(&common::fixture("preference/reference"), DType::F64).expect("reference");
    let names: Vec<String> = c["grad_params"].as_array().expect("names").iter().map(|n| n.as_str().unwrap().to_string()).collect();
    for case in k["cases"].as_array().expect("cases") {
        let cfg = &case["config"];
        let loss = kto(cfg["beta"].as_f64().unwrap()).weights(cfg["desirable_weight"].as_f64().unwrap(), cfg["undesirable_weight"].as_f64().unwrap());
        let trainer = Trainer::kto(model("policy"), loss, AdamW::lr(0.0)).with_reference(Reference::Model(Arc::new(reference.clone())));
        let b = kto_batches(&items, &kl_sequences(&items, 6), 6, 0, true).expect("batch").remove(0);
        // The mismatched KL items are TRL's: item i's prompt with item i−1's completion.
        for (i, (it, kl)) in k["kl_items"].as_array().unwrap().iter().zip(kl_sequences(&items, 6)).enumerate() {
            assert_eq!((ids(&it["prompt_ids"]), ids(&it["completion_ids"])), (kl.prompt, kl.completion), "KL item {i}");
        }
        let mut log = TermLog::new();
        let l = trainer.kto_loss(&b, &mut log).expect("loss");
        let g = grads_of(&trainer.model, &l, &names);
        check(case["name"].as_str().unwrap(), l.to_scalar().unwrap(), &log, &g, case, 1e-9);
    }
}

#[test]
fn reward_model_rewards_loss_and_gradients_match_transformers_and_trl() {
    let c = cases();
    let r = &c["reward"];
    let names: Vec<String> = r["grad_params"].as_array().expect("names").iter().map(|n| n.as_str().unwrap().to_string()).collect();
    for case in r["cases"].as_array().expect("cases") {
        let cfg = &case["config"];
        let margins = cfg["margin"].as_array().map(|m| floats(&Value::Array(m.clone()))).unwrap_or_else(|| vec![0.0; 4]);
        let p: Vec<PreferencePair> = r["pairs"]
            .as_array()
            .unwrap()
            .iter()
            .zip(&margins)
            .enumerate()
            .map(|(i, (pp, &m))| {
                // The whole sequence is scored: split anywhere, here after the first token.
                let (cid, rid) = (ids(&pp["chosen_ids"]), ids(&pp["rejected_ids"]));
                PreferencePair { chosen: Sequence::new(cid[..1].to_vec(), cid[1..].to_vec()), rejected: Sequence::new(rid[..1].to_vec(), rid[1..].to_vec()), margin: m, source: format!("pair {i}") }
            })
            .collect();
        let loss = bradley_terry().center_rewards(cfg["center_rewards_coefficient"].as_f64().unwrap_or(0.0));
        let trainer = Trainer::reward_model(model("reward_model"), loss, AdamW::lr(0.0));
        for pack in [true, false] {
            let b = pair_batches(&p, 4, 0, pack).expect("batch").remove(0);
            let rewards = temper::train::preference::sequence_rewards(&trainer.model, &b.seqs, temper::models::Mode { adapters: true, training: false }).unwrap().to_f64_vec().unwrap();
            let want: Vec<f64> = floats(&r["rewards_chosen"]).into_iter().chain(floats(&r["rewards_rejected"])).collect();
            assert!(common::relative_error(&rewards, &want) < 1e-12, "{rewards:?} vs {want:?}");
            let mut log = TermLog::new();
            let l = trainer.reward_loss(&b, &mut log).expect("loss");
            let g = grads_of(&trainer.model, &l, &names);
            check(case["name"].as_str().unwrap(), l.to_scalar().unwrap(), &log, &g, case, 1e-9);
        }
    }
}

/// Records → token ids exactly as TRL 1.16's `DPOTrainer` / `KTOTrainer` dataset preparation
/// gives them (tools/gen_pref_tokenization.py): plain strings (EOS appended once), conversations
/// through the chat template, an implicit prompt (the shared messages), and KTO items.
#[test]
fn preference_and_kto_records_tokenize_as_trl_does() {
    use temper::data::preference::{load_kto, load_pairs};
    use temper::data::{DatasetSpec, Format, TokenizeOptions};
    let want: Value = serde_json::from_str(&std::fs::read_to_string(common::fixture("preference/tokenization.json")).unwrap()).unwrap();
    let tok = temper::tokenizer::Tokenizer::from_hf_dir(&common::fixture("tokenizers/tiny_chat")).unwrap();
    let opts = TokenizeOptions::new(512);
    for (file, records) in want["files"].as_object().unwrap() {
        let path = common::fixture(&format!("preference/data/{file}"));
        let records = records.as_array().unwrap();
        if file.starts_with("kto") {
            let (items, report) = load_kto(&DatasetSpec::new(&path, Format::Kto), &tok, &opts).unwrap();
            assert_eq!(report.kept, records.len(), "{file}: {report}");
            for (it, r) in items.iter().zip(records) {
                assert_eq!((&it.seq.prompt, &it.seq.completion, it.label), (&ids(&r["prompt_ids"]), &ids(&r["completion_ids"]), r["label"].as_bool().unwrap()), "{file} {}", it.source);
            }
        } else {
            let (pairs, report) = load_pairs(&DatasetSpec::new(&path, Format::Preference), &tok, &opts).unwrap();
            assert_eq!(report.kept, records.len(), "{file}: {report}");
            for (p, r) in pairs.iter().zip(records) {
                assert_eq!(p.chosen.prompt, ids(&r["prompt_ids"]), "{file} {}", p.source);
                assert_eq!(p.chosen.completion, ids(&r["chosen_ids"]), "{file} {}", p.source);
                assert_eq!(p.rejected.completion, ids(&r["rejected_ids"]), "{file} {}", p.source);
            }
        }
    }
}

/// The DSL composes the same loss with static types: `dpo(0.1) + 0.5 * ce_on_chosen()` is TRL's
/// `loss_type = ["sigmoid", "sft"]`, `loss_weights = [1, 0.5]`; `0.8 * dpo + 0.2 * ipo` its mix.
#[test]
fn dsl_compositions_equal_trl_loss_type_lists() {
    use temper::loss::{ce_on_chosen, dpo, ipo};
    let c = cases();
    let case = |name: &str| c["dpo"].as_array().unwrap().iter().find(|x| x["name"] == name).unwrap().clone();
    pair_case(&c, &case("sigmoid_sft_rpo"), dpo(0.1) + 0.5 * ce_on_chosen(), true, 1e-9);
    pair_case(&c, &case("sigmoid_ipo_mix"), 0.8 * dpo(0.1) + 0.2 * ipo(0.1), true, 1e-9);
}
