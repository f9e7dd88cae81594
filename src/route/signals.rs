//! The request's measurable features, read in one pass over a chat body: sizes and counts,
//! structural features (tools, JSON schema, images, audio), and text features of the last user
//! message (code, math, reasoning and simple cues, numbered steps, questions). Keyword lists
//! are compiled once into case-insensitive word-bounded regexes when the config loads.

use regex::Regex;
use serde::Serialize;
use serde_json::Value;

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

/// Compiled text detectors.
#[derive(Debug)]
pub struct Detectors {
    pub reasoning: Regex,
    pub simple: Regex,
    code: Regex,
    math: Regex,
    steps: Regex,
}

fn keyword_regex(words: &[String]) -> Result<Regex, regex::Error> {
    if words.is_empty() {
        return Regex::new(r"[^\s\S]");
    }
    let alternation: Vec<String> = words.iter().map(|w| regex::escape(w.trim())).collect();
    Regex::new(&format!(r"(?i)\b(?:{})\b", alternation.join("|")))
}

impl Detectors {
    pub fn new(reasoning: &[String], simple: &[String]) -> Result<Detectors, regex::Error> {
        Ok(Detectors {
            reasoning: keyword_regex(reasoning)?,
            simple: keyword_regex(simple)?,
            code: Regex::new(
                r"(?m)```|^\s*(?:def |class |fn |pub fn |func |function |import |from \S+ import|#include|public |private |SELECT |INSERT |UPDATE |CREATE TABLE|for \(|while \(|if \(|return |const |let |var |package |struct |impl |async |await )|[;{}]\s*$|=>|::|\w+\([^)]*\)\s*[{:]",
            )?,
            math: Regex::new(
                r"(?i)\\frac|\\sum|\\int|\\sqrt|[∑∫√∞≤≥≠∂∇πθ]|\b\d+\s*[\^*/]\s*\d+|\b[a-z]\s*\^\s*\d|\b\d*[a-z]\s*[+\-=]\s*\d+\s*[=<>]|\bmod \d+|\b(?:integral|derivative|eigenvalue|matrix|theorem|lemma|polynomial|probability|equation)s?\b",
            )?,
            steps: Regex::new(r"(?m)^\s*(?:\d+[.)]|[-*•]|step \d+)\s+\S")?,
        })
    }
}

/// Text of a message's `content`: a string, or the text parts of an array.
fn content_text(content: &Value, mut visit: impl FnMut(&str)) {
    match content {
        Value::String(text) => visit(text),
        Value::Array(parts) => {
            for part in parts {
                if let Some(text) = part["text"].as_str() {
                    visit(text);
                }
            }
        }
        _ => {}
    }
}

fn has_part(content: &Value, kinds: &[&str]) -> bool {
    content.as_array().is_some_and(|parts| {
        parts.iter().any(|part| {
            part["type"]
                .as_str()
                .is_some_and(|kind| kinds.contains(&kind))
        })
    })
}

/// Measures a chat body. `prompt_tokens` comes from the tokenizer, counted once per request.
pub fn measure(body: &Value, prompt_tokens: u64, detectors: &Detectors) -> Signals {
    let mut signals = Signals {
        prompt_tokens,
        max_output_tokens: body["max_completion_tokens"]
            .as_u64()
            .or_else(|| body["max_tokens"].as_u64()),
        has_tools: body["tools"].as_array().is_some_and(|t| !t.is_empty())
            || body["functions"].as_array().is_some_and(|f| !f.is_empty()),
        has_json_schema: body["response_format"]["type"] == "json_schema",
        ..Signals::default()
    };
    let mut last_user: Option<&Value> = None;
    if let Some(messages) = body["messages"].as_array() {
        for message in messages {
            signals.messages += 1;
            let content = &message["content"];
            signals.has_images |= has_part(content, &["image_url", "input_image"]);
            signals.has_audio |= has_part(content, &["input_audio", "audio"]);
            match message["role"].as_str() {
                Some("system") | Some("developer") => {
                    content_text(content, |text| signals.system_chars += text.len() as u64);
                }
                Some("user") => {
                    signals.turns += 1;
                    last_user = Some(content);
                }
                _ => {}
            }
        }
    }
    if body["prompt"].is_string() {
        last_user = Some(&body["prompt"]);
    }
    if let Some(content) = last_user {
        content_text(content, |text| {
            signals.last_user_chars += text.len() as u64;
            signals.reasoning_cues += detectors.reasoning.find_iter(text).count() as u64;
            signals.simple_cues += detectors.simple.find_iter(text).count() as u64;
            signals.numbered_steps += detectors.steps.find_iter(text).count() as u64;
            signals.questions += text.matches('?').count() as u64;
            signals.has_code |= detectors.code.find_iter(text).take(2).count() >= 2;
            signals.has_math |= detectors.math.is_match(text);
        });
    }
    signals
}
