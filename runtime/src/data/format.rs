//! Records → what is tokenized: a conversation (Chat, ShareGPT, Alpaca), text segments with a
//! train flag each (Completion, InputOutput), or ready token ids (Tokenized). Field names come
//! from the [`FieldMap`]; every error names the record's `file:line` and the key.

use serde_json::Value;

use super::source::Record;
use super::{FieldMap, Format};
use crate::chat_template::ChatMessage;
use crate::error::{Error, Result};

/// The roles a conversation may use.
pub const KNOWN_ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// One message and its optional per-message train flag.
#[derive(Clone, Debug, PartialEq)]
pub struct Turn {
    pub message: ChatMessage,
    pub train: Option<bool>,
}

/// A piece of text trained or not.
#[derive(Clone, Debug, PartialEq)]
pub struct Segment {
    pub text: String,
    pub train: bool,
}

/// A record, shaped for tokenization.
#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    /// Rendered with the chat template. `alpaca` marks a converted Alpaca record, which falls
    /// back to the Stanford Alpaca prompt when there is no template.
    Conversation { turns: Vec<Turn>, alpaca: bool },
    /// Completion: the whole text, tokenized with the tokenizer's special tokens, trained.
    Text(String),
    /// InputOutput: each segment tokenized on its own and concatenated.
    Segments(Vec<Segment>),
    /// Tokenized: ids and labels as given (labels absent: every token trained).
    Tokens { input_ids: Vec<u32>, labels: Option<Vec<i64>> },
}

pub(crate) fn err(rec: &Record, msg: impl std::fmt::Display) -> Error {
    Error::Input(format!("{}: {msg}", rec.source))
}

pub(crate) fn field<'a>(rec: &Record, obj: &'a Value, key: &str, what: &str) -> Result<&'a Value> {
    match obj.get(key) {
        Some(v) if !v.is_null() => Ok(v),
        _ => Err(err(rec, format!("missing field `{key}` ({what})"))),
    }
}

/// A string value; a list of `{"type": "text", "text": ...}` parts is joined.
pub(crate) fn text(rec: &Record, v: &Value, key: &str) -> Result<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut s = String::new();
            for p in parts {
                match p.get("text").and_then(|t| t.as_str()) {
                    Some(t) => s.push_str(t),
                    None => return Err(err(rec, format!("field `{key}`: a content part without a `text` string"))),
                }
            }
            Ok(s)
        }
        other => Err(err(rec, format!("field `{key}` must be a string, found {}", kind(other)))),
    }
}

pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn list<'a>(rec: &Record, v: &'a Value, key: &str) -> Result<&'a Vec<Value>> {
    v.as_array().ok_or_else(|| err(rec, format!("field `{key}` must be a list, found {}", kind(v))))
}

pub(crate) fn flag(rec: &Record, obj: &Value, key: &str) -> Result<Option<bool>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(err(rec, format!("field `{key}` must be a bool, found {}", kind(other)))),
    }
}

