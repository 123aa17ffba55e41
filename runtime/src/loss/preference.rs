//! Preference losses over pairs (TRL 1.16's formulas; names and metrics as TRL logs them).
//!
//! For pair i, with log π summed over the completion's tokens (`logps`), n its scored tokens and
//! the reference's logps under the same tokens:
//!
//! ```text
//! c = logπ(y_c) − logπ_ref(y_c),  r = logπ(y_r) − logπ_ref(y_r),  Δ = c − r
//! sigmoid (DPO)     −log σ(βΔ)                  cDPO: −(1−ε) log σ(βΔ) − ε log σ(−βΔ)
//! robust            (−(1−ε) log σ(βΔ) + ε log σ(−βΔ)) / (1 − 2ε)
//! hinge             relu(1 − βΔ)
//! ipo               (c/n_c − r/n_r − 1/(2β))²
//! sigmoid_norm      −log σ(β (c/n_c − r/n_r))
//! apo_zero          1 − σ(βc) + σ(βr)
//! simpo (no ref)    −(1−ε) log σ(βΔ̄ − γ) − ε log σ(−(βΔ̄ − γ)),   Δ̄ = logπ(y_c)/n_c − logπ(y_r)/n_r
//! orpo  (no ref)    nll(x, y_c) − λ log σ(log odds),  log odds = (ā_c − ā_r) − (log(1−e^ā_c) − log(1−e^ā_r)), ā = logπ/n
//! ce_on_chosen      −Σ logπ(y_c) / Σ n_c   (TRL's loss_type "sft")
//! ```
//!
//! each averaged over the pairs. Terms compose with the DSL; reference log-probs are asked for
//! lazily, so the reference-free losses never run a reference forward.
//!
//! ```
//! use temper_runtime::loss::{ce_on_chosen, dpo, ipo, CeOnChosen, Dpo, Loss, Scaled, Sum};
//! // TRL's loss_type = ["sigmoid", "sft"], loss_weights = [1, 0.2] (RPO), with static types:
//! let loss = dpo(0.1) + 0.2 * ce_on_chosen();
//! let _: Loss<Sum<Dpo, Scaled<CeOnChosen>>> = loss;
//! let _mix = 0.8 * dpo(0.1) + 0.2 * ipo(0.1).label_smoothing(0.0);
//! ```

use super::{Loss, Term, TermLog};
use crate::error::{Error, Result};
use crate::ops::{self, Pointwise};
use crate::tensor::Tensor;
use std::cell::OnceCell;

/// Reference log-probs of a batch's (chosen, rejected) completions, computed on first use.
pub type ReferenceFn<'a> = dyn Fn() -> Result<(Vec<f64>, Vec<f64>)> + 'a;

/// What a preference step computed for its pairs.
pub struct PairCx<'a> {
    /// Σ log π over each chosen completion `[pairs]`, with gradients.
    pub chosen_logps: Tensor,
    pub rejected_logps: Tensor,
    /// Scored tokens of each chosen / rejected completion.
    pub chosen_tokens: Vec<usize>,
    pub rejected_tokens: Vec<usize>,
    reference: Box<ReferenceFn<'a>>,
    cached: OnceCell<(Tensor, Tensor)>,
    /// Σ log π over each whole chosen sequence, prompt included (computed on first use), and its
    /// scored tokens: ORPO's NLL.
    whole_chosen: Option<(Box<dyn Fn() -> Result<Tensor> + 'a>, Vec<usize>)>,
}

impl<'a> PairCx<'a> {
    /// `reference` gives the reference policy's logps when a term asks (once per step).
    pub fn new(chosen_logps: Tensor, rejected_logps: Tensor, chosen_tokens: Vec<usize>, rejected_tokens: Vec<usize>, reference: Box<ReferenceFn<'a>>) -> Self {
        PairCx { chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, reference, cached: OnceCell::new(), whole_chosen: None }
    }

    /// Adds the log-probs of the whole chosen sequences (prompt included), computed when a term
    /// asks, and their scored tokens.
    pub fn with_whole_chosen(mut self, logps: Box<dyn Fn() -> Result<Tensor> + 'a>, tokens: Vec<usize>) -> Self {
        self.whole_chosen = Some((logps, tokens));
        self
    }

