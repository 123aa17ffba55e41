//! Rendering Hugging Face chat templates (Jinja) the way transformers' `apply_chat_template`
//! does, with `tokenize=False`.
//!
//! transformers compiles templates in a sandboxed Jinja2 environment with `trim_blocks` and
//! `lstrip_blocks`, the `loopcontrols` extension, a `tojson` filter that is Python's `json.dumps`
//! (no HTML escaping, `ensure_ascii=False`), and the globals `raise_exception` and
//! `strftime_now`. This module reproduces that on minijinja: Python string, dict and list methods
//! come from `minijinja_contrib::pycompat`, and printed values are formatted as Python would
//! (`True`, `None`, `['a', 1]`).
//!
//! Known differences from Jinja2: booleans concatenated with `~` print as `true`/`false`;
//! `strftime_now` uses UTC rather than the local time zone; transformers' `{% generation %}`
//! tag is not supported.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, ErrorKind, Output, State};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// Renders a Hugging Face Jinja chat template as transformers' `apply_chat_template(...,
/// tokenize=False)` would. The template sees `messages` (a list of `{role, content}` maps),
/// `add_generation_prompt`, and `bos_token` / `eos_token` when given (undefined otherwise).
///
/// Errors (`Error::Input`) carry minijinja's message; a template calling
/// `raise_exception("...")` fails with that message.
pub fn render_chat(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Result<String> {
    let env = environment();
    let tmpl = env
        .template_from_named_str("chat_template", template)
        .map_err(|e| Error::Input(format!("chat template does not compile: {e}")))?;
    let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
    ctx.insert("messages", Value::from_serialize(messages));
    ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
    if let Some(b) = bos_token {
        ctx.insert("bos_token", Value::from(b));
    }
    if let Some(e) = eos_token {
        ctx.insert("eos_token", Value::from(e));
    }
    tmpl.render(ctx).map_err(|e| Error::Input(format!("chat template failed: {e}")))
}

/// The environment transformers uses, rebuilt on minijinja.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_formatter(python_formatter);
    env.add_filter("tojson", tojson);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env
}

fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// Prints values as Jinja2 does (`str()` of the Python value): `True`, `None`, Python reprs
/// inside lists and dicts. Undefined prints as nothing; strings and numbers as minijinja does.
fn python_formatter(
    out: &mut Output,
    state: &State,
    value: &Value,
) -> std::result::Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::Bool | ValueKind::None | ValueKind::Seq | ValueKind::Map => {
            let mut s = String::new();
            python_repr(value, &mut s)?;
            out.write_str(&s).map_err(|_| minijinja::Error::from(ErrorKind::WriteFailure))
        }
        ValueKind::Number if !value.is_integer() => {
            let s = f64::try_from(value.clone()).map(python_float).unwrap_or_default();
            out.write_str(&s).map_err(|_| minijinja::Error::from(ErrorKind::WriteFailure))
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

/// Python's `repr` of a value (for printing containers).
fn python_repr(value: &Value, out: &mut String) -> std::result::Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number => {
            if value.is_integer() {
                let _ = write!(out, "{value}");
            } else {
                out.push_str(&python_float(f64::try_from(value.clone())?));
            }
        }
        ValueKind::String => {
            let s = value.as_str().unwrap_or_default();
            let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
            out.push(quote);
            for c in s.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    c if c == quote => {
                        out.push('\\');
                        out.push(c);
                    }
                    c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                        let _ = write!(out, "\\x{:02x}", c as u32);
                    }
                    c => out.push(c),
                }
            }
            out.push(quote);
        }
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            for (i, item) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_repr(&item, out)?;
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, key) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_repr(&key, out)?;
                out.push_str(": ");
                python_repr(&value.get_item(&key)?, out)?;
            }
            out.push('}');
        }
        _ => {
            let _ = write!(out, "{value}");
        }
    }
    Ok(())
}

