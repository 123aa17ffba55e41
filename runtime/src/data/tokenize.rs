//! Items → token ids and unshifted labels (−100 where not trained), the over-long policy, and
//! the [`DataReport`].
//!
//! A conversation is rendered to text and that text is tokenized once without special tokens, as
//! transformers' `apply_chat_template(tokenize=True)` does, so the ids are exactly its ids. A
//! token is trained when its bytes overlap a trained range of the text ([`super::chat`]).
//! The first label of every example is −100: no token predicts it, and in a packed row it would
//! otherwise be predicted from the previous example.

use super::chat::{prepare_template, render_trained};
use super::format::{parse, Item, Segment, Turn};
use super::source::read_records;
use super::{DataReport, DatasetSpec, Example, TokenizeOptions, TooLong, TrainOn};
use crate::error::{Error, Result};
use crate::ops::IGNORE_INDEX;
use crate::tokenizer::Tokenizer;

/// Reads, formats and tokenizes every record of `spec`. Examples longer than
/// `opts.sequence_len` are truncated or dropped per `opts.too_long`; examples with no trained
/// token are left out and named in the report. Any malformed record is an error naming its
/// `file:line`.
pub fn load(spec: &DatasetSpec, tok: &Tokenizer, opts: &TokenizeOptions) -> Result<(Vec<Example>, DataReport)> {
    if opts.sequence_len < 2 {
        return Err(Error::Input(format!("data: sequence_len must be at least 2, got {}", opts.sequence_len)));
    }
    let records = read_records(&spec.path)?;
    let template = template_for(tok, opts);
    let mut report = DataReport { read: records.len(), ..Default::default() };
    let mut out = Vec::with_capacity(records.len());
    for rec in &records {
        let item = parse(rec, spec.format, &spec.fields)?;
        let (mut input_ids, mut labels) =
            tokenize_item(&item, tok, template.as_deref(), spec.train_on, opts).map_err(|e| at(e, &rec.source))?;
        if input_ids.len() > opts.sequence_len {
            match opts.too_long {
                TooLong::Drop => {
                    report.dropped_too_long += 1;
                    continue;
                }
                TooLong::Truncate => {
                    input_ids.truncate(opts.sequence_len);
                    labels.truncate(opts.sequence_len);
                    report.truncated += 1;
                }
            }
        }
        if let Some(l) = labels.first_mut() {
            *l = IGNORE_INDEX;
        }
        let ex = Example { input_ids, labels, source: rec.source.clone() };
        let n = ex.target_tokens();
        if n == 0 {
            report.dropped_no_target.push(rec.source.clone());
            continue;
        }
        report.target_tokens += n;
        out.push(ex);
    }
    report.kept = out.len();
    Ok((out, report))
}

/// The chat template `opts` asks for, else the tokenizer's own, prepared for rendering.
pub(crate) fn template_for(tok: &Tokenizer, opts: &TokenizeOptions) -> Option<String> {
    opts.chat_template.as_deref().or(tok.chat_template.as_deref()).map(prepare_template)
}

/// The error of a conversation with no template to render it.
pub(crate) fn no_template() -> Error {
    Error::Input("no chat template: the tokenizer has none (tokenizer_config.json `chat_template` or GGUF `tokenizer.chat_template`) and none was given".into())
}

/// Prefixes an error's message with `source` (the record's `file:line`) unless it has it.
pub(crate) fn at(e: Error, source: &str) -> Error {
    match e {
        Error::Input(m) if !m.starts_with(source) => Error::Input(format!("{source}: {m}")),
        other => other,
    }
}

fn eos_id(tok: &Tokenizer) -> Result<u32> {
    tok.eos_token
        .as_deref()
        .and_then(|t| tok.token_to_id(t))
        .or(tok.eos_token_ids.first().copied())
        .ok_or_else(|| Error::Input("add_eos is set but the tokenizer has no EOS token".into()))
}