    /// Pairs in the batch.
    pub fn pairs(&self) -> usize {
        self.chosen_tokens.len()
    }

    /// The reference's (chosen, rejected) logps as constants on the policy's device.
    pub fn reference_logps(&self) -> Result<&(Tensor, Tensor)> {
        if let Some(r) = self.cached.get() {
            return Ok(r);
        }
        let (c, r) = (self.reference)()?;
        if c.len() != self.pairs() || r.len() != self.pairs() {
            return Err(Error::Input(format!("reference log-probs: {} chosen and {} rejected for {} pairs", c.len(), r.len(), self.pairs())));
        }
        let pair = (constant(c, &self.chosen_logps)?, constant(r, &self.chosen_logps)?);
        Ok(self.cached.get_or_init(|| pair))
    }

    /// Per-token averages `logps / n` of the chosen and rejected completions.
    fn averages(&self) -> Result<(Tensor, Tensor)> {
        Ok((per_token(&self.chosen_logps, &self.chosen_tokens)?, per_token(&self.rejected_logps, &self.rejected_tokens)?))
    }
}

/// `x[i] / n[i]` (n at least 1): a sequence sum as a per-token average.
fn per_token(x: &Tensor, n: &[usize]) -> Result<Tensor> {
    ops::mul(x, &constant(n.iter().map(|&k| 1.0 / k.max(1) as f64).collect(), x)?)
}

/// `values` as a constant tensor of `like`'s dtype and device.
pub(crate) fn constant(values: Vec<f64>, like: &Tensor) -> Result<Tensor> {
    let n = values.len();
    Tensor::from_vec(values, &[n], crate::Device::Cpu)?.to_dtype(like.dtype())?.to_device(like.device())
}

/// The mean of a vector.
pub(crate) fn mean(x: &Tensor) -> Result<Tensor> {
    ops::scale(&ops::sum(x)?, 1.0 / x.elem_count().max(1) as f64)
}

fn mean_of(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// The metrics every pair loss logs, from the implicit rewards `β·chosen`, `β·rejected` and the
/// policy's logps, as TRL names them.
fn log_rewards(log: &mut TermLog, beta: f64, chosen: &Tensor, rejected: &Tensor, logps_c: &Tensor, logps_r: &Tensor) -> Result<()> {
    let scaled = |t: &Tensor| -> Result<Vec<f64>> { Ok(t.to_f64_vec()?.iter().map(|x| beta * x).collect()) };
    let (chosen_rewards, rejected_rewards) = (&scaled(chosen)?, &scaled(rejected)?);
    let acc: Vec<f64> = chosen_rewards.iter().zip(rejected_rewards).map(|(c, r)| f64::from(u8::from(c > r))).collect();
    let margins: Vec<f64> = chosen_rewards.iter().zip(rejected_rewards).map(|(c, r)| c - r).collect();
    log.push(("rewards/chosen", mean_of(chosen_rewards)));
    log.push(("rewards/rejected", mean_of(rejected_rewards)));
    log.push(("rewards/accuracies", mean_of(&acc)));
    log.push(("rewards/margins", mean_of(&margins)));
    log.push(("logps/chosen", mean_of(&logps_c.to_f64_vec()?)));
    log.push(("logps/rejected", mean_of(&logps_r.to_f64_vec()?)));
    Ok(())
}

/// `−(1−ε) log σ(x) − ε log σ(−x)` per element.
fn smoothed_logistic(x: &Tensor, eps: f64) -> Result<Tensor> {
    let pos = ops::pointwise(x, Pointwise::LogSigmoid)?;
    if eps == 0.0 {
        return ops::scale(&pos, -1.0);
    }
    let neg = ops::pointwise(&ops::scale(x, -1.0)?, Pointwise::LogSigmoid)?;
    ops::add(&ops::scale(&pos, -(1.0 - eps))?, &ops::scale(&neg, -eps)?)
}

/// The loss of a DPO-family term (TRL's `loss_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DpoLoss {
    /// `sigmoid`: DPO; with label smoothing ε, conservative DPO (cDPO).
    Sigmoid,
    /// `robust`: robust DPO, ε = the label flip rate, in [0, 0.5).
    Robust,
    /// `hinge`: SLiC.
    Hinge,
    /// `ipo`: IPO on per-token log-ratio averages.
    Ipo,
    /// `sigmoid_norm`: DPO on per-token log-ratio averages.
    SigmoidNorm,
    /// `apo_zero`: anchored preference optimisation (push chosen up, rejected down).
    ApoZero,
}