/// Python's `repr(float)`: shortest round-trip digits, exponent form outside 1e-4..1e16.
fn python_float(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf".into() } else { "-inf".into() };
    }
    let e = format!("{x:e}"); // e.g. "-2.5e-7", shortest round-trip digits
    let (mant, exp) = e.split_once('e').unwrap_or((&e, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mant) = mant.strip_prefix('-').map_or(("", mant), |m| ("-", m));
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let body = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if point as usize >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
        };
        format!("{sign}{body}")
    } else {
        let m = if digits.len() > 1 { format!("{}.{}", &digits[..1], &digits[1..]) } else { digits };
        format!("{sign}{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    }
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) if v.is_integer() => Some(" ".repeat(v.as_usize().unwrap_or(0))),
        Some(v) if v.kind() == ValueKind::String => Some(v.as_str().unwrap_or("").to_string()),
        Some(v) => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: indent must be an integer or a string, not {v}"),
            ))
        }
    };
    let (item_sep, key_sep) = match separators {
        Some(s) if !s.is_none() => {
            let parts: Vec<Value> = s.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] if a.as_str().is_some() && b.as_str().is_some() => {
                    (a.as_str().unwrap_or(",").to_string(), b.as_str().unwrap_or(":").to_string())
                }
                _ => {
                    return Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair of strings",
                    ))
                }
            }
        }
        // Python's defaults: (", ", ": ") without indent, (",", ": ") with it.
        _ => (if indent.is_some() { "," } else { ", " }.to_string(), ": ".to_string()),
    };
    let opts = JsonOpts {
        ensure_ascii: ensure_ascii.unwrap_or(false),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    write_json(&value, &opts, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

struct JsonOpts {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

fn json_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn write_json(
    value: &Value,
    o: &JsonOpts,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(ind) = &o.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if value.is_integer() {
                let _ = write!(out, "{value}");
            } else {
                let x = f64::try_from(value.clone())?;
                out.push_str(&match python_float(x).as_str() {
                    "nan" => "NaN".to_string(),
                    "inf" => "Infinity".to_string(),
                    "-inf" => "-Infinity".to_string(),
                    s => s.to_string(),
                });
            }
        }
        ValueKind::String => json_string(value.as_str().unwrap_or_default(), o.ensure_ascii, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, depth + 1);
                write_json(item, o, depth + 1, out)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if o.sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, depth + 1);
                // JSON keys are strings; Python converts numbers, bools and None.
                let k = match key.kind() {
                    ValueKind::String => key.as_str().unwrap_or_default().to_string(),
                    ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_string(),
                    ValueKind::None => "null".to_string(),
                    _ => key.to_string(),
                };
                json_string(&k, o.ensure_ascii, out);
                out.push_str(&o.key_sep);
                write_json(&value.get_item(key)?, o, depth + 1, out)?;
            }
            newline(out, depth);
            out.push('}');
        }
        other => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot serialise a value of kind {other:?}"),
            ))
        }
    }
    Ok(())
}

/// `strftime_now(format)`: the current UTC time formatted with C `strftime` codes
/// (`%Y %m %d %H %M %S %y %b %B %a %A %j %e %p %I %F %T %D %%`; others are copied verbatim).
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime_utc(&format, secs)
}

const MONTHS: [&str; 12] = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
];
const WEEKDAYS: [&str; 7] =
    ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];

