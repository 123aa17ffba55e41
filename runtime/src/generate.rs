//! Text generation: batched prompts (left padding), KV cache, greedy or sampled decoding
//! (temperature, top-k, top-p, seed), stopping on EOS or stop strings.

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

/// Samples from logits after temperature, top-k and top-p (nucleus) truncation.
fn sample(row: &[f32], temperature: f64, top_k: Option<usize>, top_p: Option<f64>, rng: &mut Rng) -> u32 {
    if temperature <= 0.0 {
        return argmax(row);
    }
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    let k = top_k.filter(|&k| k > 0).unwrap_or(row.len()).min(row.len());
    idx.truncate(k);
    let max = row[idx[0]] as f64 / temperature;
    let mut probs: Vec<f64> = idx.iter().map(|&i| (row[i] as f64 / temperature - max).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(p) = top_p.filter(|&p| p < 1.0) {
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
    let plen = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(b * plen);
    let mut mask = Vec::with_capacity(b * plen);
    let mut positions = Vec::with_capacity(b * plen);
    let mut next_pos = vec![0i64; b];
    for (r, p) in prompts.iter().enumerate() {
        let pad = plen - p.len();
        ids.extend(std::iter::repeat_n(cfg.pad_token_id, pad).chain(p.iter().copied()));
        mask.extend(std::iter::repeat_n(0u8, pad).chain(std::iter::repeat_n(1u8, p.len())));
        // transformers: position_ids = cumsum(mask) − 1, with padding positions set to 1.
        positions.extend(std::iter::repeat_n(1i64, pad).chain(0..p.len() as i64));
        next_pos[r] = p.len() as i64;
    }
    let mut cache = model.new_cache(b, plen + cfg.max_new_tokens)?;
    let mut rng = Rng::new(match cfg.sampling {
        Sampling::Sample { seed, .. } => seed,
        Sampling::Greedy => 0,
    });
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut finish: Vec<Option<FinishReason>> = vec![None; b];
    if cfg.max_new_tokens == 0 {
        return Ok(Generation { tokens: out, finish: vec![FinishReason::Length; b], prompt_tokens: prompts.iter().map(|p| p.len()).sum() });
    }
    let mut logits = model.forward_cached(&ids, &mask, &positions, &mut cache)?;
    for step in 0..cfg.max_new_tokens {
        let l = logits.to_dtype(crate::DType::F32)?.to_vec::<f32>()?;
        let mut step_ids = Vec::with_capacity(b);
        for r in 0..b {
            if finish[r].is_some() {
                step_ids.push(cfg.pad_token_id);
                continue;
            }
            let row = &l[r * vocab..(r + 1) * vocab];
            let tok = match &cfg.sampling {
                Sampling::Greedy => argmax(row),
                Sampling::Sample { temperature, top_k, top_p, .. } => sample(row, *temperature, *top_k, *top_p, &mut rng),
            };
            out[r].push(tok);
            step_ids.push(tok);
            if cfg.eos_token_ids.contains(&tok) {
                finish[r] = Some(FinishReason::Eos);
            } else if let Some(tk) = tokenizer.filter(|_| !cfg.stop_strings.is_empty()) {
                let text = tk.decode(&out[r], false)?;
                if cfg.stop_strings.iter().any(|s| text.contains(s.as_str())) {
                    finish[r] = Some(FinishReason::StopString);
                }
            }
        }
        if finish.iter().all(|f| f.is_some()) || step + 1 == cfg.max_new_tokens {
            break;
        }
        let pos: Vec<i64> = next_pos.clone();
        next_pos.iter_mut().for_each(|p| *p += 1);
        logits = model.forward_cached(&step_ids, &vec![1u8; b], &pos, &mut cache)?;
    }
    Ok(Generation {
        tokens: out,
        finish: finish.into_iter().map(|f| f.unwrap_or(FinishReason::Length)).collect(),
        prompt_tokens: prompts.iter().map(|p| p.len()).sum(),
    })
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