/// `rec` as `format` reads it.
pub fn parse(rec: &Record, format: Format, f: &FieldMap) -> Result<Item> {
    if !rec.value.is_object() {
        return Err(err(rec, format!("a record must be a JSON object, found {}", kind(&rec.value))));
    }
    let v = &rec.value;
    match format {
        Format::Preference | Format::Kto | Format::Prompt => Err(err(rec, format!(
            "format `{}` is read by the preference and RL trainers (rl = \"dpo\", \"kto\", \"grpo\", …), not as supervised examples",
            match format {
                Format::Kto => "kto",
                Format::Prompt => "prompt",
                _ => "preference",
            }
        ))),
        Format::Chat => {
            let key = f.get("messages");
            let msgs = list(rec, field(rec, v, key, "the list of messages")?, key)?;
            let mut turns = Vec::with_capacity(msgs.len());
            for (i, m) in msgs.iter().enumerate() {
                let (rk, ck) = (f.get("role"), f.get("content"));
                let role = field(rec, m, rk, "message role").map_err(|e| at_msg(e, i))?;
                let role = role.as_str().ok_or_else(|| err(rec, format!("message {i}: field `{rk}` must be a string")))?;
                let content = match m.get(ck) {
                    Some(c) if !c.is_null() => text(rec, c, ck).map_err(|e| at_msg(e, i))?,
                    // A message without content is allowed only where a template may not need it.
                    _ if role != "assistant" => String::new(),
                    _ => return Err(err(rec, format!("message {i}: missing field `{ck}` (assistant content)"))),
                };
                let train = flag(rec, m, f.get("train")).map_err(|e| at_msg(e, i))?;
                turns.push(Turn { message: ChatMessage::new(role, content), train });
            }
            check_conversation(rec, &turns, rk_name(f))?;
            Ok(Item::Conversation { turns, alpaca: false })
        }
        Format::ShareGpt => {
            let key = f.get("conversations");
            let msgs = list(rec, field(rec, v, key, "the list of turns")?, key)?;
            let mut turns = Vec::with_capacity(msgs.len());
            for (i, m) in msgs.iter().enumerate() {
                let (fk, vk) = (f.get("from"), f.get("value"));
                let from = field(rec, m, fk, "who speaks").map_err(|e| at_msg(e, i))?;
                let from = from.as_str().ok_or_else(|| err(rec, format!("message {i}: field `{fk}` must be a string")))?;
                let role = f.sharegpt_role(from).ok_or_else(|| {
                    err(rec, format!("message {i}: unknown role `{from}` in field `{fk}` (map it with fields.role_map)"))
                })?;
                let value = text(rec, field(rec, m, vk, "message text").map_err(|e| at_msg(e, i))?, vk).map_err(|e| at_msg(e, i))?;
                let train = flag(rec, m, f.get("train")).map_err(|e| at_msg(e, i))?;
                turns.push(Turn { message: ChatMessage::new(role, value), train });
            }
            check_conversation(rec, &turns, f.get("from"))?;
            Ok(Item::Conversation { turns, alpaca: false })
        }
        Format::Alpaca => {
            let ik = f.get("instruction");
            let instruction = text(rec, field(rec, v, ik, "the instruction")?, ik)?;
            let inp = match v.get(f.get("input")) {
                Some(x) if !x.is_null() => text(rec, x, f.get("input"))?,
                _ => String::new(),
            };
            let ok = f.get("output");
            let output = text(rec, field(rec, v, ok, "the response")?, ok)?;
            let mut turns = Vec::new();
            if let Some(s) = v.get(f.get("system")).filter(|s| !s.is_null()) {
                turns.push(Turn { message: ChatMessage::new("system", text(rec, s, f.get("system"))?), train: None });
            }
            let prompt = if inp.is_empty() { instruction } else { format!("{instruction}\n\n{inp}") };
            turns.push(Turn { message: ChatMessage::new("user", prompt), train: None });
            turns.push(Turn { message: ChatMessage::new("assistant", output), train: None });
            check_conversation(rec, &turns, ok)?;
            Ok(Item::Conversation { turns, alpaca: true })
        }
        Format::Completion => {
            let k = f.get("text");
            Ok(Item::Text(text(rec, field(rec, v, k, "the text")?, k)?))
        }
        Format::InputOutput => {
            let k = f.get("segments");
            let segs = list(rec, field(rec, v, k, "the list of segments")?, k)?;
            let mut out = Vec::with_capacity(segs.len());
            for (i, s) in segs.iter().enumerate() {
                let (tk, lk) = (f.get("text"), f.get("label"));
                let t = text(rec, field(rec, s, tk, "segment text").map_err(|e| at_seg(e, i))?, tk).map_err(|e| at_seg(e, i))?;
                let train = flag(rec, s, lk).map_err(|e| at_seg(e, i))?.ok_or_else(|| err(rec, format!("segment {i}: missing field `{lk}` (bool: train on this text)")))?;
                out.push(Segment { text: t, train });
            }
            Ok(Item::Segments(out))
        }
        Format::Tokenized => {
            let k = f.get("input_ids");
            let ids = list(rec, field(rec, v, k, "token ids")?, k)?;
            let input_ids = ids
                .iter()
                .enumerate()
                .map(|(i, x)| x.as_u64().and_then(|x| u32::try_from(x).ok()).ok_or_else(|| err(rec, format!("field `{k}`[{i}]: not a token id: {x}"))))
                .collect::<Result<Vec<u32>>>()?;
            let lk = f.get("labels");
            let labels = match v.get(lk) {
                None | Some(Value::Null) => None,
                Some(l) => {
                    let l = list(rec, l, lk)?;
                    if l.len() != input_ids.len() {
                        return Err(err(rec, format!("field `{lk}` has {} entries but `{k}` has {}", l.len(), input_ids.len())));
                    }
                    Some(
                        l.iter()
                            .enumerate()
                            .map(|(i, x)| x.as_i64().ok_or_else(|| err(rec, format!("field `{lk}`[{i}]: not an integer: {x}"))))
                            .collect::<Result<Vec<i64>>>()?,
                    )
                }
            };
            Ok(Item::Tokens { input_ids, labels })
        }
    }
}