impl DpoLoss {
    /// TRL's name.
    pub fn name(self) -> &'static str {
        match self {
            DpoLoss::Sigmoid => "sigmoid",
            DpoLoss::Robust => "robust",
            DpoLoss::Hinge => "hinge",
            DpoLoss::Ipo => "ipo",
            DpoLoss::SigmoidNorm => "sigmoid_norm",
            DpoLoss::ApoZero => "apo_zero",
        }
    }
    /// From TRL's name.
    pub fn parse(s: &str) -> Option<DpoLoss> {
        [DpoLoss::Sigmoid, DpoLoss::Robust, DpoLoss::Hinge, DpoLoss::Ipo, DpoLoss::SigmoidNorm, DpoLoss::ApoZero].into_iter().find(|l| l.name() == s)
    }
    fn log_name(self) -> &'static str {
        match self {
            DpoLoss::Sigmoid => "loss/sigmoid",
            DpoLoss::Robust => "loss/robust",
            DpoLoss::Hinge => "loss/hinge",
            DpoLoss::Ipo => "loss/ipo",
            DpoLoss::SigmoidNorm => "loss/sigmoid_norm",
            DpoLoss::ApoZero => "loss/apo_zero",
        }
    }
}

/// A DPO-family term: β, the loss and its label smoothing. Needs reference log-probs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dpo {
    pub beta: f64,
    pub kind: DpoLoss,
    pub label_smoothing: f64,
}

/// DPO's sigmoid loss with temperature β (TRL's default 0.1).
pub fn dpo(beta: f64) -> Loss<Dpo> {
    Loss(Dpo { beta, kind: DpoLoss::Sigmoid, label_smoothing: 0.0 })
}

/// IPO with regularisation β.
pub fn ipo(beta: f64) -> Loss<Dpo> {
    Loss(Dpo { beta, kind: DpoLoss::Ipo, label_smoothing: 0.0 })
}

/// The hinge (SLiC) loss with β.
pub fn hinge(beta: f64) -> Loss<Dpo> {
    Loss(Dpo { beta, kind: DpoLoss::Hinge, label_smoothing: 0.0 })
}

/// Any DPO-family loss by kind.
pub fn dpo_loss(kind: DpoLoss, beta: f64) -> Loss<Dpo> {
    Loss(Dpo { beta, kind, label_smoothing: 0.0 })
}

impl Loss<Dpo> {
    /// Label smoothing ε: with `sigmoid`, conservative DPO (the labels are right with probability
    /// 1 − ε); with `robust`, the flip rate.
    pub fn label_smoothing(mut self, eps: f64) -> Self {
        self.0.label_smoothing = eps;
        self
    }
}

