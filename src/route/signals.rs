//! The request's measurable features, read in one pass over a chat body: sizes and counts,
//! structural features (tools, JSON schema, images, audio), and text features of the last user
//! message (code, math, reasoning and simple cues, numbered steps, questions). Keyword lists
//! are compiled once, with the other detectors, into one case-insensitive regex when the config
//! loads.

use regex::Regex;
use serde::Serialize;
use serde_json::Value;

use crate::meter::prompt::{ChatRequest, FieldRef};

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Signals {
    pub prompt_tokens: u64,
    pub messages: u64,
    /// User messages: how many times the human spoke.
    pub turns: u64,
    pub system_chars: u64,
    pub last_user_chars: u64,
    pub max_output_tokens: Option<u64>,
    pub has_tools: bool,
    pub has_json_schema: bool,
    pub has_images: bool,
    pub has_audio: bool,
    pub has_code: bool,
    pub has_math: bool,
    pub reasoning_cues: u64,
    pub simple_cues: u64,
    pub numbered_steps: u64,
    pub questions: u64,
    pub score: f64,
}

/// The text detectors, compiled into one regex so that a long prompt is scanned once: the cost
/// of a decision is dominated by bytes scanned, and five separate passes took five times as long.
/// Each alternative is a named group; a match counts for the first group (in this order) that
/// matched, and keyword hits are also tried against the math alternative because the default
/// lists share words such as "theorem" and "probability".
#[derive(Debug)]
pub struct Detectors {
    combined: Regex,
    math: Regex,
}

const CODE: &str = r"(?m:```|^\s*(?:def |class |fn |pub fn |func |function |import |from \S+ import|#include|public |private |SELECT |INSERT |UPDATE |CREATE TABLE|for \(|while \(|if \(|return |const |let |var |package |struct |impl |async |await )|[;{}]\s*$|=>|::|\w+\([^)]*\)\s*[{:])";
const MATH: &str = r"(?i:\\frac|\\sum|\\int|\\sqrt|[∑∫√∞≤≥≠∂∇πθ]|\b\d+\s*[\^*/]\s*\d+|\b[a-z]\s*\^\s*\d|\b\d*[a-z]\s*[+\-=]\s*\d+\s*[=<>]|\bmod \d+|\b(?:integral|derivative|eigenvalue|matrix|theorem|lemma|polynomial|probability|equation)s?\b)";
/// Consumes only the marker and one blank, so the step's first word is still seen as a cue.
const STEPS: &str = r"(?m:^[ \t]*(?:\d+[.)]|[-*•]|step \d+)[ \t])";

fn keyword_alternation(words: &[String]) -> String {
    if words.is_empty() {
        return r"[^\s\S]".to_owned();
    }
    let alternation: Vec<String> = words.iter().map(|w| regex::escape(w.trim())).collect();
    format!(r"(?i:\b(?:{})\b)", alternation.join("|"))
}

impl Detectors {
    pub fn new(reasoning: &[String], simple: &[String]) -> Result<Detectors, regex::Error> {
        let combined = format!(
            "(?P<reasoning>{})|(?P<simple>{})|(?P<code>{CODE})|(?P<math>{MATH})|(?P<steps>{STEPS})",
            keyword_alternation(reasoning),
            keyword_alternation(simple),
        );
        Ok(Detectors {
            combined: Regex::new(&combined)?,
            math: Regex::new(MATH)?,
        })
    }

    fn scan(&self, text: &str, signals: &mut Signals) {
        let mut code_hits = 0;
        for found in self.combined.captures_iter(text) {
            let keyword = if found.name("reasoning").is_some() {
                signals.reasoning_cues += 1;
                found.get(0)
            } else if found.name("simple").is_some() {
                signals.simple_cues += 1;
                found.get(0)
            } else if found.name("code").is_some() {
                code_hits += 1;
                None
            } else if found.name("math").is_some() {
                signals.has_math = true;
                None
            } else {
                signals.numbered_steps += 1;
                None
            };
            if let Some(word) = keyword.filter(|_| !signals.has_math) {
                signals.has_math = self.math.is_match(word.as_str());
            }
        }
        signals.has_code |= code_hits >= 2;
    }
}

/// How much of the last user message the text detectors and rule patterns read: all of a
/// normal prompt; of a larger one, its first and last halves of this, so a prompt of
/// megabytes costs a routing decision what 64 KiB does (the regex scan runs at about 1 µs per
/// 2 bytes of mixed text, on the serving lane).
pub const SCANNED_BYTES: usize = 64 * 1024;

/// The parts of `text` the detectors read within `budget` bytes: all of it if it fits, else
/// its head and tail, cut at character boundaries.
pub fn scanned(text: &str, budget: usize) -> [&str; 2] {
    if text.len() <= budget {
        return [text, ""];
    }
    let mut head = budget / 2;
    while !text.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = text.len() - budget / 2;
    while !text.is_char_boundary(tail) {
        tail += 1;
    }
    [&text[..head], &text[tail..]]
}

/// Text of a message's `content`: a string, or the text parts of an array.
fn content_text(content: &FieldRef<'_>, mut visit: impl FnMut(&str)) {
    match content {
        FieldRef::Text(text) => visit(text),
        FieldRef::Tree(Value::Array(parts)) => {
            for part in parts {
                if let Some(text) = part["text"].as_str() {
                    visit(text);
                }
            }
        }
        FieldRef::Tree(_) => {}
    }
}

