//! Text generation: batched prompts (left padding), KV cache, greedy or sampled decoding
//! (temperature, top-k, top-p, seed), stopping on EOS or stop strings; and RL rollouts
//! ([`rollout`]): several samples per prompt sharing its prefilled KV cache, with the log-probs
//! and entropies the sampler saw.

use crate::error::{Error, Result};
use crate::models::Llama;
use crate::rng::Rng;
use crate::tokenizer::Tokenizer;

/// How the next token is chosen.
#[derive(Clone, Debug, PartialEq)]
pub enum Sampling {
    /// The most likely token (the first on ties, like `torch.argmax`).
    Greedy,
    /// Sampling from the tempered, truncated distribution.
    Sample { temperature: f64, top_k: Option<usize>, top_p: Option<f64>, seed: u64 },
}

impl Sampling {
    /// The temperature the log-probs of sampled tokens are taken at: the sampling temperature, or
    /// 1 for greedy decoding (and a non-positive temperature, which decodes greedily).
    pub fn temperature(&self) -> f64 {
        match self {
            Sampling::Sample { temperature, .. } if *temperature > 0.0 => *temperature,
            _ => 1.0,
        }
    }
}

/// Generation settings.
#[derive(Clone, Debug)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// A row stops after emitting any of these (the EOS token is kept in the output).
    pub eos_token_ids: Vec<u32>,
    /// A row stops once its decoded continuation contains any of these (needs a tokenizer).
    pub stop_strings: Vec<String>,
    /// Token used to left-pad prompts (masked out, so its value does not matter).
    pub pad_token_id: u32,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig { max_new_tokens: 64, sampling: Sampling::Greedy, eos_token_ids: vec![], stop_strings: vec![], pad_token_id: 0 }
    }
}

/// Why a row stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    Eos,
    StopString,
    Length,
}