impl Term<PairCx<'_>> for Dpo {
    fn eval(&self, cx: &PairCx<'_>, log: &mut TermLog) -> Result<Tensor> {
        let (b, eps) = (self.beta, self.label_smoothing);
        if !(b > 0.0 && b.is_finite()) {
            return Err(Error::Input(format!("{}: beta must be a positive number, got {b}", self.kind.name())));
        }
        let (ref_c, ref_r) = cx.reference_logps()?;
        let c = ops::sub(&cx.chosen_logps, ref_c)?;
        let r = ops::sub(&cx.rejected_logps, ref_r)?;
        let delta = ops::sub(&c, &r)?;
        let per_pair = match self.kind {
            DpoLoss::Sigmoid => smoothed_logistic(&ops::scale(&delta, b)?, eps)?,
            DpoLoss::Robust => {
                if !(0.0..0.5).contains(&eps) {
                    return Err(Error::Input(format!("robust: label_smoothing must be in [0, 0.5), got {eps}")));
                }
                let x = ops::scale(&delta, b)?;
                let clean = ops::scale(&ops::pointwise(&x, Pointwise::LogSigmoid)?, -(1.0 - eps))?;
                let flipped = ops::scale(&ops::pointwise(&ops::scale(&x, -1.0)?, Pointwise::LogSigmoid)?, eps)?;
                ops::scale(&ops::add(&clean, &flipped)?, 1.0 / (1.0 - 2.0 * eps))?
            }
            DpoLoss::Hinge => ops::pointwise(&ops::scale(&ops::add_scalar(&delta, -1.0 / b)?, -b)?, Pointwise::Relu)?,
            DpoLoss::Ipo | DpoLoss::SigmoidNorm => {
                let d = ops::sub(&per_token(&c, &cx.chosen_tokens)?, &per_token(&r, &cx.rejected_tokens)?)?;
                if self.kind == DpoLoss::Ipo {
                    ops::pointwise(&ops::add_scalar(&d, -1.0 / (2.0 * b))?, Pointwise::Square)?
                } else {
                    smoothed_logistic(&ops::scale(&d, b)?, 0.0)?
                }
            }
            DpoLoss::ApoZero => {
                let up = ops::pointwise(&ops::scale(&c, b)?, Pointwise::Sigmoid)?;
                let down = ops::pointwise(&ops::scale(&r, b)?, Pointwise::Sigmoid)?;
                ops::add_scalar(&ops::sub(&down, &up)?, 1.0)?
            }
        };
        let loss = mean(&per_pair)?;
        log.push((self.kind.log_name(), loss.to_scalar()?));
        log_rewards(log, b, &c, &r, &cx.chosen_logps, &cx.rejected_logps)?;
        Ok(loss)
    }
}

/// Negative log-likelihood of the chosen completions, per token (TRL's `sft` loss type; RPO's
/// regulariser). Logged as `nll_loss`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CeOnChosen;

/// Cross-entropy on the chosen completions: `dpo(0.1) + 0.2 * ce_on_chosen()`.
pub fn ce_on_chosen() -> Loss<CeOnChosen> {
    Loss(CeOnChosen)
}

fn nll_chosen(cx: &PairCx<'_>) -> Result<Tensor> {
    let n: usize = cx.chosen_tokens.iter().sum();
    if n == 0 {
        return Err(Error::Input("ce_on_chosen: the chosen completions have no scored token".into()));
    }
    ops::scale(&ops::sum(&cx.chosen_logps)?, -1.0 / n as f64)
}

impl Term<PairCx<'_>> for CeOnChosen {
    fn eval(&self, cx: &PairCx<'_>, log: &mut TermLog) -> Result<Tensor> {
        let l = nll_chosen(cx)?;
        log.push(("nll_loss", l.to_scalar()?));
        Ok(l)
    }
}

/// SimPO (reference-free): margin γ on the per-token average log-prob difference, temperature β.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Simpo {
    pub beta: f64,
    pub gamma: f64,
    pub label_smoothing: f64,
}

/// SimPO with β (TRL's CPO default 0.1; the paper uses 2–2.5) and margin γ (`simpo_gamma`, 0.5).
pub fn simpo(beta: f64, gamma: f64) -> Loss<Simpo> {
    Loss(Simpo { beta, gamma, label_smoothing: 0.0 })
}

impl Term<PairCx<'_>> for Simpo {
    fn eval(&self, cx: &PairCx<'_>, log: &mut TermLog) -> Result<Tensor> {
        let (ca, ra) = cx.averages()?;
        let x = ops::add_scalar(&ops::scale(&ops::sub(&ca, &ra)?, self.beta)?, -self.gamma)?;
        let loss = mean(&smoothed_logistic(&x, self.label_smoothing)?)?;
        log.push(("loss/simpo", loss.to_scalar()?));
        log_rewards(log, self.beta, &ca, &ra, &ca, &ra)?;
        Ok(loss)
    }
}

