//! Training data: records on disk → token ids with a loss mask → (packed) batches.
//!
//! The pipeline, one concern per file:
//! - [`source`]: reads records (JSONL, JSON arrays, Parquet), each tagged `file:line`;
//! - [`format`]: turns a record into a conversation or into text segments, per [`Format`] and [`FieldMap`];
//! - [`chat`]: renders a conversation with its Jinja chat template and finds which characters are trained;
//! - [`tokenize`]: token ids and labels (−100 where not trained), over-long policy, the [`DataReport`];
//! - [`pack`]: shuffling, the eval split, packing several examples into one row, and batches.
//!
//! ```no_run
//! use temper_runtime::data::{self, DatasetSpec, Format, TokenizeOptions};
//! use temper_runtime::tokenizer::Tokenizer;
//! # fn main() -> temper_runtime::Result<()> {
//! let tok = Tokenizer::from_hf_dir("model".as_ref())?;
//! let spec = DatasetSpec::new("train.jsonl", Format::Chat);
//! let (examples, report) = data::load(&spec, &tok, &TokenizeOptions::new(2048))?;
//! println!("{report}");
//! let (train, eval) = data::shuffle_split(examples, 42, 0.05);
//! let rows = data::pack(&train, 2048)?;
//! let batches = data::packed_batches(&rows, 4, tok.pad_token_id.unwrap_or(0))?;
//! # let _ = (eval, batches); Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub mod chat;
pub mod format;
pub mod pack;
pub mod preference;
pub mod source;
pub mod tokenize;

pub use pack::{batches, pack, packed_batches, shuffle_split, PackedRow};
pub use tokenize::{load, preview};

/// How the records of a dataset are shaped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// `{"messages": [{"role": "user", "content": "..."}, ...]}`, rendered with the chat template.
    Chat,
    /// `{"conversations": [{"from": "human", "value": "..."}, ...]}`, roles mapped, then as `Chat`.
    #[serde(rename = "sharegpt")]
    ShareGpt,
    /// `{"instruction", "input", "output"}`: one user turn and one assistant turn.
    Alpaca,
    /// `{"text": "..."}`: every token trained.
    Completion,
    /// `{"segments": [{"text": "...", "label": true}, ...]}`: each segment trained or not.
    InputOutput,
    /// `{"input_ids": [...], "labels": [...]}`: already tokenized; labels optional.
    Tokenized,
    /// Preference pairs for DPO-family and reward-model training: `{"prompt", "chosen", "rejected"}`
    /// as strings or as conversations, or ShareGPT `conversations` with `chosen`/`rejected` replies
    /// (see [`preference`]).
    Preference,
    /// KTO's unpaired data: `{"prompt", "completion", "label": true|false}` (see [`preference`]).
    Kto,
    /// Prompts for RL (GRPO, PPO): `{"prompt": "..." | [messages ending with the user turn], ...}`;
    /// the record's other fields (`answer`, ...) go to the reward functions (see [`preference::load_prompts`]).
    Prompt,
}

/// Which record keys hold what. Every field is optional; [`FieldMap::get`] gives the default
/// for the key when it is unset (`messages`, `role`, `content`, `conversations`, `from`,
/// `value`, `instruction`, `input`, `output`, `system`, `text`, `segments`, `label`,
/// `input_ids`, `labels`, `train`, `prompt`, `chosen`, `rejected`, `completion`, `margin`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FieldMap {
    pub messages: Option<String>,
    pub role: Option<String>,
    pub content: Option<String>,
    /// The per-message train flag of `train_on = "per_message"` (a bool).
    pub train: Option<String>,
    pub conversations: Option<String>,
    pub from: Option<String>,
    pub value: Option<String>,
    /// ShareGPT `from` → chat role; merged over the default
    /// `{"human": "user", "gpt": "assistant", "system": "system"}`.
    pub role_map: BTreeMap<String, String>,
    pub instruction: Option<String>,
    pub input: Option<String>,
    pub output: Option<String>,
    /// Alpaca: an optional system prompt.
    pub system: Option<String>,
    pub text: Option<String>,
    pub segments: Option<String>,
    /// InputOutput: the bool train flag of a segment.
    pub label: Option<String>,
    pub input_ids: Option<String>,
    pub labels: Option<String>,
    /// Preference / KTO: the prompt (a string or a list of messages).
    pub prompt: Option<String>,
    pub chosen: Option<String>,
    pub rejected: Option<String>,
    /// KTO: the completion; its desirability is the bool field `label`.
    pub completion: Option<String>,
    /// Preference (reward models): an optional per-pair margin.
    pub margin: Option<String>,
}