/// Formats the Unix time `secs` (UTC).
fn strftime_utc(format: &str, secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (hour, minute, second) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_mar = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_mar + 2) / 153;
    let day = doy_mar - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    const CUM: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUM[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let _ = match chars.next() {
            Some('Y') => write!(out, "{year}"),
            Some('y') => write!(out, "{:02}", year.rem_euclid(100)),
            Some('m') => write!(out, "{month:02}"),
            Some('d') => write!(out, "{day:02}"),
            Some('e') => write!(out, "{day:>2}"),
            Some('H') => write!(out, "{hour:02}"),
            Some('I') => write!(out, "{hour12:02}"),
            Some('M') => write!(out, "{minute:02}"),
            Some('S') => write!(out, "{second:02}"),
            Some('p') => write!(out, "{}", if hour < 12 { "AM" } else { "PM" }),
            Some('j') => write!(out, "{yday:03}"),
            Some('B') => write!(out, "{}", MONTHS[(month - 1) as usize]),
            Some('b') | Some('h') => write!(out, "{}", &MONTHS[(month - 1) as usize][..3]),
            Some('A') => write!(out, "{}", WEEKDAYS[weekday]),
            Some('a') => write!(out, "{}", &WEEKDAYS[weekday][..3]),
            Some('F') => write!(out, "{year}-{month:02}-{day:02}"),
            Some('T') => write!(out, "{hour:02}:{minute:02}:{second:02}"),
            Some('D') => write!(out, "{month:02}/{day:02}/{:02}", year.rem_euclid(100)),
            Some('%') => write!(out, "%"),
            Some(other) => write!(out, "%{other}"),
            None => write!(out, "%"),
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::gguf::GgufFile;

    fn conv1() -> Vec<ChatMessage> {
        vec![ChatMessage::new("user", "Hi")]
    }
    fn conv2() -> Vec<ChatMessage> {
        vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "What is 2+2?"),
            ChatMessage::new("assistant", "4"),
        ]
    }
    fn conv3() -> Vec<ChatMessage> {
        vec![
            ChatMessage::new("system", "  You are terse.  "),
            ChatMessage::new("user", "Hi there, \"friend\" <3"),
            ChatMessage::new("assistant", "Hello ü 日本"),
            ChatMessage::new("user", "How are you?"),
        ]
    }

    /// SmolLM2-135M-Instruct's template, as stored in the GGUF's `tokenizer.chat_template`.
    const SMOL: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// A ChatML template written over several lines, so that trim_blocks/lstrip_blocks matter.
    const CHATML: &str = "{% for message in messages %}\n{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' }}\n{% endfor %}\n{% if add_generation_prompt %}\n{{ '<|im_start|>assistant\\n' }}\n{% endif %}\n";

    /// Exercises namespace, continue, raise_exception, Python string methods, tojson options,
    /// Python-style printing of booleans, and whitespace control.
    const FEATURES: &str = "{{ bos_token }}{% set ns = namespace(sys='') %}\n{%- for m in messages %}\n  {%- if m.role == 'system' %}{% set ns.sys = m.content.strip() %}{% continue %}{% endif %}\n  {%- if m.role not in ['user', 'assistant'] %}{{ raise_exception('Unknown role: ' + m.role) }}{% endif %}\n  [{{ loop.index0 }}] {{ m.role.upper() }}: {{ m.content.split(' ') | length }} words {{ m.content | tojson }}\n    {% if m.content.startswith('Hi') %}\n    greeting!\n    {% endif %}\n{% endfor %}\nSYS={{ ns.sys | tojson }} {{ {'a': 1, 'b': [true, none, 2.5, -3], 'c': 'x<y>&\"\\'\\\\ é\\n\\t'} | tojson }}\n{{ messages | tojson(indent=2) }}\n{{ messages[0] | tojson(sort_keys=True) }} {{ ' pad '.lstrip() }}|{{ 'a,b'.split(',') | join('+') }}|{{ 'Title me'.title() }}|{{ 'x'.replace('x', 'y') }}|{{ messages[-1]['content'].endswith('?') }}|{{ (messages | length) > 1 }}\n{% if add_generation_prompt %}{{ eos_token }}{% endif %}\n";

    // Every expected string below was produced by transformers 5.24 (jinja2 3.1.6):
    // `tok.apply_chat_template(conv, chat_template=T, tokenize=False,
    //  add_generation_prompt=agp, bos_token="<s>", eos_token="</s>")`.
    const EXPECTED: &[(&str, &str, bool, &str)] = &[
        ("smol", "conv1", false, "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"),
        ("smol", "conv1", true, "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
        ("smol", "conv2", false, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"),
        ("smol", "conv2", true, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n<|im_start|>assistant\n"),
        ("smol", "conv3", false, "<|im_start|>system\n  You are terse.  <|im_end|>\n<|im_start|>user\nHi there, \"friend\" <3<|im_end|>\n<|im_start|>assistant\nHello ü 日本<|im_end|>\n<|im_start|>user\nHow are you?<|im_end|>\n"),
        ("smol", "conv3", true, "<|im_start|>system\n  You are terse.  <|im_end|>\n<|im_start|>user\nHi there, \"friend\" <3<|im_end|>\n<|im_start|>assistant\nHello ü 日本<|im_end|>\n<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n"),
        ("chatml", "conv1", false, "<|im_start|>user\nHi<|im_end|>\n\n"),
        ("chatml", "conv1", true, "<|im_start|>user\nHi<|im_end|>\n\n<|im_start|>assistant\n\n"),
        ("chatml", "conv2", false, "<|im_start|>system\nBe brief.<|im_end|>\n\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n\n<|im_start|>assistant\n4<|im_end|>\n\n"),
        ("chatml", "conv2", true, "<|im_start|>system\nBe brief.<|im_end|>\n\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n\n<|im_start|>assistant\n4<|im_end|>\n\n<|im_start|>assistant\n\n"),
        ("chatml", "conv3", false, "<|im_start|>system\nYou are terse.<|im_end|>\n\n<|im_start|>user\nHi there, \"friend\" <3<|im_end|>\n\n<|im_start|>assistant\nHello ü 日本<|im_end|>\n\n<|im_start|>user\nHow are you?<|im_end|>\n\n"),
        ("chatml", "conv3", true, "<|im_start|>system\nYou are terse.<|im_end|>\n\n<|im_start|>user\nHi there, \"friend\" <3<|im_end|>\n\n<|im_start|>assistant\nHello ü 日本<|im_end|>\n\n<|im_start|>user\nHow are you?<|im_end|>\n\n<|im_start|>assistant\n\n"),
        ("t3", "conv1", false, "<s>  [0] USER: 1 words \"Hi\"\n    greeting!\nSYS=\"\" {\"a\": 1, \"b\": [true, null, 2.5, -3], \"c\": \"x<y>&\\\"'\\\\ é\\n\\t\"}\n[\n  {\n    \"role\": \"user\",\n    \"content\": \"Hi\"\n  }\n]\n{\"content\": \"Hi\", \"role\": \"user\"} pad |a+b|Title Me|y|False|False\n"),
        ("t3", "conv1", true, "<s>  [0] USER: 1 words \"Hi\"\n    greeting!\nSYS=\"\" {\"a\": 1, \"b\": [true, null, 2.5, -3], \"c\": \"x<y>&\\\"'\\\\ é\\n\\t\"}\n[\n  {\n    \"role\": \"user\",\n    \"content\": \"Hi\"\n  }\n]\n{\"content\": \"Hi\", \"role\": \"user\"} pad |a+b|Title Me|y|False|False\n</s>"),
        ("t3", "conv2", false, "<s>  [1] USER: 3 words \"What is 2+2?\"\n  [2] ASSISTANT: 1 words \"4\"\nSYS=\"Be brief.\" {\"a\": 1, \"b\": [true, null, 2.5, -3], \"c\": \"x<y>&\\\"'\\\\ é\\n\\t\"}\n[\n  {\n    \"role\": \"system\",\n    \"content\": \"Be brief.\"\n  },\n  {\n    \"role\": \"user\",\n    \"content\": \"What is 2+2?\"\n  },\n  {\n    \"role\": \"assistant\",\n    \"content\": \"4\"\n  }\n]\n{\"content\": \"Be brief.\", \"role\": \"system\"} pad |a+b|Title Me|y|False|True\n"),
        ("t3", "conv2", true, "<s>  [1] USER: 3 words \"What is 2+2?\"\n  [2] ASSISTANT: 1 words \"4\"\nSYS=\"Be brief.\" {\"a\": 1, \"b\": [true, null, 2.5, -3], \"c\": \"x<y>&\\\"'\\\\ é\\n\\t\"}\n[\n  {\n    \"role\": \"system\",\n    \"content\": \"Be brief.\"\n  },\n  {\n    \"role\": \"user\",\n    \"content\": \"What is 2+2?\"\n  },\n  {\n    \"role\": \"assistant\",\n    \"content\": \"4\"\n  }\n]\n{\"content\": \"Be brief.\", \"role\": \"system\"} pad |a+b|Title Me|y|False|True\n</s>"),
        ("t3", "conv3", false, "<s>  [1] USER: 4 words \"Hi there, \\\"friend\\\" <3\"\n    greeting!\n  [2] ASSISTANT: 3 words \"Hello ü 日本\"\n  [3] USER: 3 words \"How are you?\"\nSYS=\"You are terse.\" {\"a\": 1, \"b\": [true, null, 2.5, -3], \"c\": \"x<y>&\\\"'\\\\ é\\n\\t\"}\n[\n  {\n    \"role\": \"system\",\n    \"content\": \"  You are terse.  \"\n  },\n  {\n    \"role\": \"user\",\n    \"content\": \"Hi there, \\\"friend\\\" <3\"\n  },\n  {\n    \"role\": \"assistant\",\n    \"content\": \"Hello ü 日本\"\n  },\n  {\n    \"role\": \"user\",\n    \"content\": \"How are you?\"\n  }\n]\n{\"content\": \"  You are terse.  \", \"role\": \"system\"} pad |a+b|Title Me|y|True|True\n"),
        ("t3", "conv3", true, "<s>  [1] USER: 4 words \"Hi there, \\\"friend\\\" <3\"\n    greeting!\n  [2] ASSISTANT: 3 words \"Hello ü 日本\"\n  [3] USER: 3 words \"How are you?\"\nSYS=\"You are terse.\" {\"a\": 1, \"b\": [true, null, 2.5, -3], \"c\": \"x<y>&\\\"'\\\\ é\\n\\t\"}\n[\n  {\n    \"role\": \"system\",\n    \"content\": \"  You are terse.  \"\n  },\n  {\n    \"role\": \"user\",\n    \"content\": \"Hi there, \\\"friend\\\" <3\"\n  },\n  {\n    \"role\": \"assistant\",\n    \"content\": \"Hello ü 日本\"\n  },\n  {\n    \"role\": \"user\",\n    \"content\": \"How are you?\"\n  }\n]\n{\"content\": \"  You are terse.  \", \"role\": \"system\"} pad |a+b|Title Me|y|True|True\n</s>"),
    ];

    #[test]
    fn matches_transformers() {
        for &(tname, cname, agp, want) in EXPECTED {
            let template = match tname {
                "smol" => SMOL,
                "chatml" => CHATML,
                _ => FEATURES,
            };
            let conv = match cname {
                "conv1" => conv1(),
                "conv2" => conv2(),
                _ => conv3(),
            };
            let got = render_chat(template, &conv, agp, Some("<s>"), Some("</s>")).unwrap();
            assert_eq!(got, want, "{tname}/{cname}/{agp}");
        }
    }

    #[test]
    fn raise_exception_is_an_error_with_the_message() {
        let e = render_chat(FEATURES, &[ChatMessage::new("tool", "x")], false, None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("Unknown role: tool"), "{e}");
        let e = render_chat("{% for %}", &conv1(), false, None, None).unwrap_err().to_string();
        assert!(e.contains("chat template"), "{e}");
    }

    #[test]
    fn missing_special_tokens_are_undefined() {
        let t = "[{{ bos_token }}]{% if eos_token is defined %}E{% endif %}";
        assert_eq!(render_chat(t, &[], false, None, None).unwrap(), "[]");
        assert_eq!(render_chat(t, &[], false, Some("<s>"), Some("</s>")).unwrap(), "[<s>]E");
    }

    #[test]
    fn python_printing_and_json_numbers() {
        let t = "{{ [1, 'a', \"b'c\", none, true, 2.0, {'k': false}] }} {{ 1.5 }} {{ 1e20 }} {{ 0.0001 }} {{ none }} {{ x }}|{{ {'z': 1e-7, 'y': 3.0} | tojson }}|{{ [1, 2] | tojson(separators=(',', ':')) }}|{{ 'é' | tojson(ensure_ascii=True) }}|{{ [] | tojson(indent=2) }}";
        // Checked against transformers' compiled Jinja2 environment (`_compile_jinja_template(t).render()`).
        assert_eq!(
            render_chat(t, &[], false, None, None).unwrap(),
            "[1, 'a', \"b'c\", None, True, 2.0, {'k': False}] 1.5 1e+20 0.0001 None |{\"z\": 1e-07, \"y\": 3.0}|[1,2]|\"\\u00e9\"|[]"
        );
        assert_eq!(python_float(123456789.0), "123456789.0");
        assert_eq!(python_float(1e16), "1e+16");
        assert_eq!(python_float(-2.5e-5), "-2.5e-05");
        assert_eq!(python_float(0.1), "0.1");
    }

    #[test]
    fn strftime() {
        // 2024-02-29 13:05:09 UTC was a Thursday, day 60 of the year.
        let t = 1_709_211_909;
        assert_eq!(
            strftime_utc("%Y-%m-%d %H:%M:%S %a %A %b %B %j %y %I%p %e %F %T %% %Q", t),
            "2024-02-29 13:05:09 Thu Thursday Feb February 060 24 01PM 29 2024-02-29 13:05:09 % %Q"
        );
        assert_eq!(strftime_utc("%d %B %Y", 0), "01 January 1970");
        let now = render_chat("{{ strftime_now('%Y') }}", &[], false, None, None).unwrap();
        assert!(now.len() == 4 && now.starts_with('2'), "{now}");
    }

    #[test]
    fn smollm2_template_from_gguf() {
        let p = crate::tokenizer::test_assets_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf");
        if !p.exists() {
            println!("skipping: {} is absent", p.display());
            return;
        }
        let g = GgufFile::open(&p).unwrap();
        let tpl = g.get_str("tokenizer.chat_template").unwrap();
        assert_eq!(tpl, SMOL);
        let got = render_chat(tpl, &conv1(), true, Some("<|im_start|>"), Some("<|im_end|>")).unwrap();
        assert_eq!(got, EXPECTED[1].3);
    }
}

/// Built-in chat templates by name, for models whose tokenizer carries none (or to override it):
/// `chatml` (`<|im_start|>role\n…<|im_end|>\n`), `llama3` (`<|start_header_id|>role<|end_header_id|>\n\n…<|eot_id|>`),
/// `mistral` (`[INST] … [/INST]…</s>`).
pub fn builtin_template(name: &str) -> Option<&'static str> {
    Some(match name {
        "chatml" => "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
        "llama3" => "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
        "mistral" => "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}{% else %}{{ raise_exception('mistral template: unknown role ' + message['role']) }}{% endif %}{% endfor %}",
        _ => return None,
    })
}
