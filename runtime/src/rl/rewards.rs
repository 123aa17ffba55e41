//! Rewards of sampled completions: functions written in Rust (built-ins selectable by name, or
//! any closure) and reward models (`…ForSequenceClassification`, e.g. what `rl = "reward"`
//! trains), combined with weights. Functions score completions in parallel.

use crate::adapters::Adapter;
use crate::data::preference::{seq_batch, Prompt, Sequence};
use crate::error::{Error, Result};
use crate::generate::FinishReason;
use crate::models::{Llama, Mode};
use rayon::prelude::*;
use regex::Regex;
use std::sync::Arc;

/// One sampled completion, as reward functions see it.
#[derive(Clone, Copy, Debug)]
pub struct Completion<'a> {
    pub prompt: &'a Prompt,
    /// The completion decoded (special tokens skipped).
    pub text: &'a str,
    pub tokens: &'a [u32],
    pub finish: FinishReason,
}

impl Completion<'_> {
    /// A string field of the prompt's record (`answer`, ...); numbers are written as JSON writes them.
    pub fn field(&self, key: &str) -> Option<String> {
        match self.prompt.fields.get(key)? {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Null => None,
            v => Some(v.to_string()),
        }
    }
}

/// A reward: a score per completion.
pub trait RewardFn: Send + Sync {
    /// Its name in metrics (`rewards/<name>/mean`).
    fn name(&self) -> &str;
    /// The reward of one completion.
    fn score(&self, c: &Completion<'_>) -> Result<f64>;
    /// The rewards of many (in parallel unless overridden, e.g. by a batched reward model).
    fn score_batch(&self, cs: &[Completion<'_>]) -> Result<Vec<f64>> {
        cs.par_iter().map(|c| self.score(c)).collect()
    }
}

/// A closure as a reward function ([`reward_fn`]).
pub struct FnReward<F> {
    name: String,
    f: F,
}

/// Wraps `f` as a reward function named `name`.
///
/// ```
/// use temper_runtime::rl::{reward_fn, RewardFn};
/// let short = reward_fn("short", |c| if c.tokens.len() < 20 { 1.0 } else { 0.0 });
/// assert_eq!(short.name(), "short");
/// ```
pub fn reward_fn<F: Fn(&Completion<'_>) -> f64 + Send + Sync>(name: &str, f: F) -> FnReward<F> {
    FnReward { name: name.into(), f }
}

impl<F: Fn(&Completion<'_>) -> f64 + Send + Sync> RewardFn for FnReward<F> {
    fn name(&self) -> &str {
        &self.name
    }
    fn score(&self, c: &Completion<'_>) -> Result<f64> {
        Ok((self.f)(c))
    }
}

/// The last number in `text` (optional minus sign, digits with `,` separators, decimals), as f64.
pub fn last_number(text: &str) -> Option<f64> {
    static RE: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    let re = RE.get_or_init(|| Regex::new(r"-?\d[\d,]*(?:\.\d+)?").expect("a valid pattern"));
    re.find_iter(text).last().and_then(|m| m.as_str().replace(',', "").parse().ok())
}

/// 1 when the last number of the completion equals the record's `field` (default `answer`)
/// numerically, else 0 (GSM8K-style exact answer). A record without the field is an error
/// naming it.
pub struct ExactAnswer {
    pub field: String,
}

impl RewardFn for ExactAnswer {
    fn name(&self) -> &str {
        "exact_answer"
    }
    fn score(&self, c: &Completion<'_>) -> Result<f64> {
        let want = c.field(&self.field).ok_or_else(|| Error::Input(format!("{}: the exact_answer reward needs field `{}`", c.prompt.source, self.field)))?;
        let want = last_number(&want).ok_or_else(|| Error::Input(format!("{}: field `{}` = {want:?} holds no number", c.prompt.source, self.field)))?;
        Ok(match last_number(c.text) {
            Some(got) if (got - want).abs() <= 1e-6 * want.abs().max(1.0) => 1.0,
            _ => 0.0,
        })
    }
}

/// 1 when the completion matches a regular expression, else 0 (format rewards).
pub struct RegexMatch {
    pub name: String,
    pub re: Regex,
}

impl RewardFn for RegexMatch {
    fn name(&self) -> &str {
        &self.name
    }
    fn score(&self, c: &Completion<'_>) -> Result<f64> {
        Ok(f64::from(u8::from(self.re.is_match(c.text))))
    }
}

/// DAPO's soft overlong punishment on completion tokens: 0 up to `max_length − cache`, then
/// falling linearly to −1 at `max_length`, −1 beyond.
pub struct LengthPenalty {
    pub max_length: usize,
    pub cache: usize,
}

impl RewardFn for LengthPenalty {
    fn name(&self) -> &str {
        "length_penalty"
    }
    fn score(&self, c: &Completion<'_>) -> Result<f64> {
        let (n, max, cache) = (c.tokens.len() as f64, self.max_length as f64, self.cache as f64);
        Ok(if n <= max - cache {
            0.0
        } else if n <= max {
            (max - cache - n) / cache.max(1.0)
        } else {
            -1.0
        })
    }
}

/// R1's format: reasoning in `<think>…</think>`, then the answer in `<answer>…</answer>`.
pub const THINK_FORMAT: &str = r"(?s)^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$";

/// A built-in reward by name, with its parameters from the config table:
/// `exact_answer` (`field`, default `answer`), `regex` (`pattern`), `think_format`,
/// `length_penalty` (`max_length`, default `max_new_tokens`; `cache`, default a quarter of it).
pub fn builtin(name: &str, params: &serde_json::Map<String, serde_json::Value>, max_new_tokens: usize) -> Result<Box<dyn RewardFn>> {
    let s = |k: &str| params.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let n = |k: &str| params.get(k).and_then(|v| v.as_u64()).map(|v| v as usize);
    Ok(match name {
        "exact_answer" => Box::new(ExactAnswer { field: s("field").unwrap_or_else(|| "answer".into()) }),
        "regex" => {
            let p = s("pattern").ok_or_else(|| Error::Input("reward `regex` needs `pattern`".into()))?;
            let re = Regex::new(&p).map_err(|e| Error::Input(format!("reward `regex`: pattern {p:?} is not a valid regular expression: {e}")))?;
            Box::new(RegexMatch { name: s("label").unwrap_or_else(|| "regex".into()), re })
        }
        "think_format" => Box::new(RegexMatch { name: "think_format".into(), re: Regex::new(THINK_FORMAT).expect("a valid pattern") }),
        "length_penalty" => {
            let max = n("max_length").unwrap_or(max_new_tokens);
            Box::new(LengthPenalty { max_length: max, cache: n("cache").unwrap_or(max / 4) })
        }
        other => return Err(Error::Input(format!("unknown reward `{other}` (built in: exact_answer, regex, think_format, length_penalty; or `model = \"DIR\"` for a reward model)"))),
    })
}

/// A reward model: the score of `[prompt tokens, completion tokens]` at the last non-pad token.
/// It must share the policy's tokenizer.
pub struct RewardModel<A: Adapter = crate::adapters::NoAdapter> {
    pub name: String,
    pub model: Arc<Llama<A>>,
    pub pad_id: u32,
    /// Sequences per forward.
    pub batch_size: usize,
}

impl<A: Adapter> RewardFn for RewardModel<A> {
    fn name(&self) -> &str {
        &self.name
    }
    fn score(&self, c: &Completion<'_>) -> Result<f64> {
        Ok(self.score_batch(std::slice::from_ref(c))?[0])
    }
    fn score_batch(&self, cs: &[Completion<'_>]) -> Result<Vec<f64>> {
        let seqs: Vec<Sequence> = cs.iter().map(|c| Sequence::new(c.prompt.tokens.clone(), c.tokens.to_vec())).collect();
        let mut out = Vec::with_capacity(cs.len());
        for chunk in seqs.chunks(self.batch_size.max(1)) {
            let refs: Vec<&Sequence> = chunk.iter().collect();
            let sb = seq_batch(&refs, self.pad_id, true)?;
            let r = crate::autograd::no_grad(|| crate::train::preference::sequence_rewards(&self.model, &sb, Mode { adapters: true, training: false }))?;
            out.extend(r.to_f64_vec()?);
        }
        Ok(out)
    }
}

/// Reward functions with weights: the reward of a completion is Σ wᵢ·rᵢ (TRL's `reward_weights`).
#[derive(Default)]
pub struct Rewards {
    pub fns: Vec<(Box<dyn RewardFn>, f64)>,
}

impl Rewards {
    pub fn new() -> Self {
        Rewards::default()
    }

    /// Adds `f` with weight `w`.
    pub fn with(mut self, f: impl RewardFn + 'static, w: f64) -> Self {
        self.fns.push((Box::new(f), w));
        self
    }

    /// Every function's rewards `[function][completion]`, the functions in parallel.
    pub fn score(&self, cs: &[Completion<'_>]) -> Result<Vec<Vec<f64>>> {
        if self.fns.is_empty() {
            return Err(Error::Input("no reward function: add at least one ([[rewards]] in the config)".into()));
        }
        self.fns.par_iter().map(|(f, _)| f.score_batch(cs)).collect()
    }

    /// The weighted sum per completion.
    pub fn combine(&self, per_fn: &[Vec<f64>]) -> Vec<f64> {
        let n = per_fn.first().map_or(0, |v| v.len());
        (0..n).map(|i| self.fns.iter().zip(per_fn).map(|((_, w), r)| w * r[i]).sum()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(answer: serde_json::Value) -> Prompt {
        let mut fields = serde_json::Map::new();
        fields.insert("answer".into(), answer);
        Prompt { tokens: vec![1, 2], fields, source: "t.jsonl:1".into() }
    }

    #[test]
    fn exact_answer_takes_the_last_number() {
        let p = prompt(serde_json::json!("1,200"));
        let f = ExactAnswer { field: "answer".into() };
        let c = |text: &'static str| Completion { prompt: &p, text, tokens: &[], finish: FinishReason::Eos };
        assert_eq!(f.score(&c("3 boxes of 400 make 1200.")).unwrap(), 1.0);
        assert_eq!(f.score(&c("It is 1200, no wait, 1300")).unwrap(), 0.0);
        assert_eq!(f.score(&c("no idea")).unwrap(), 0.0);
        let q = prompt(serde_json::json!(12));
        assert_eq!(f.score(&Completion { prompt: &q, text: "The answer is 12.0", tokens: &[], finish: FinishReason::Eos }).unwrap(), 1.0);
        let bad = Prompt { fields: serde_json::Map::new(), ..q.clone() };
        let e = f.score(&Completion { prompt: &bad, text: "1", tokens: &[], finish: FinishReason::Eos }).unwrap_err().to_string();
        assert!(e.contains("t.jsonl:1") && e.contains("`answer`"), "{e}");
    }

    #[test]
    fn builtins_by_name_and_weights() {
        let p = prompt(serde_json::json!("4"));
        let params = serde_json::Map::new();
        let think = builtin("think_format", &params, 64).unwrap();
        let c = Completion { prompt: &p, text: "<think>2+2</think> <answer>4</answer>", tokens: &[0; 10], finish: FinishReason::Eos };
        assert_eq!(think.score(&c).unwrap(), 1.0);
        let len = builtin("length_penalty", &params, 16).unwrap();
        assert_eq!(len.score(&c).unwrap(), 0.0);
        let long = Completion { tokens: &[0; 14], ..c };
        assert!((len.score(&long).unwrap() + 0.5).abs() < 1e-12);
        assert!(builtin("nope", &params, 8).err().expect("unknown").to_string().contains("exact_answer"));
        let r = Rewards::new().with(ExactAnswer { field: "answer".into() }, 1.0).with(reward_fn("len", |c| c.tokens.len() as f64), 0.1);
        let s = r.score(&[c, long]).unwrap();
        // 1·exact (both answer 4) + 0.1·length.
        let c = r.combine(&s);
        assert!((c[0] - 2.0).abs() < 1e-12 && (c[1] - 2.4).abs() < 1e-12, "{c:?}");
    }
}