impl FieldMap {
    /// The record key for `name` (one of the field names above): the override, else `name`.
    pub fn get<'a>(&'a self, name: &'a str) -> &'a str {
        let o = match name {
            "messages" => &self.messages,
            "role" => &self.role,
            "content" => &self.content,
            "train" => &self.train,
            "conversations" => &self.conversations,
            "from" => &self.from,
            "value" => &self.value,
            "instruction" => &self.instruction,
            "input" => &self.input,
            "output" => &self.output,
            "system" => &self.system,
            "text" => &self.text,
            "segments" => &self.segments,
            "label" => &self.label,
            "input_ids" => &self.input_ids,
            "labels" => &self.labels,
            "prompt" => &self.prompt,
            "chosen" => &self.chosen,
            "rejected" => &self.rejected,
            "completion" => &self.completion,
            "margin" => &self.margin,
            _ => &None,
        };
        o.as_deref().unwrap_or(name)
    }

    /// The chat role for a ShareGPT `from` value, if known.
    pub fn sharegpt_role(&self, from: &str) -> Option<String> {
        if let Some(r) = self.role_map.get(from) {
            return Some(r.clone());
        }
        match from {
            "human" | "user" => Some("user".into()),
            "gpt" | "assistant" => Some("assistant".into()),
            "system" => Some("system".into()),
            "tool" | "function" | "observation" => Some("tool".into()),
            _ => None,
        }
    }
}

/// Which tokens of a conversation carry loss.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainOn {
    /// Every assistant turn, with its end-of-turn token; nothing else.
    #[default]
    Assistant,
    /// Every token of the rendered conversation.
    All,
    /// The last assistant turn only.
    LastTurn,
    /// Messages whose train flag (field `train`) is true; without a flag, assistant turns.
    PerMessage,
}

/// What to do with an example longer than `sequence_len` tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TooLong {
    /// Keep its first `sequence_len` tokens.
    Truncate,
    /// Leave it out (counted in [`DataReport::dropped_too_long`]).
    #[default]
    Drop,
}

/// One dataset: where it is, how its records are shaped, what is trained.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DatasetSpec {
    /// A `.jsonl`, `.json` (array of records, or JSON lines) or `.parquet` file.
    pub path: PathBuf,
    pub format: Format,
    #[serde(default)]
    pub fields: FieldMap,
    #[serde(default)]
    pub train_on: TrainOn,
}

impl DatasetSpec {
    /// `path` in `format` with default field names, training assistant turns.
    pub fn new(path: impl Into<PathBuf>, format: Format) -> Self {
        DatasetSpec { path: path.into(), format, fields: FieldMap::default(), train_on: TrainOn::default() }
    }
}

/// How records become token ids.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenizeOptions {
    /// The longest example, in tokens.
    pub sequence_len: usize,
    pub too_long: TooLong,
    /// A Jinja chat template used instead of the tokenizer's own.
    pub chat_template: Option<String>,
    /// Completion, InputOutput and template-less Alpaca: append the EOS token, trained.
    pub add_eos: bool,
}

impl TokenizeOptions {
    /// `sequence_len` tokens, dropping longer examples, the tokenizer's template, EOS appended.
    pub fn new(sequence_len: usize) -> Self {
        TokenizeOptions { sequence_len, too_long: TooLong::Drop, chat_template: None, add_eos: true }
    }
}

/// One tokenized example.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    pub input_ids: Vec<u32>,
    /// Unshifted, as Hugging Face labels are: `labels[t] = input_ids[t]` where trained, −100 elsewhere.
    pub labels: Vec<i64>,
    /// Where it came from, `file:line` (Parquet: `file:row`, 1-based).
    pub source: String,
}

impl Example {
    /// The number of trained tokens (labels other than −100).
    pub fn target_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != crate::ops::IGNORE_INDEX).count()
    }
}

/// What [`load`] did with the records it read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DataReport {
    pub read: usize,
    pub kept: usize,
    pub truncated: usize,
    pub dropped_too_long: usize,
    /// `file:line` of each example left out because none of its tokens is trained.
    pub dropped_no_target: Vec<String>,
    /// Trained tokens over the kept examples.
    pub target_tokens: usize,
}

impl fmt::Display for DataReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "read {} records, kept {} ({} target tokens); truncated {}, dropped {} too long, {} with no trained token",
            self.read,
            self.kept,
            self.target_tokens,
            self.truncated,
            self.dropped_too_long,
            self.dropped_no_target.len()
        )?;
        if !self.dropped_no_target.is_empty() {
            let shown: Vec<&str> = self.dropped_no_target.iter().take(5).map(|s| s.as_str()).collect();
            write!(f, " ({}{})", shown.join(", "), if self.dropped_no_target.len() > 5 { ", ..." } else { "" })?;
        }
        Ok(())
    }
}