/// The new tokens of each row and why each stopped.
#[derive(Clone, Debug)]
pub struct Generation {
    pub tokens: Vec<Vec<u32>>,
    pub finish: Vec<FinishReason>,
    /// Prompt tokens processed (all rows together, padding excluded).
    pub prompt_tokens: usize,
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Samples from logits after temperature, top-k and top-p (nucleus) truncation. Without
/// truncation it draws from the whole distribution in vocabulary order (no sort); with top-k only
/// the k largest are selected and sorted.
fn sample(row: &[f32], temperature: f64, top_k: Option<usize>, top_p: Option<f64>, rng: &mut Rng) -> u32 {
    if temperature <= 0.0 {
        return argmax(row);
    }
    let k = top_k.filter(|&k| k > 0 && k < row.len());
    let p = top_p.filter(|&p| p < 1.0);
    if k.is_none() && p.is_none() {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64 / temperature;
        let probs: Vec<f64> = row.iter().map(|&v| (v as f64 / temperature - max).exp()).collect();
        let u = rng.uniform() * probs.iter().sum::<f64>();
        let mut acc = 0.0;
        for (i, &q) in probs.iter().enumerate() {
            acc += q;
            if u < acc {
                return i as u32;
            }
        }
        return argmax(row);
    }
    let mut idx: Vec<usize> = (0..row.len()).collect();
    let by_logit = |a: &usize, b: &usize| row[*b].total_cmp(&row[*a]).then(a.cmp(b));
    if let Some(k) = k {
        idx.select_nth_unstable_by(k - 1, by_logit);
        idx.truncate(k);
    }
    idx.sort_by(by_logit);
    let max = row[idx[0]] as f64 / temperature;
    let mut probs: Vec<f64> = idx.iter().map(|&i| (row[i] as f64 / temperature - max).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(p) = p {
        // Keep the smallest prefix of the sorted distribution whose mass reaches p (at least one token).
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (j, &q) in probs.iter().enumerate() {
            acc += q;
            if acc >= p {
                keep = j + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
        let t: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= t);
    }
    let u = rng.uniform();
    let mut acc = 0.0;
    for (j, &q) in probs.iter().enumerate() {
        acc += q;
        if u < acc {
            return idx[j] as u32;
        }
    }
    idx[probs.len() - 1] as u32
}

/// Generates continuations of `prompts` (token ids, possibly of different lengths).
pub fn generate<A: crate::adapters::Adapter>(model: &Llama<A>, prompts: &[Vec<u32>], cfg: &GenerationConfig, tokenizer: Option<&Tokenizer>) -> Result<Generation> {
    let r = decode(model, prompts, 1, cfg, tokenizer, false)?;
    Ok(Generation { tokens: r.tokens, finish: r.finish, prompt_tokens: r.prompt_tokens })
}

/// Sampled completions for reinforcement learning ([`rollout`]): `n` per prompt, prompt-major
/// (completion `i` continues prompt `i / n`), with what the sampler saw at each token.
#[derive(Clone, Debug)]
pub struct Rollout {
    pub tokens: Vec<Vec<u32>>,
    /// log π(token) under the distribution sampled from (logits / temperature, before top-k/top-p
    /// truncation, as TRL and vLLM report them): the "old" log-probs of a policy-gradient step.
    pub logprobs: Vec<Vec<f32>>,
    /// Entropy of that distribution at each step (nats).
    pub entropies: Vec<Vec<f32>>,
    pub finish: Vec<FinishReason>,
    /// Prompt tokens prefilled (each prompt once, however many samples share it).
    pub prompt_tokens: usize,
}

/// `n` sampled completions of each prompt on the model being trained (adapters applied unmerged,
/// no copy of the weights). Each prompt is prefilled once and its KV cache rows are copied to its
/// `n` samples; finished rows leave the batch (the cache is compacted when a quarter of the rows
/// are done), so the decode step's cost follows the rows still running.
pub fn rollout<A: crate::adapters::Adapter>(model: &Llama<A>, prompts: &[Vec<u32>], n: usize, cfg: &GenerationConfig, tokenizer: Option<&Tokenizer>) -> Result<Rollout> {
    if n == 0 {
        return Err(Error::Input("rollout: the number of samples per prompt must be at least 1".into()));
    }
    decode(model, prompts, n, cfg, tokenizer, true)
}

/// log softmax(row / t)[tok] and the entropy of softmax(row / t), in f64 (t > 0: [`Sampling::temperature`]).
fn logprob_and_entropy(row: &[f32], tok: u32, t: f64) -> (f32, f32) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64 / t;
    let z: f64 = row.iter().map(|&v| (v as f64 / t - max).exp()).sum();
    let lse = max + z.ln();
    let ent = -row.iter().map(|&v| {
        let lp = v as f64 / t - lse;
        lp.exp() * lp
    }).sum::<f64>();
    ((row[tok as usize] as f64 / t - lse) as f32, ent as f32)
}

/// The decoding loop of [`generate`] and [`rollout`].
fn decode<A: crate::adapters::Adapter>(model: &Llama<A>, prompts: &[Vec<u32>], n: usize, cfg: &GenerationConfig, tokenizer: Option<&Tokenizer>, record: bool) -> Result<Rollout> {
    if prompts.is_empty() || prompts.iter().any(|p| p.is_empty()) {
        return Err(Error::Input("generate: every prompt needs at least one token".into()));
    }
    if !cfg.stop_strings.is_empty() && tokenizer.is_none() {
        return Err(Error::Input("generate: stop strings need a tokenizer to decode with".into()));
    }
    let vocab = model.config.vocab_size;
    for (r, p) in prompts.iter().enumerate() {
        if let Some(&t) = p.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::Input(format!("prompt {r}: token id {t} is out of range for vocabulary size {vocab}")));
        }
    }
    let b = prompts.len();
    let rows = b * n;
    let prompt_tokens = prompts.iter().map(|p| p.len()).sum();
    let mut out = Rollout { tokens: vec![Vec::new(); rows], logprobs: vec![Vec::new(); rows], entropies: vec![Vec::new(); rows], finish: vec![FinishReason::Length; rows], prompt_tokens };
    if cfg.max_new_tokens == 0 {
        return Ok(out);
    }
    let plen = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(b * plen);
    let mut mask = Vec::with_capacity(b * plen);
    let mut positions = Vec::with_capacity(b * plen);
    for p in prompts {
        let pad = plen - p.len();
        ids.extend(std::iter::repeat_n(cfg.pad_token_id, pad).chain(p.iter().copied()));
        mask.extend(std::iter::repeat_n(0u8, pad).chain(std::iter::repeat_n(1u8, p.len())));
        // transformers: position_ids = cumsum(mask) − 1, with padding positions set to 1.
        positions.extend(std::iter::repeat_n(1i64, pad).chain(0..p.len() as i64));
    }
    let mut cache = model.new_cache(b, plen + cfg.max_new_tokens)?;
    let mut rng = Rng::new(match cfg.sampling {
        Sampling::Sample { seed, .. } => seed,
        Sampling::Greedy => 0,
    });
    let prefill = model.forward_cached(&ids, &mask, &positions, &mut cache)?;
    let mut logits = prefill.to_dtype(crate::DType::F32)?.to_vec::<f32>()?;
    // `live[j]` is the output row held by cache row j.
    let mut live: Vec<usize> = (0..rows).collect();
    let mut next_pos: Vec<i64> = live.iter().map(|&r| prompts[r / n].len() as i64).collect();
    if n > 1 {
        let expand: Vec<usize> = live.iter().map(|&r| r / n).collect();
        cache.select_rows(&expand)?;
        logits = expand.iter().flat_map(|&p| logits[p * vocab..(p + 1) * vocab].to_vec()).collect();
    }
    let temperature = cfg.sampling.temperature();
    let mut running = vec![true; live.len()];
    for step in 0..cfg.max_new_tokens {
        let mut step_ids = Vec::with_capacity(live.len());
        for (j, &r) in live.iter().enumerate() {
            if !running[j] {
                step_ids.push(cfg.pad_token_id);
                continue;
            }
            let row = &logits[j * vocab..(j + 1) * vocab];
            let tok = match &cfg.sampling {
                Sampling::Greedy => argmax(row),
                Sampling::Sample { temperature, top_k, top_p, .. } => sample(row, *temperature, *top_k, *top_p, &mut rng),
            };
            if record {
                let (lp, ent) = logprob_and_entropy(row, tok, temperature);
                out.logprobs[r].push(lp);
                out.entropies[r].push(ent);
            }
            out.tokens[r].push(tok);
            step_ids.push(tok);
            if cfg.eos_token_ids.contains(&tok) {
                out.finish[r] = FinishReason::Eos;
                running[j] = false;
            } else if let Some(tk) = tokenizer.filter(|_| !cfg.stop_strings.is_empty()) {
                let text = tk.decode(&out.tokens[r], false)?;
                if cfg.stop_strings.iter().any(|s| text.contains(s.as_str())) {
                    out.finish[r] = FinishReason::StopString;
                    running[j] = false;
                }
            }
        }
        let active = running.iter().filter(|&&a| a).count();
        if active == 0 || step + 1 == cfg.max_new_tokens {
            break;
        }
        // Finished rows leave the batch once they are a quarter of it (a cache copy per compaction).
        if active * 4 <= live.len() * 3 {
            let keep: Vec<usize> = (0..live.len()).filter(|&j| running[j]).collect();
            cache.select_rows(&keep)?;
            live = keep.iter().map(|&j| live[j]).collect();
            next_pos = keep.iter().map(|&j| next_pos[j]).collect();
            step_ids = keep.iter().map(|&j| step_ids[j]).collect();
            running = vec![true; live.len()];
        }
        let pos = next_pos.clone();
        next_pos.iter_mut().for_each(|p| *p += 1);
        let m: Vec<u8> = running.iter().map(|&a| a as u8).collect();
        logits = model.forward_cached(&step_ids, &m, &pos, &mut cache)?.to_dtype(crate::DType::F32)?.to_vec::<f32>()?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_one_and_zero_temperature_are_greedy() {
        let row = [0.1f32, 2.0, 1.9, -1.0];
        let mut rng = Rng::new(7);
        for _ in 0..20 {
            assert_eq!(sample(&row, 1.0, Some(1), None, &mut rng), 1);
            assert_eq!(sample(&row, 0.0, None, None, &mut rng), 1);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus_and_seed_reproduces() {
        let row = [5.0f32, 4.9, -10.0, -10.0];
        let mut rng = Rng::new(1);
        let draws: Vec<u32> = (0..200).map(|_| sample(&row, 1.0, None, Some(0.9), &mut rng)).collect();
        assert!(draws.iter().all(|&t| t < 2), "only the two likely tokens are in the nucleus");
        assert!(draws.contains(&0) && draws.contains(&1));
        let mut a = Rng::new(3);
        let mut b = Rng::new(3);
        let x: Vec<u32> = (0..50).map(|_| sample(&row, 2.0, None, None, &mut a)).collect();
        let y: Vec<u32> = (0..50).map(|_| sample(&row, 2.0, None, None, &mut b)).collect();
        assert_eq!(x, y);
    }

    #[test]
    fn argmax_takes_the_first_of_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
    }
}
