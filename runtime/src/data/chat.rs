//! A conversation rendered with its chat template, and the byte ranges of the rendered text that
//! carry loss.
//!
//! transformers marks assistant text only for templates written with `{% generation %}`; most
//! are not. We find each trained message's text by rendering prefixes of the conversation:
//!
//! ```text
//! full    = render(messages,        add_generation_prompt = false)
//! before  = render(messages[..k],   add_generation_prompt = role_k == "assistant")
//! through = render(messages[..=k],  add_generation_prompt = false)
//! trained = full[len(before) .. len(through)], trailing whitespace left out
//! ```
//!
//! so an assistant turn is trained from just after its header (`<|im_start|>assistant\n`, which
//! the generation prompt is) through its end-of-turn token (`<|im_end|>`, `<|eot_id|>`, `</s>`),
//! and the newline some templates print after that token is not.
//!
//! Some templates render a message differently once later messages follow it (Qwen3 drops the
//! `<think>` block of earlier assistant turns), so `through` is not a prefix of `full`. Then the
//! message's text is searched for in `full` after the previous trained range (after its
//! `</think>` if the whole text is not found), and the range runs from the end of `before` (when
//! that is a prefix, else from the found text) through the end-of-turn marker that follows it
//! (the EOS token or a known one), if only whitespace separates them. A message that cannot be
//! found is an error rather than a guess.

use std::ops::Range;

use super::format::Turn;
use super::TrainOn;
use crate::chat_template::{render_chat, ChatMessage};
use crate::error::{Error, Result};

/// End-of-turn markers of common templates, tried after the tokenizer's EOS token.
pub const END_OF_TURN_MARKERS: [&str; 7] = ["<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>"];

/// A rendered conversation and the byte ranges of `text` that are trained.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    pub trained: Vec<Range<usize>>,
}

/// `template` with transformers' `{% generation %}` / `{% endgeneration %}` tags turned into a
/// block that always renders (keeping their whitespace control), so such templates render here
/// too; the masks come from prefix rendering either way.
pub fn prepare_template(template: &str) -> String {
    let re = regex::Regex::new(r"\{%(-?)\s*(end)?generation\s*(-?)%\}").expect("static regex");
    re.replace_all(template, |c: &regex::Captures| {
        let kw = if c.get(2).is_some() { "endif" } else { "if true" };
        format!("{{%{} {kw} {}%}}", &c[1], &c[3])
    })
    .into_owned()
}

/// Which messages carry loss under `train_on` (ignored for `All`, which trains the whole text).
pub fn trained_messages(turns: &[Turn], train_on: TrainOn) -> Vec<bool> {
    let last_assistant = turns.iter().rposition(|t| t.message.role == "assistant");
    turns
        .iter()
        .enumerate()
        .map(|(i, t)| match train_on {
            TrainOn::All => true,
            TrainOn::Assistant => t.message.role == "assistant",
            TrainOn::LastTurn => Some(i) == last_assistant,
            TrainOn::PerMessage => t.train.unwrap_or(t.message.role == "assistant"),
        })
        .collect()
}

