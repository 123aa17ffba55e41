//! Preference pairs and KTO items: records → prompt and completion token ids, tokenized the way
//! TRL 1.16 does it, and sequences packed into rows for one forward.
//!
//! A record's prompt and completions are strings (TRL's "standard" format: EOS appended to each
//! completion, the tokenizer's own special tokens added) or conversations (rendered with the chat
//! template, the prompt with the generation prompt). Either way the prompt alone and the prompt
//! followed by each completion are tokenized whole, and the completion starts where the two token
//! sequences diverge (so a token merging across the boundary is not split in two).
//!
//! Shapes read for [`Format::Preference`](super::Format::Preference):
//! - `{"prompt": "...", "chosen": "...", "rejected": "..."}`;
//! - `{"prompt": [messages], "chosen": [messages], "rejected": [messages]}` (a string prompt with
//!   conversational replies is a user turn, a string reply after a conversational prompt an assistant turn);
//! - `{"chosen": [messages], "rejected": [messages]}` with the prompt implicit: the messages both share;
//! - ShareGPT `{"conversations": [{"from", "value"}, …], "chosen": {"from": "gpt", "value"} | "...", "rejected": …}`;
//! - an optional number `margin` (reward models: Bradley–Terry with margin).
//!
//! [`Format::Kto`](super::Format::Kto) reads `{"prompt", "completion", "label": bool}` in the same shapes.

use serde_json::Value;

use super::format::{err, field, flag, kind, text};
use super::source::{read_records, Record};
use super::tokenize::{at, no_template, template_for};
use super::{DataReport, DatasetSpec, FieldMap, Format, TokenizeOptions, TooLong};
use crate::chat_template::{render_chat, ChatMessage};
use crate::error::{Error, Result};
use crate::models::ForwardInput;
use crate::tensor::Tensor;
use crate::tokenizer::Tokenizer;
use crate::Device;

/// A prompt and one completion of it, as token ids. Only the completion is scored.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Sequence {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
}

impl Sequence {
    pub fn new(prompt: Vec<u32>, completion: Vec<u32>) -> Self {
        Sequence { prompt, completion }
    }
    /// Prompt and completion tokens.
    pub fn len(&self) -> usize {
        self.prompt.len() + self.completion.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Completion tokens that are scored: all of them, but the first when the prompt is empty
    /// (nothing predicts a sequence's first token).
    pub fn scored_tokens(&self) -> usize {
        self.completion.len() - usize::from(self.prompt.is_empty() && !self.completion.is_empty())
    }
    /// Keeps the first `n` tokens (TRL's `truncation_mode = "keep_start"`).
    fn truncate(&mut self, n: usize) {
        if self.prompt.len() >= n {
            self.prompt.truncate(n);
            self.completion.clear();
        } else {
            self.completion.truncate(n - self.prompt.len());
        }
    }
}

/// One preference pair: the chosen and rejected completions of one prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct PreferencePair {
    pub chosen: Sequence,
    pub rejected: Sequence,
    /// How much the chosen should win by (reward models; 0 when the record has none).
    pub margin: f64,
    /// `file:line`.
    pub source: String,
}

/// One KTO item: a completion and whether it is desirable.
#[derive(Clone, Debug, PartialEq)]
pub struct KtoItem {
    pub seq: Sequence,
    pub label: bool,
    pub source: String,
}

/// A record side: plain text, or messages.
#[derive(Clone, Debug, PartialEq)]
enum Side {
    Text(String),
    Messages(Vec<ChatMessage>),
}