/// ORPO (reference-free): NLL on the chosen plus λ times the log odds-ratio loss.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Orpo {
    pub lambda: f64,
}

/// ORPO with weight λ on the odds ratio (TRL's `beta`, default 0.1).
pub fn orpo(lambda: f64) -> Loss<Orpo> {
    Loss(Orpo { lambda })
}

impl Term<PairCx<'_>> for Orpo {
    fn eval(&self, cx: &PairCx<'_>, log: &mut TermLog) -> Result<Tensor> {
        let (ca, ra) = cx.averages()?;
        let odds_c = ops::sub(&ca, &ops::pointwise(&ca, Pointwise::Log1mExp)?)?;
        let odds_r = ops::sub(&ra, &ops::pointwise(&ra, Pointwise::Log1mExp)?)?;
        let log_odds = ops::sub(&odds_c, &odds_r)?;
        let ratio = mean(&ops::pointwise(&log_odds, Pointwise::LogSigmoid)?)?;
        // TRL's ORPO trains the NLL on the whole chosen sequence, prompt included.
        let (whole, n) = cx.whole_chosen.as_ref().ok_or_else(|| Error::Input("orpo needs the log-probs of the whole chosen sequences".into()))?;
        let n: usize = n.iter().sum();
        let nll = ops::scale(&ops::sum(&whole()?)?, -1.0 / n.max(1) as f64)?;
        let loss = ops::sub(&nll, &ops::scale(&ratio, self.lambda)?)?;
        log.push(("loss/orpo", loss.to_scalar()?));
        log_rewards(log, self.lambda, &ca, &ra, &ca, &ra)?;
        log.push(("nll_loss", nll.to_scalar()?));
        log.push(("log_odds_ratio", ratio.to_scalar()?));
        log.push(("log_odds_chosen", mean_of(&log_odds.to_f64_vec()?)));
        Ok(loss)
    }
}

/// Σ wᵢ·termᵢ over terms chosen at run time (TRL's `loss_type` list with `loss_weights`, from a
/// config file); in code, `a * 0.8 + b * 0.2` says the same with static types.
#[derive(Clone, Debug)]
pub struct Weighted<T>(pub Vec<(f64, T)>);

impl<Cx, T: Term<Cx>> Term<Cx> for Weighted<T> {
    fn eval(&self, cx: &Cx, log: &mut TermLog) -> Result<Tensor> {
        let mut total: Option<Tensor> = None;
        for (w, t) in &self.0 {
            let l = ops::scale(&t.eval(cx, log)?, *w)?;
            total = Some(match total {
                Some(s) => ops::add(&s, &l)?,
                None => l,
            });
        }
        total.ok_or_else(|| Error::Input("a weighted loss needs at least one term".into()))
    }
}

/// A pair term chosen at run time: DPO family, SimPO, ORPO or CE on the chosen replies.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PairTerm {
    Dpo(Dpo),
    Simpo(Simpo),
    Orpo(Orpo),
    CeOnChosen,
}

