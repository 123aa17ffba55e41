//! Advantage estimators.
//!
//! GRPO (one reward per completion, `G` completions per prompt):
//!   A_i = r_i − mean(r of i's group), divided by σ + 1e-4 where σ is the group's standard deviation
//!   (`scale_rewards = "group"`, DeepSeek-R1), the whole batch's (`"batch"`), or not at all
//!   (`"none"`, Dr. GRPO). σ is the unbiased estimate, as `torch.std`.
//! PPO (a reward per token, values from the critic): generalised advantage estimation
//!   δ_t = r_t + γ·V_{t+1} − V_t,  A_t = δ_t + γλ·A_{t+1}  (V after the last token = 0),
//!   returns R_t = A_t + V_t, then advantages whitened over the batch's tokens.

use crate::error::{Error, Result};

/// How GRPO scales the group-centred rewards (TRL's `scale_rewards`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScaleRewards {
    /// By each group's standard deviation (GRPO as in DeepSeekMath / R1).
    #[default]
    Group,
    /// By the standard deviation of every reward in the batch.
    Batch,
    /// Not at all (Dr. GRPO: the scaling biases towards easy and hard questions).
    None,
}

impl ScaleRewards {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "group" | "true" => Ok(ScaleRewards::Group),
            "batch" => Ok(ScaleRewards::Batch),
            "none" | "false" => Ok(ScaleRewards::None),
            other => Err(Error::Input(format!("scale_rewards = \"{other}\": expected \"group\", \"batch\" or \"none\""))),
        }
    }
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len().max(1) as f64
}

/// Unbiased standard deviation (`torch.std`); NaN for a single value, as there.
pub fn std(x: &[f64]) -> f64 {
    let m = mean(x);
    (x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (x.len() as f64 - 1.0)).sqrt()
}

/// GRPO advantages of `rewards` (prompt-major groups of `g`), and each group's reward standard
/// deviation (0 marks a group every completion of which scored the same: it carries no signal).
pub fn group_advantages(rewards: &[f64], g: usize, scale: ScaleRewards) -> Result<(Vec<f64>, Vec<f64>)> {
    if g == 0 || rewards.len() % g != 0 {
        return Err(Error::Input(format!("{} rewards do not split into groups of {g}", rewards.len())));
    }
    let batch_std = std(rewards);
    let mut adv = Vec::with_capacity(rewards.len());
    let mut stds = Vec::with_capacity(rewards.len() / g);
    for grp in rewards.chunks(g) {
        let (m, s) = (mean(grp), std(grp));
        stds.push(s);
        let d = match scale {
            ScaleRewards::Group => s + 1e-4,
            ScaleRewards::Batch => batch_std + 1e-4,
            ScaleRewards::None => 1.0,
        };
        adv.extend(grp.iter().map(|r| (r - m) / d));
    }
    Ok((adv, stds))
}

/// TRL's `frac_reward_zero_std`: the share of completions whose scaling std is 0 (each group's,
/// or with `"batch"` the batch's, so there it is 0 or 1).
pub fn frac_zero_std(rewards: &[f64], group_stds: &[f64], scale: ScaleRewards) -> f64 {
    if group_stds.is_empty() {
        return 0.0;
    }
    match scale {
        ScaleRewards::Batch => f64::from(u8::from(std(rewards).abs() <= 1e-8)),
        _ => group_stds.iter().filter(|s| s.abs() <= 1e-8).count() as f64 / group_stds.len() as f64,
    }
}

/// Generalised advantage estimation over each row's tokens (`rewards[i]` and `values[i]` have the
/// row's completion length): advantages and returns.
pub fn gae(rewards: &[Vec<f64>], values: &[Vec<f64>], gamma: f64, lambda: f64) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let mut advs = Vec::with_capacity(rewards.len());
    let mut rets = Vec::with_capacity(rewards.len());
    for (r, v) in rewards.iter().zip(values) {
        let n = r.len();
        let mut a = vec![0.0; n];
        let mut last = 0.0;
        for t in (0..n).rev() {
            let next = if t + 1 < n { v[t + 1] } else { 0.0 };
            let delta = r[t] + gamma * next - v[t];
            last = delta + gamma * lambda * last;
            a[t] = last;
        }
        rets.push(a.iter().zip(v).map(|(a, v)| a + v).collect());
        advs.push(a);
    }
    (advs, rets)
}

/// Whitens every value of `rows` together (mean 0, unit unbiased variance; `shift_mean = false`
/// adds the mean back), as TRL's `masked_whiten` over the unpadded tokens.
pub fn masked_whiten(rows: &mut [Vec<f64>], shift_mean: bool) {
    let all: Vec<f64> = rows.iter().flatten().copied().collect();
    let n = all.len() as f64;
    if n < 2.0 {
        return;
    }
    let m = mean(&all);
    let var = all.iter().map(|v| (v - m).powi(2)).sum::<f64>() / n * (n / (n - 1.0));
    let inv = 1.0 / (var + 1e-8).sqrt();
    for v in rows.iter_mut().flatten() {
        *v = (*v - m) * inv + if shift_mean { 0.0 } else { m };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_centred_and_scaled_by_their_own_std() {
        let (a, s) = group_advantages(&[1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 2.0], 4, ScaleRewards::Group).unwrap();
        let sd = std(&[1.0, 0.0, 1.0, 0.0]);
        assert!((a[0] - 0.5 / (sd + 1e-4)).abs() < 1e-12);
        assert_eq!(&a[4..], &[0.0; 4]);
        assert_eq!(s[1], 0.0);
        let (n, _) = group_advantages(&[1.0, 0.0, 3.0, 5.0], 2, ScaleRewards::None).unwrap();
        assert_eq!(n, vec![0.5, -0.5, -1.0, 1.0]);
        assert!(group_advantages(&[1.0, 2.0, 3.0], 2, ScaleRewards::Group).is_err());
    }

    #[test]
    fn gae_with_lambda_one_is_the_discounted_return_minus_the_value() {
        let (a, r) = gae(&[vec![0.0, 0.0, 1.0]], &[vec![0.2, 0.4, 0.5]], 1.0, 1.0);
        assert!((a[0][0] - 0.8).abs() < 1e-12 && (a[0][2] - 0.5).abs() < 1e-12);
        assert!(r[0].iter().all(|x| (x - 1.0).abs() < 1e-12));
    }
}