/// One message object, `{role, content}` or ShareGPT `{from, value}`.
fn message(rec: &Record, m: &Value, f: &FieldMap, key: &str) -> Result<ChatMessage> {
    let (rk, ck, fk, vk) = (f.get("role"), f.get("content"), f.get("from"), f.get("value"));
    if let Some(role) = m.get(rk).and_then(|r| r.as_str()) {
        let content = text(rec, field(rec, m, ck, "message content")?, ck)?;
        if !super::format::KNOWN_ROLES.contains(&role) {
            return Err(err(rec, format!("field `{key}`: unknown role `{role}` (known: {})", super::format::KNOWN_ROLES.join(", "))));
        }
        return Ok(ChatMessage::new(role, content));
    }
    if let Some(from) = m.get(fk).and_then(|r| r.as_str()) {
        let role = f.sharegpt_role(from).ok_or_else(|| err(rec, format!("field `{key}`: unknown role `{from}` in field `{fk}` (map it with fields.role_map)")))?;
        return Ok(ChatMessage::new(role, text(rec, field(rec, m, vk, "message text")?, vk)?));
    }
    Err(err(rec, format!("field `{key}`: a message needs `{rk}`/`{ck}` or `{fk}`/`{vk}`")))
}

fn side(rec: &Record, v: &Value, key: &str, f: &FieldMap) -> Result<Side> {
    match v {
        Value::String(s) => Ok(Side::Text(s.clone())),
        Value::Array(items) => items.iter().map(|m| message(rec, m, f, key)).collect::<Result<Vec<_>>>().map(Side::Messages),
        Value::Object(_) => Ok(Side::Messages(vec![message(rec, v, f, key)?])),
        other => Err(err(rec, format!("field `{key}` must be a string or a list of messages, found {}", kind(other)))),
    }
}