/// Renders `turns` with `template` and finds the trained byte ranges.
pub fn render_trained(template: &str, turns: &[Turn], train_on: TrainOn, bos: Option<&str>, eos: Option<&str>) -> Result<Rendered> {
    let msgs: Vec<ChatMessage> = turns.iter().map(|t| t.message.clone()).collect();
    let render = |m: &[ChatMessage], gen: bool| render_chat(template, m, gen, bos, eos);
    let text = render(&msgs, false)?;
    if train_on == TrainOn::All {
        let n = text.len();
        return Ok(Rendered { text, trained: vec![0..n] });
    }
    let mut markers: Vec<&str> = eos.into_iter().collect();
    markers.extend(END_OF_TURN_MARKERS.iter().filter(|m| Some(**m) != eos));
    let mut trained = Vec::new();
    let mut cursor = 0usize;
    for (k, train) in trained_messages(turns, train_on).into_iter().enumerate() {
        if !train {
            continue;
        }
        let before = render(&msgs[..k], msgs[k].role == "assistant").ok().filter(|b| text.starts_with(b.as_str()) && b.len() >= cursor);
        let through = render(&msgs[..=k], false).ok().filter(|t| text.starts_with(t.as_str()));
        let range = match (&before, &through) {
            (Some(b), Some(t)) if t.len() >= b.len() => b.len()..b.len() + t[b.len()..].trim_end().len(),
            _ => locate(&text, &msgs[k].content, before.as_ref().map(|b| b.len()), cursor, &markers)
                .ok_or_else(|| Error::Input(format!("message {k} ({}): its text is not found in the rendered conversation, so its loss mask cannot be computed", msgs[k].role)))?,
        };
        // A trained non-assistant message starts at its own text, not at its role header.
        let range = match msgs[k].role.as_str() {
            "assistant" => range,
            _ => match text[range.clone()].find(msgs[k].content.trim()).filter(|_| !msgs[k].content.trim().is_empty()) {
                Some(i) => range.start + i..range.end,
                None => range,
            },
        };
        cursor = range.end;
        if !range.is_empty() {
            trained.push(range);
        }
    }
    Ok(Rendered { text, trained })
}

/// The fallback: `content` (or its part after `</think>`) found in `text` at or after `from`,
/// extended back to `start` and forward over a following end-of-turn marker.
fn locate(text: &str, content: &str, start: Option<usize>, cursor: usize, markers: &[&str]) -> Option<Range<usize>> {
    let from = start.unwrap_or(cursor).max(cursor);
    let mut needles = vec![content.trim()];
    if let Some((_, after)) = content.rsplit_once("</think>") {
        needles.push(after.trim());
    }
    let (found, needle) = needles.iter().filter(|n| !n.is_empty()).find_map(|n| text[from..].find(n).map(|i| (from + i, *n)))?;
    let mut end = found + needle.len();
    let rest = &text[end..];
    let ws = rest.len() - rest.trim_start().len();
    if let Some(m) = markers.iter().find(|m| rest[ws..].starts_with(*m)) {
        end += ws + m.len();
    }
    Some(start.filter(|s| *s <= found).unwrap_or(found)..end)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    fn turns(x: &[(&str, &str)]) -> Vec<Turn> {
        x.iter().map(|(r, c)| Turn { message: ChatMessage::new(*r, *c), train: None }).collect()
    }

    fn pieces(r: &Rendered) -> Vec<&str> {
        r.trained.iter().map(|s| &r.text[s.clone()]).collect()
    }

    #[test]
    fn assistant_turns_are_trained_through_their_end_of_turn_token() {
        let t = turns(&[("user", "hi"), ("assistant", "hello"), ("user", "more"), ("assistant", "sure")]);
        let r = render_trained(CHATML, &t, TrainOn::Assistant, None, None).unwrap();
        assert_eq!(pieces(&r), ["hello<|im_end|>", "sure<|im_end|>"]);
        let r = render_trained(CHATML, &t, TrainOn::LastTurn, None, None).unwrap();
        assert_eq!(pieces(&r), ["sure<|im_end|>"]);
    }

    #[test]
    fn a_template_that_rewrites_earlier_turns_falls_back_to_search() {
        // Like Qwen3: an assistant turn before the last user message loses its <think> block.
        let tpl = "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and not loop.last %}{{ m.content.split('</think>')[-1].lstrip() }}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let t = turns(&[("user", "a"), ("assistant", "<think>x</think>\nB"), ("user", "c"), ("assistant", "D")]);
        let r = render_trained(tpl, &t, TrainOn::Assistant, None, None).unwrap();
        assert_eq!(pieces(&r), ["B<|im_end|>", "D<|im_end|>"]);
    }

    #[test]
    fn generation_tags_become_plain_blocks() {
        assert_eq!(prepare_template("a{%- generation %}b{% endgeneration -%}c"), "a{%- if true %}b{% endif -%}c");
    }
}