fn has_part(content: &FieldRef<'_>, kinds: &[&str]) -> bool {
    content
        .tree()
        .and_then(Value::as_array)
        .is_some_and(|parts| {
            parts.iter().any(|part| {
                part["type"]
                    .as_str()
                    .is_some_and(|kind| kinds.contains(&kind))
            })
        })
}

/// Measures a chat body. `prompt_tokens` comes from the tokenizer, counted once per request.
pub fn measure(body: &impl ChatRequest, prompt_tokens: u64, detectors: &Detectors) -> Signals {
    let member = |name: &str| body.member(name).unwrap_or(&Value::Null);
    let mut signals = Signals {
        prompt_tokens,
        max_output_tokens: member("max_completion_tokens")
            .as_u64()
            .or_else(|| member("max_tokens").as_u64()),
        has_tools: member("tools").as_array().is_some_and(|t| !t.is_empty())
            || member("functions")
                .as_array()
                .is_some_and(|f| !f.is_empty()),
        has_json_schema: member("response_format")["type"] == "json_schema",
        ..Signals::default()
    };
    let mut last_user: Option<FieldRef<'_>> = None;
    for message in body.messages().into_iter().flatten() {
        signals.messages += 1;
        let (role, content) = role_and_content(message);
        signals.has_images |= has_part(&content, &["image_url", "input_image"]);
        signals.has_audio |= has_part(&content, &["input_audio", "audio"]);
        match role {
            Some("system") | Some("developer") => {
                content_text(&content, |text| signals.system_chars += text.len() as u64);
            }
            Some("user") => {
                signals.turns += 1;
                last_user = Some(content);
            }
            _ => {}
        }
    }
    if let Some(Value::String(prompt)) = body.member("prompt") {
        last_user = Some(FieldRef::Text(prompt));
    }
    if let Some(content) = last_user {
        let mut budget = SCANNED_BYTES;
        content_text(&content, |text| {
            signals.last_user_chars += text.len() as u64;
            signals.questions += text.matches('?').count() as u64;
            for piece in scanned(text, budget) {
                detectors.scan(piece, &mut signals);
            }
            budget = budget.saturating_sub(text.len());
        });
    }
    signals
}

/// A message's role when it is a string, and its content (null when it has none or is not
/// an object).
pub fn role_and_content<'v>(
    fields: Option<impl Iterator<Item = (&'v str, FieldRef<'v>)>>,
) -> (Option<&'v str>, FieldRef<'v>) {
    let mut role = None;
    let mut content = FieldRef::Tree(&Value::Null);
    for (name, field) in fields.into_iter().flatten() {
        match (name, field) {
            ("role", FieldRef::Text(text)) => role = Some(text),
            ("role", FieldRef::Tree(_)) => role = None,
            ("content", field) => content = field,
            _ => {}
        }
    }
    (role, content)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn words(list: &[&str]) -> Vec<String> {
        list.iter().map(|w| (*w).to_owned()).collect()
    }

    #[test]
    fn one_pass_counts_every_detector() {
        let detectors = Detectors::new(&words(&["prove", "theorem"]), &words(&["hi"])).unwrap();
        let body = json!({
            "max_tokens": 50,
            "tools": [{"type": "function"}],
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hi"},
                {"role": "user", "content": [
                    {"type": "text", "text": "Hi! Two tasks?\n1. Prove the theorem.\n2. Fix:\nfn main() {\n    run();\n}\n"},
                    {"type": "image_url", "image_url": {"url": "data:,"}}
                ]}
            ]
        });
        let signals = measure(&body, 42, &detectors);
        assert_eq!(
            signals,
            Signals {
                prompt_tokens: 42,
                messages: 3,
                turns: 2,
                system_chars: 9,
                last_user_chars: 70,
                max_output_tokens: Some(50),
                has_tools: true,
                has_images: true,
                has_code: true,
                // "theorem" is a reasoning keyword and a math word: it counts for both.
                has_math: true,
                reasoning_cues: 2,
                simple_cues: 1,
                numbered_steps: 2,
                questions: 1,
                ..Signals::default()
            }
        );
    }

    /// Hostile input: a 6 MiB prompt to `auto` used to be scanned whole on the serving lane
    /// (about 11 s); its head and tail are read now, the rest only counted.
    #[test]
    fn a_huge_prompt_is_scanned_at_its_head_and_tail() {
        let detectors = Detectors::new(&words(&["prove"]), &words(&["hi"])).unwrap();
        let filler = "plain words, nothing to see here é ".repeat(6 * 1024 * 1024 / 36);
        let text =
            format!("Prove it. {filler} Step? theorem {filler}\nfn main() {{\n    run();\n}}\n");
        let body = serde_json::json!({"messages": [{"role": "user", "content": text}]});
        let signals = measure(&body, 1, &detectors);
        assert_eq!(signals.last_user_chars, text.len() as u64);
        assert_eq!(signals.questions, 1, "counting `?` reads everything");
        assert_eq!(signals.reasoning_cues, 1, "the head is read");
        assert!(signals.has_code, "the tail is read");
        assert!(!signals.has_math, "the middle is not");
        let [head, tail] = scanned(&text, SCANNED_BYTES);
        assert!(head.len() + tail.len() <= SCANNED_BYTES);
    }
}