/// Token ids and labels of one item, before the length policy.
pub fn tokenize_item(item: &Item, tok: &Tokenizer, template: Option<&str>, train_on: TrainOn, opts: &TokenizeOptions) -> Result<(Vec<u32>, Vec<i64>)> {
    match item {
        Item::Conversation { turns, alpaca } => match template {
            Some(t) => conversation(t, turns, tok, train_on),
            None if *alpaca => segments(&alpaca_prompt(turns), tok, opts.add_eos, true),
            None => Err(no_template()),
        },
        Item::Text(text) => {
            let mut ids = tok.encode(text, true)?;
            if opts.add_eos {
                let eos = eos_id(tok)?;
                if ids.last() != Some(&eos) {
                    ids.push(eos);
                }
            }
            let labels = ids.iter().map(|&i| i as i64).collect();
            Ok((ids, labels))
        }
        Item::Segments(segs) => segments(segs, tok, opts.add_eos, false),
        Item::Tokens { input_ids, labels } => {
            let n = tok.vocab_size();
            if let Some(bad) = input_ids.iter().find(|&&i| i as usize >= n) {
                return Err(Error::Input(format!("token id {bad} is outside the vocabulary of {n}")));
            }
            let labels = match labels {
                Some(l) => l.clone(),
                None => input_ids.iter().map(|&i| i as i64).collect(),
            };
            Ok((input_ids.clone(), labels))
        }
    }
}

/// The rendered conversation's ids (no special tokens added, as transformers) and labels.
fn conversation(template: &str, turns: &[Turn], tok: &Tokenizer, train_on: TrainOn) -> Result<(Vec<u32>, Vec<i64>)> {
    let r = render_trained(template, turns, train_on, tok.bos_token.as_deref(), tok.eos_token.as_deref())?;
    let enc = tok.inner().encode(r.text.as_str(), false).map_err(|e| Error::Input(format!("tokenizer: cannot encode the rendered conversation: {e}")))?;
    let ids = enc.get_ids().to_vec();
    let labels = ids
        .iter()
        .zip(enc.get_offsets())
        .map(|(&id, &(s, e))| {
            let hit = r.trained.iter().any(|t| if s == e { t.contains(&s) } else { s < t.end && e > t.start });
            if hit {
                id as i64
            } else {
                IGNORE_INDEX
            }
        })
        .collect();
    Ok((ids, labels))
}

/// Segments tokenized one by one and concatenated; the first with the tokenizer's special
/// tokens when `first_special` (a BOS), then EOS (trained) when `add_eos`.
fn segments(segs: &[Segment], tok: &Tokenizer, add_eos: bool, first_special: bool) -> Result<(Vec<u32>, Vec<i64>)> {
    let (mut ids, mut labels) = (Vec::new(), Vec::new());
    for (i, s) in segs.iter().enumerate() {
        let part = tok.encode(&s.text, first_special && i == 0)?;
        labels.extend(part.iter().map(|&id| if s.train { id as i64 } else { IGNORE_INDEX }));
        ids.extend(part);
    }
    if add_eos {
        let eos = eos_id(tok)?;
        ids.push(eos);
        labels.push(eos as i64);
    }
    Ok((ids, labels))
}

/// The Stanford Alpaca prompt, for Alpaca records when there is no chat template.
fn alpaca_prompt(turns: &[Turn]) -> Vec<Segment> {
    let get = |role: &str| turns.iter().find(|t| t.message.role == role).map(|t| t.message.content.clone()).unwrap_or_default();
    let (system, user, output) = (get("system"), get("user"), get("assistant"));
    let system = if system.is_empty() {
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.".to_string()
    } else {
        system
    };
    vec![
        Segment { text: format!("{system}\n\n### Instruction:\n{user}\n\n### Response:\n"), train: false },
        Segment { text: output, train: true },
    ]
}

/// A readable view of the first `n` examples. Text view: a `== file:line ==` header with token
/// counts, then the decoded text with masked (untrained) runs inside `⟦ ⟧`. JSON view: one line
/// per example, `{"source", "text", "input_ids", "labels"}`.
pub fn preview(examples: &[Example], tok: &Tokenizer, n: usize, json: bool) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for ex in examples.iter().take(n) {
        if json {
            let v = serde_json::json!({
                "source": ex.source,
                "text": tok.decode(&ex.input_ids, false)?,
                "input_ids": ex.input_ids,
                "labels": ex.labels,
            });
            out.push(v.to_string());
            continue;
        }
        let mut s = format!("== {} ({} tokens, {} trained) ==\n", ex.source, ex.input_ids.len(), ex.target_tokens());
        let mut i = 0;
        while i < ex.input_ids.len() {
            let masked = ex.labels[i] == IGNORE_INDEX;
            let j = (i..ex.input_ids.len()).find(|&j| (ex.labels[j] == IGNORE_INDEX) != masked).unwrap_or(ex.input_ids.len());
            let text = tok.decode(&ex.input_ids[i..j], false)?;
            if masked {
                s.push('⟦');
                s.push_str(&text);
                s.push('⟧');
            } else {
                s.push_str(&text);
            }
            i = j;
        }
        out.push(s);
    }
    Ok(out)
}