fn rk_name(f: &FieldMap) -> &str {
    f.get("role")
}

fn at_msg(e: Error, i: usize) -> Error {
    prefix(e, &format!("message {i}: "))
}

fn at_seg(e: Error, i: usize) -> Error {
    prefix(e, &format!("segment {i}: "))
}

/// Inserts `p` after the `file:line: ` of an Input error.
fn prefix(e: Error, p: &str) -> Error {
    match e {
        Error::Input(m) => match m.split_once(": ") {
            Some((src, rest)) => Error::Input(format!("{src}: {p}{rest}")),
            None => Error::Input(format!("{p}{m}")),
        },
        other => other,
    }
}

/// Known roles only, at least one message, no empty assistant turn.
pub(crate) fn check_conversation(rec: &Record, turns: &[Turn], role_key: &str) -> Result<()> {
    if turns.is_empty() {
        return Err(err(rec, "the conversation has no messages"));
    }
    for (i, t) in turns.iter().enumerate() {
        if !KNOWN_ROLES.contains(&t.message.role.as_str()) {
            return Err(err(rec, format!("message {i}: unknown role `{}` in field `{role_key}` (known: {})", t.message.role, KNOWN_ROLES.join(", "))));
        }
        if t.message.role == "assistant" && t.message.content.trim().is_empty() {
            return Err(err(rec, format!("message {i}: empty assistant turn")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(v: Value) -> Record {
        Record { source: "d.jsonl:7".into(), value: v }
    }

    #[test]
    fn errors_name_the_line_the_message_and_the_key() {
        let f = FieldMap::default();
        let e = parse(&rec(serde_json::json!({"messages": [{"role": "bot", "content": "x"}]})), Format::Chat, &f).unwrap_err();
        assert_eq!(e.to_string(), "d.jsonl:7: message 0: unknown role `bot` in field `role` (known: system, user, assistant, tool)");
        let e = parse(&rec(serde_json::json!({"messages": [{"content": "x"}]})), Format::Chat, &f).unwrap_err();
        assert_eq!(e.to_string(), "d.jsonl:7: message 0: missing field `role` (message role)");
        let e = parse(&rec(serde_json::json!({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": " "}]})), Format::ShareGpt, &f).unwrap_err();
        assert_eq!(e.to_string(), "d.jsonl:7: message 1: empty assistant turn");
        let e = parse(&rec(serde_json::json!({"instruction": "x"})), Format::Alpaca, &f).unwrap_err();
        assert_eq!(e.to_string(), "d.jsonl:7: missing field `output` (the response)");
    }

    #[test]
    fn sharegpt_roles_map_through_the_overridable_table() {
        let mut f = FieldMap::default();
        f.role_map.insert("bot".into(), "assistant".into());
        let it = parse(&rec(serde_json::json!({"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]})), Format::ShareGpt, &f).unwrap();
        let Item::Conversation { turns, .. } = it else { panic!() };
        assert_eq!(turns[1].message, ChatMessage::new("assistant", "yo"));
    }
}
