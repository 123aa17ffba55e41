//! Which layers an adapter goes on, with which hyper-parameters: [`AdapterConfig`] and [`Targets`].

use super::adapter::Adapter;
use crate::error::{Error, Result};

/// The linear layers an adapter is injected into, matched against module paths
/// (`model.layers.0.self_attn.q_proj`) the way PEFT matches `target_modules`.
#[derive(Clone, Debug, PartialEq)]
pub enum Targets {
    /// Every linear layer except the output head (`lm_head`): PEFT's `"all-linear"`.
    AllLinear,
    /// A module matches when its path equals a name or ends with `.name` (`q_proj`, `mlp.down_proj`).
    Names(Vec<String>),
    /// A module matches when the regex matches its whole path.
    Regex(String),
}

impl Targets {
    /// `Targets::Names` from anything string-like.
    pub fn names<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Targets {
        Targets::Names(names.into_iter().map(Into::into).collect())
    }

    /// Whether `module` is targeted. Regex errors name the pattern.
    pub fn matches(&self, module: &str) -> Result<bool> {
        Ok(match self {
            Targets::AllLinear => !module.ends_with("lm_head") && module != "lm_head",
            Targets::Names(n) => n.iter().any(|t| module == t || module.ends_with(&format!(".{t}"))),
            Targets::Regex(r) => compile(&format!("^(?:{r})$"), r)?.is_match(module),
        })
    }
}

fn compile(full: &str, user: &str) -> Result<regex::Regex> {
    regex::Regex::new(full).map_err(|e| Error::Input(format!("invalid target pattern `{user}`: {e}")))
}

/// Whether a PEFT pattern key (`rank_pattern`, `alpha_pattern`) applies to `module`: PEFT matches
/// `(.*\.)?key$`, so `q_proj` and `layers.0.self_attn.q_proj` both select `model.layers.0.self_attn.q_proj`.
pub fn pattern_matches(key: &str, module: &str) -> Result<bool> {
    Ok(compile(&format!(r"^(?:.*\.)?(?:{key})$"), key)?.is_match(module))
}

/// An adapter's hyper-parameters, where it goes, and per-layer overrides.
///
/// Made by the `config(..)` constructor `#[adapter]` generates (`Lora::config(16, 32.0)`).
#[derive(Clone, Debug)]
pub struct AdapterConfig<A: Adapter> {
    /// Hyper-parameters of every targeted layer unless a pattern overrides them.
    pub hyper: A::Config,
    pub targets: Targets,
    /// Layers excluded even when targeted.
    pub exclude: Option<Targets>,
    /// `(pattern, hyper-parameters)`: the first pattern that matches a layer (PEFT semantics,
    /// see [`pattern_matches`]) gives its hyper-parameters — per-layer rank and alpha.
    pub patterns: Vec<(String, A::Config)>,
    /// Seed of the initialisers (each layer's stream is derived from it and the layer's path).
    pub seed: u64,
}

impl<A: Adapter> AdapterConfig<A> {
    /// All linear layers, no patterns, seed 0.
    pub fn new(hyper: A::Config) -> Self {
        AdapterConfig { hyper, targets: Targets::AllLinear, exclude: None, patterns: Vec::new(), seed: 0 }
    }
    /// Changes the hyper-parameters: `.with(|h| h.lora_dropout = 0.05)`.
    pub fn with(mut self, f: impl FnOnce(&mut A::Config)) -> Self {
        f(&mut self.hyper);
        self
    }
    /// Sets the targeted layers.
    pub fn targets(mut self, targets: Targets) -> Self {
        self.targets = targets;
        self
    }
    /// Excludes layers from the targets.
    pub fn exclude(mut self, exclude: Targets) -> Self {
        self.exclude = Some(exclude);
        self
    }
    /// Overrides hyper-parameters on layers matching `pattern`: `.pattern("down_proj", |h| h.r = 4)`.
    pub fn pattern(mut self, pattern: impl Into<String>, f: impl FnOnce(&mut A::Config)) -> Self {
        let mut h = self.hyper.clone();
        f(&mut h);
        self.patterns.push((pattern.into(), h));
        self
    }
    /// Sets the initialisation seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    /// The hyper-parameters of `module`.
    pub fn hyper_for(&self, module: &str) -> Result<&A::Config> {
        for (p, h) in &self.patterns {
            if pattern_matches(p, module)? {
                return Ok(h);
            }
        }
        Ok(&self.hyper)
    }
    /// Whether `module` gets this adapter.
    pub fn targets_module(&self, module: &str) -> Result<bool> {
        Ok(self.targets.matches(module)? && !matches!(&self.exclude, Some(e) if e.matches(module)?))
    }
}