impl Term<PairCx<'_>> for PairTerm {
    fn eval(&self, cx: &PairCx<'_>, log: &mut TermLog) -> Result<Tensor> {
        match self {
            PairTerm::Dpo(t) => t.eval(cx, log),
            PairTerm::Simpo(t) => t.eval(cx, log),
            PairTerm::Orpo(t) => t.eval(cx, log),
            PairTerm::CeOnChosen => CeOnChosen.eval(cx, log),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autograd::gradcheck::{max_gradient_error, test_values};
    use crate::loss::{bradley_terry, kto, KtoCx, KtoReference, RewardCx};
    use crate::Device;

    const REF_C: [f64; 4] = [-3.0, -5.5, -2.25, -7.0];
    const REF_R: [f64; 4] = [-4.0, -3.5, -6.0, -2.5];

    fn logps(seed: u64) -> Vec<f64> {
        test_values(4, seed).iter().map(|v| -4.0 + 3.0 * v).collect()
    }

    /// d loss / d (chosen, rejected logps) of `term` matches finite differences in f64.
    fn check<T: for<'a> Term<PairCx<'a>>>(term: T, name: &str) {
        let err = max_gradient_error(
            |t| {
                // Through an op first, so the term sees non-leaf inputs as in training.
                let (c, r) = (ops::scale(&t[0], 1.0)?, ops::scale(&t[1], 1.0)?);
                let c2 = c.clone();
                let cx = PairCx::new(c.clone(), r, vec![3, 5, 2, 4], vec![4, 2, 6, 1], Box::new(|| Ok((REF_C.to_vec(), REF_R.to_vec())))).with_whole_chosen(Box::new(move || ops::scale(&c2, 1.5)), vec![9, 11, 8, 10]);
                term.eval(&cx, &mut TermLog::new())
            },
            &[(logps(1), vec![4]), (logps(2), vec![4])],
            1e-6,
        )
        .unwrap();
        assert!(err < 1e-7, "{name}: max error {err}");
    }

    #[test]
    fn pair_losses_match_finite_differences() {
        for kind in [DpoLoss::Sigmoid, DpoLoss::Robust, DpoLoss::Hinge, DpoLoss::Ipo, DpoLoss::SigmoidNorm, DpoLoss::ApoZero] {
            check(dpo_loss(kind, 0.3).label_smoothing(if kind == DpoLoss::Robust { 0.2 } else { 0.0 }), kind.name());
        }
        check(dpo(0.1).label_smoothing(0.15), "cdpo");
        check(simpo(2.0, 0.5), "simpo");
        check(orpo(0.1), "orpo");
        check(dpo(0.1) + 0.3 * ce_on_chosen(), "rpo");
    }

    /// cDPO (TRL 1.16 dropped it): −(1−ε) log σ(βΔ) − ε log σ(−βΔ), the formula of the cDPO note
    /// and of TRL ≤ 0.x's `sigmoid` with label smoothing.
    #[test]
    fn conservative_dpo_is_the_smoothed_logistic_loss() {
        let (c, r) = (logps(3), logps(4));
        let cx = PairCx::new(Tensor::from_vec(c.clone(), &[4], Device::Cpu).unwrap(), Tensor::from_vec(r.clone(), &[4], Device::Cpu).unwrap(), vec![1; 4], vec![1; 4], Box::new(|| Ok((REF_C.to_vec(), REF_R.to_vec()))));
        let (b, eps) = (0.2, 0.1);
        let got = dpo(b).label_smoothing(eps).eval(&cx, &mut TermLog::new()).unwrap().to_scalar().unwrap();
        let ls = |x: f64| -(1.0 + (-x).exp()).ln();
        let want = (0..4).map(|i| {
            let d = (c[i] - REF_C[i]) - (r[i] - REF_R[i]);
            -(1.0 - eps) * ls(b * d) - eps * ls(-b * d)
        }).sum::<f64>() / 4.0;
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    }

    #[test]
    fn kto_and_bradley_terry_match_finite_differences() {
        let err = max_gradient_error(
            |t| {
                let x = ops::scale(&t[0], 1.0)?;
                let r = KtoReference { ref_logps: REF_C.to_vec(), ref_kl_logps: REF_R.to_vec(), policy_kl_logps: vec![-3.0, -3.0, -5.0, -2.0] };
                let cx = KtoCx::new(x, vec![true, false, true, false], Box::new(move || Ok(r.clone())));
                kto(0.5).weights(1.0, 1.3).eval(&cx, &mut TermLog::new())
            },
            &[(logps(5), vec![4])],
            1e-6,
        )
        .unwrap();
        assert!(err < 1e-7, "kto: {err}");
        let err = max_gradient_error(
            |t| {
                let cx = RewardCx { chosen: ops::scale(&t[0], 1.0)?, rejected: ops::scale(&t[1], 1.0)?, margins: vec![0.5, 0.0, -0.25, 1.0] };
                bradley_terry().center_rewards(0.05).eval(&cx, &mut TermLog::new())
            },
            &[(test_values(4, 6), vec![4]), (test_values(4, 7), vec![4])],
            1e-6,
        )
        .unwrap();
        assert!(err < 1e-7, "bradley_terry: {err}");
    }
}