/// The prompt and the completions of a record, all text or all conversation.
fn sides(rec: &Record, f: &FieldMap, completions: &[&str]) -> Result<(Side, Vec<Side>)> {
    if !rec.value.is_object() {
        return Err(err(rec, format!("a record must be a JSON object, found {}", kind(&rec.value))));
    }
    let v = &rec.value;
    let mut outs = completions.iter().map(|k| side(rec, field(rec, v, f.get(k), &format!("the {k} reply"))?, f.get(k), f)).collect::<Result<Vec<_>>>()?;
    let conv_key = f.get("conversations");
    let prompt = match (v.get(f.get("prompt")).filter(|p| !p.is_null()), v.get(conv_key).filter(|p| !p.is_null())) {
        (Some(p), _) => side(rec, p, f.get("prompt"), f)?,
        (None, Some(c)) => side(rec, c, conv_key, f)?,
        (None, None) => {
            // Implicit prompt: the messages every completion starts with.
            let lists: Vec<&Vec<ChatMessage>> = outs
                .iter()
                .map(|s| match s {
                    Side::Messages(m) => Ok(m),
                    Side::Text(_) => Err(err(rec, format!("missing field `{}` (the prompt)", f.get("prompt")))),
                })
                .collect::<Result<_>>()?;
            let mut n = lists.iter().map(|l| l.len()).min().unwrap_or(0);
            while n > 0 && !lists.iter().all(|l| l[..n] == lists[0][..n]) {
                n -= 1;
            }
            if lists.iter().any(|l| l.len() == n) {
                n = n.saturating_sub(1);
            }
            let prompt = lists[0][..n].to_vec();
            outs = lists.iter().map(|l| Side::Messages(l[n..].to_vec())).collect();
            Side::Messages(prompt)
        }
    };
    let conversational = matches!(prompt, Side::Messages(_)) || outs.iter().any(|s| matches!(s, Side::Messages(_)));
    if !conversational {
        return Ok((prompt, outs));
    }
    let to_msgs = |s: Side, role: &str| match s {
        Side::Messages(m) => m,
        Side::Text(t) => vec![ChatMessage::new(role, t)],
    };
    let prompt = to_msgs(prompt, "user");
    let outs: Vec<Side> = outs.into_iter().map(|s| Side::Messages(to_msgs(s, "assistant"))).collect();
    for (k, s) in completions.iter().zip(&outs) {
        if let Side::Messages(m) = s {
            if m.is_empty() || m.iter().all(|m| m.content.trim().is_empty()) {
                return Err(err(rec, format!("field `{}`: empty reply", f.get(k))));
            }
        }
    }
    Ok((Side::Messages(prompt), outs))
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Token ids of the prompt and of each completion, as TRL 1.16's `DPOTrainer` tokenizes them.
fn tokenize_sides(prompt: &Side, outs: &[Side], tok: &Tokenizer, template: Option<&str>) -> Result<Vec<Sequence>> {
    let (prompt_ids, full): (Vec<u32>, Vec<Vec<u32>>) = match prompt {
        Side::Messages(p) => {
            let t = template.ok_or_else(no_template)?;
            let (bos, eos) = (tok.bos_token.as_deref(), tok.eos_token.as_deref());
            let enc = |s: &str| -> Result<Vec<u32>> {
                Ok(tok.inner().encode(s, false).map_err(|e| Error::Input(format!("tokenizer: cannot encode the rendered conversation: {e}")))?.get_ids().to_vec())
            };
            let p = enc(&render_chat(t, p, true, bos, eos)?)?;
            let mut full = Vec::new();
            for o in outs {
                let Side::Messages(m) = o else { unreachable!("sides() makes every side a conversation") };
                let all: Vec<ChatMessage> = p_msgs(prompt).iter().cloned().chain(m.iter().cloned()).collect();
                full.push(enc(&render_chat(t, &all, false, bos, eos)?)?);
            }
            (p, full)
        }
        Side::Text(p) => {
            let eos = tok.eos_token.clone().ok_or_else(|| Error::Input("string completions get an EOS token appended, but the tokenizer has no EOS token".into()))?;
            let mut full = Vec::new();
            for o in outs {
                let Side::Text(c) = o else { unreachable!("sides() keeps text sides together") };
                let c = if c.ends_with(&eos) { c.clone() } else { format!("{c}{eos}") };
                full.push(tok.encode(&format!("{p}{c}"), true)?);
            }
            (tok.encode(p, true)?, full)
        }
    };
    let n = full.iter().map(|f| common_prefix(&prompt_ids, f)).min().unwrap_or(0);
    Ok(full.iter().map(|f| Sequence::new(prompt_ids[..n].to_vec(), f[n..].to_vec())).collect())
}

fn p_msgs(s: &Side) -> &[ChatMessage] {
    match s {
        Side::Messages(m) => m,
        Side::Text(_) => &[],
    }
}

/// Applies the length policy to a record's sequences: `None` when the record is dropped.
fn fit(mut seqs: Vec<Sequence>, opts: &TokenizeOptions, report: &mut DataReport, source: &str) -> Option<Vec<Sequence>> {
    if seqs.iter().any(|s| s.len() > opts.sequence_len) {
        match opts.too_long {
            TooLong::Drop => {
                report.dropped_too_long += 1;
                return None;
            }
            TooLong::Truncate => {
                seqs.iter_mut().for_each(|s| s.truncate(opts.sequence_len));
                report.truncated += 1;
            }
        }
    }
    if seqs.iter().any(|s| s.scored_tokens() == 0) {
        report.dropped_no_target.push(source.to_string());
        return None;
    }
    report.target_tokens += seqs.iter().map(Sequence::scored_tokens).sum::<usize>();
    Some(seqs)
}

fn check_format(spec: &DatasetSpec, want: Format) -> Result<()> {
    if spec.format != want {
        return Err(Error::Input(format!("{}: the dataset's format is {:?}, expected {want:?}", spec.path.display(), spec.format)));
    }
    Ok(())
}

/// Reads every record of `spec`, takes what `extra` needs from it (fields beyond the texts, checked
/// for every record), tokenizes its prompt and `completions`, applies the length policy, and builds
/// what `build` makes of the sequences of each record kept.
fn load_with<E, T>(
    spec: &DatasetSpec,
    tok: &Tokenizer,
    opts: &TokenizeOptions,
    completions: &[&str],
    extra: impl Fn(&Record) -> Result<E>,
    build: impl Fn(&Record, E, Vec<Sequence>) -> T,
) -> Result<(Vec<T>, DataReport)> {
    let records = read_records(&spec.path)?;
    let template = template_for(tok, opts);
    let mut report = DataReport { read: records.len(), ..Default::default() };
    let mut out = Vec::with_capacity(records.len());
    for rec in &records {
        let (prompt, outs) = sides(rec, &spec.fields, completions)?;
        let e = extra(rec)?;
        let seqs = tokenize_sides(&prompt, &outs, tok, template.as_deref()).map_err(|e| at(e, &rec.source))?;
        if let Some(s) = fit(seqs, opts, &mut report, &rec.source) {
            out.push(build(rec, e, s));
        }
    }
    report.kept = out.len();
    Ok((out, report))
}

/// Reads and tokenizes every preference pair of `spec` (format `preference`). A pair with a side
/// longer than `sequence_len` is dropped or truncated per `opts.too_long` (keeping the start, as
/// TRL's default); one left with an empty completion is named in the report.
pub fn load_pairs(spec: &DatasetSpec, tok: &Tokenizer, opts: &TokenizeOptions) -> Result<(Vec<PreferencePair>, DataReport)> {
    check_format(spec, Format::Preference)?;
    let mk = spec.fields.get("margin");
    let margin = |rec: &Record| match rec.value.get(mk) {
        None | Some(Value::Null) => Ok(0.0),
        Some(m) => m.as_f64().ok_or_else(|| err(rec, format!("field `{mk}` must be a number, found {}", kind(m)))),
    };
    load_with(spec, tok, opts, &["chosen", "rejected"], margin, |rec, margin, mut s| {
        let rejected = s.pop().expect("two sides");
        let chosen = s.pop().expect("two sides");
        PreferencePair { chosen, rejected, margin, source: rec.source.clone() }
    })
}

/// Reads and tokenizes every KTO item of `spec` (format `kto`): a prompt, a completion and the
/// bool `label` (true = desirable).
pub fn load_kto(spec: &DatasetSpec, tok: &Tokenizer, opts: &TokenizeOptions) -> Result<(Vec<KtoItem>, DataReport)> {
    check_format(spec, Format::Kto)?;
    let lk = spec.fields.get("label");
    let label = |rec: &Record| flag(rec, &rec.value, lk)?.ok_or_else(|| err(rec, format!("missing field `{lk}` (bool: is the completion desirable)")));
    load_with(spec, tok, opts, &["completion"], label, |rec, label, mut s| KtoItem { seq: s.pop().expect("one side"), label, source: rec.source.clone() })
}

/// Completions to score (`temper reward`): `{"prompt", "completion"}` records in any of the
/// shapes above, each with its `file:line`; a `label` field is allowed and ignored.
pub fn load_completions(spec: &DatasetSpec, tok: &Tokenizer, opts: &TokenizeOptions) -> Result<(Vec<(String, Sequence)>, DataReport)> {
    load_with(spec, tok, opts, &["completion"], |_| Ok(()), |rec, (), mut s| (rec.source.clone(), s.pop().expect("one side")))
}

/// One RL prompt: its tokens (a conversation rendered with the chat template and the generation
/// prompt; a string as is, with the tokenizer's special tokens), and the record's other fields
/// (`answer`, ...), which reward functions read.
#[derive(Clone, Debug, PartialEq)]
pub struct Prompt {
    pub tokens: Vec<u32>,
    pub fields: serde_json::Map<String, Value>,
    /// `file:line`.
    pub source: String,
}

/// Reads and tokenizes the prompts of `spec` (format `prompt`). A conversation must end with a
/// user turn (the model answers it); a prompt longer than `sequence_len` is dropped or keeps its
/// end (the question) per `opts.too_long`.
pub fn load_prompts(spec: &DatasetSpec, tok: &Tokenizer, opts: &TokenizeOptions) -> Result<(Vec<Prompt>, DataReport)> {
    check_format(spec, Format::Prompt)?;
    let records = read_records(&spec.path)?;
    let template = template_for(tok, opts);
    let pk = spec.fields.get("prompt");
    let mut report = DataReport { read: records.len(), ..Default::default() };
    let mut out = Vec::with_capacity(records.len());
    for rec in &records {
        let obj = rec.value.as_object().ok_or_else(|| err(rec, format!("a record must be a JSON object, found {}", kind(&rec.value))))?;
        let p = field(rec, &rec.value, pk, "the prompt")?;
        let mut tokens = match side(rec, p, pk, &spec.fields)? {
            Side::Text(t) if t.is_empty() => return Err(err(rec, format!("field `{pk}` is empty"))),
            Side::Text(t) => tok.encode(&t, true).map_err(|e| at(e, &rec.source))?,
            Side::Messages(m) => {
                match m.last() {
                    Some(last) if last.role == "user" => {}
                    Some(last) => return Err(err(rec, format!("field `{pk}`: the conversation ends with a `{}` turn; an RL prompt ends with the user's", last.role))),
                    None => return Err(err(rec, format!("field `{pk}` has no messages"))),
                }
                let t = template.as_deref().ok_or_else(no_template)?;
                let text = render_chat(t, &m, true, tok.bos_token.as_deref(), tok.eos_token.as_deref()).map_err(|e| at(e, &rec.source))?;
                tok.inner().encode(text.as_str(), false).map_err(|e| err(rec, format!("tokenizer: cannot encode the rendered prompt: {e}")))?.get_ids().to_vec()
            }
        };
        if opts.sequence_len > 0 && tokens.len() > opts.sequence_len {
            match opts.too_long {
                TooLong::Drop => {
                    report.dropped_too_long += 1;
                    continue;
                }
                TooLong::Truncate => {
                    tokens.drain(..tokens.len() - opts.sequence_len);
                    report.truncated += 1;
                }
            }
        }
        let mut fields = obj.clone();
        fields.remove(pk);
        report.target_tokens += tokens.len();
        out.push(Prompt { tokens, fields, source: rec.source.clone() });
    }
    report.kept = out.len();
    Ok((out, report))
}

/// Whether the first record of `path` is a preference pair (has `chosen` and `rejected`).
pub fn is_pair_file(path: &std::path::Path) -> Result<bool> {
    let records = read_records(path)?;
    let first = records.first().ok_or_else(|| Error::Input(format!("{}: no records", path.display())))?;
    Ok(first.value.get("chosen").is_some() && first.value.get("rejected").is_some())
}

/// Where one sequence sits in a [`SeqBatch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub row: usize,
    /// First token (the prompt's) in the row.
    pub start: usize,
    /// Prompt + completion tokens.
    pub len: usize,
    /// Completion tokens scored.
    pub scored: usize,
    /// Prompt tokens.
    pub prompt: usize,
}

impl Span {
    /// The completion's token indices within the sequence (never the first token: nothing
    /// predicts it).
    pub fn completion(&self) -> std::ops::Range<usize> {
        self.prompt.max(1)..self.len
    }
}

/// Sequences laid out for one forward: packed several to a row (each attending only to itself,
/// positions restarting at 0) or one per row, right-padded; the spans say where each sequence and
/// its completion are.
#[derive(Clone, Debug)]
pub struct SeqBatch {
    pub input: ForwardInput,
    /// In the order the sequences were given.
    pub spans: Vec<Span>,
    pub pad_id: u32,
}

impl SeqBatch {
    /// Real (unpadded) tokens.
    pub fn input_tokens(&self) -> usize {
        self.spans.iter().map(|s| s.len).sum()
    }
    /// Rows × row length (what the forward computes).
    pub fn padded_tokens(&self) -> usize {
        self.input.input_ids.elem_count()
    }
    /// The flat index (`row · seq + t`) of each sequence's last token that is not the pad id:
    /// where transformers' `…ForSequenceClassification` reads its score (a trailing EOS that is
    /// also the pad token is skipped, as there).
    pub fn last_token_index(&self) -> Result<Vec<usize>> {
        let t = self.input.input_ids.shape()[1];
        let ids = self.input.input_ids.to_vec::<i64>()?;
        Ok(self
            .spans
            .iter()
            .map(|s| {
                let first = s.row * t + s.start;
                (first..first + s.len).rev().find(|&i| ids[i] != self.pad_id as i64).unwrap_or(first + s.len - 1)
            })
            .collect())
    }
}

/// Lays out `seqs` for one forward. With `pack`, first-fit decreasing into rows as long as the
/// longest sequence, so padding is what is left over; else one right-padded sequence per row.
pub fn seq_batch(seqs: &[&Sequence], pad_id: u32, pack: bool) -> Result<SeqBatch> {
    if seqs.is_empty() || seqs.iter().any(|s| s.is_empty()) {
        return Err(Error::Input("seq_batch: no sequences, or an empty one".into()));
    }
    let cap = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut spans = vec![Span { row: 0, start: 0, len: 0, scored: 0, prompt: 0 }; seqs.len()];
    let mut fill: Vec<usize> = Vec::new();
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    if pack {
        order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].len()));
    }
    for &i in &order {
        let n = seqs[i].len();
        let row = if pack { fill.iter().position(|&f| f + n <= cap) } else { None };
        let row = match row {
            Some(r) => r,
            None => {
                fill.push(0);
                fill.len() - 1
            }
        };
        spans[i] = Span { row, start: fill[row], len: n, scored: seqs[i].scored_tokens(), prompt: seqs[i].prompt.len() };
        fill[row] += n;
    }
    let (b, t) = (fill.len(), cap);
    let mut ids = vec![pad_id as i64; b * t];
    let mut mask = vec![0i64; b * t];
    let mut pos = vec![0i64; b * t];
    let mut seg = vec![0u32; b * t];
    let mut next_seg = vec![0u32; b];
    for (s, sp) in seqs.iter().zip(&spans) {
        next_seg[sp.row] += 1;
        let base = sp.row * t + sp.start;
        for (k, &id) in s.prompt.iter().chain(&s.completion).enumerate() {
            ids[base + k] = id as i64;
            mask[base + k] = 1;
            pos[base + k] = k as i64;
            seg[base + k] = next_seg[sp.row];
        }
    }
    let packed = spans.iter().enumerate().any(|(i, a)| spans[i + 1..].iter().any(|b| b.row == a.row));
    let input = ForwardInput {
        input_ids: Tensor::from_vec(ids, &[b, t], Device::Cpu)?,
        attention_mask: Some(Tensor::from_vec(mask, &[b, t], Device::Cpu)?),
        position_ids: packed.then_some(pos),
        segment_ids: if packed { Some(Tensor::from_vec(seg, &[b, t], Device::Cpu)?) } else { None },
    };
    Ok(SeqBatch { input, spans, pad_id })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(v: Value) -> Record {
        Record { source: "p.jsonl:3".into(), value: v }
    }

    #[test]
    fn record_shapes_become_the_same_sides() {
        let f = FieldMap::default();
        let user = ChatMessage::new("user", "hi");
        let (p, o) = sides(&rec(serde_json::json!({"prompt": "hi", "chosen": "a", "rejected": "b"})), &f, &["chosen", "rejected"]).unwrap();
        assert_eq!((p, o[1].clone()), (Side::Text("hi".into()), Side::Text("b".into())));
        let conv = serde_json::json!({"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"});
        let (p, o) = sides(&rec(conv), &f, &["chosen", "rejected"]).unwrap();
        assert_eq!(p, Side::Messages(vec![user.clone()]));
        assert_eq!(o[1], Side::Messages(vec![ChatMessage::new("assistant", "b")]));
        let implicit = serde_json::json!({"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "b"}]});
        let (p, o) = sides(&rec(implicit), &f, &["chosen", "rejected"]).unwrap();
        assert_eq!(p, Side::Messages(vec![user.clone()]));
        assert_eq!(o[0], Side::Messages(vec![ChatMessage::new("assistant", "a")]));
        let sharegpt = serde_json::json!({"conversations": [{"from": "human", "value": "hi"}], "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}});
        let (p, o) = sides(&rec(sharegpt), &f, &["chosen", "rejected"]).unwrap();
        assert_eq!(p, Side::Messages(vec![user]));
        assert_eq!(o[1], Side::Messages(vec![ChatMessage::new("assistant", "b")]));
    }

    #[test]
    fn bad_records_name_the_line_and_the_key() {
        let f = FieldMap::default();
        let e = sides(&rec(serde_json::json!({"prompt": "hi", "chosen": "a"})), &f, &["chosen", "rejected"]).unwrap_err();
        assert_eq!(e.to_string(), "p.jsonl:3: missing field `rejected` (the rejected reply)");
        let e = sides(&rec(serde_json::json!({"prompt": "hi", "chosen": 3, "rejected": "b"})), &f, &["chosen", "rejected"]).unwrap_err();
        assert_eq!(e.to_string(), "p.jsonl:3: field `chosen` must be a string or a list of messages, found a number");
        let e = sides(&rec(serde_json::json!({"chosen": "a", "rejected": "b"})), &f, &["chosen", "rejected"]).unwrap_err();
        assert_eq!(e.to_string(), "p.jsonl:3: missing field `prompt` (the prompt)");
    }

    #[test]
    fn packing_puts_short_sequences_together_each_in_its_own_segment() {
        let a = Sequence::new(vec![1, 2, 3], vec![4, 5]);
        let b = Sequence::new(vec![6], vec![7]);
        let c = Sequence::new(vec![8], vec![9, 10]);
        let sb = seq_batch(&[&a, &b, &c], 0, true).unwrap();
        assert_eq!(sb.input.input_ids.shape(), [2, 5]);
        assert_eq!(sb.spans[0], Span { row: 0, start: 0, len: 5, scored: 2, prompt: 3 });
        assert_eq!((sb.spans[2].row, sb.spans[2].start, sb.spans[1].row, sb.spans[1].start), (1, 0, 1, 3));
        assert_eq!(sb.input.input_ids.to_vec::<i64>().unwrap(), vec![1, 2, 3, 4, 5, 8, 9, 10, 6, 7]);
        assert_eq!(sb.input.position_ids.as_deref().unwrap(), [0, 1, 2, 3, 4, 0, 1, 2, 0, 1]);
        assert_eq!(sb.input.segment_ids.as_ref().unwrap().to_vec::<u32>().unwrap(), vec![1, 1, 1, 1, 1, 2, 2, 2, 1, 1]);
        assert_eq!(sb.last_token_index().unwrap(), vec![4, 9, 7]);
        let un = seq_batch(&[&a, &b], 0, false).unwrap();
        assert_eq!(un.input.input_ids.shape(), [2, 5]);
        assert!(un.input.segment_ids.is_none());
        assert_eq!(un.input.input_ids.to_vec::<i64>().unwrap(), vec![1, 2, 3, 4, 5, 6, 7, 0, 0, 0]);
        assert_eq!(un.input.attention_mask.as_ref().unwrap().to_vec::<i64>().unwrap(), vec![1, 1, 1, 1, 1, 1, 1, 0, 0, 0]);
        // A trailing token equal to the pad id is skipped, as transformers does.
        let p = seq_batch(&[&a], 5, true).unwrap();
        assert_eq!(p.last_token_index().unwrap(), vec![3]);
    }
}
