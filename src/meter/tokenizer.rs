//! Token counting, following OpenAI's accounting. Counting runs on GitHub's `bpe-openai`
//! encoders: they give the same counts as tiktoken (the reference; `tests/token_counts.rs`
//! checks both against Python tiktoken) and stay linear on adversarial input such as a megabyte
//! of one repeated character, where tiktoken's merge loop is quadratic and takes minutes.
//!
//! Chat prompts are counted with the OpenAI cookbook's per-message formula: 3 tokens per
//! message, the tokens of every string field, 1 more for `name`, and 3 to prime the reply.
//! Content arrays count their text parts; an image part is counted at the low-detail price of
//! 85 tokens (its real price depends on the image's size, which a gateway does not fetch).
//! Tool definitions use the cookbook's function-calling estimate. These are estimates where
//! OpenAI publishes none; when the upstream reports usage, its figure is the one billed.

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::LazyLock;

use dashmap::DashMap;

use serde_json::Value;

use super::pretokenize::split_ascii;
use super::prompt::{ChatRequest, FieldRef};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Encoding {
    O200kBase,
    Cl100kBase,
}

impl Encoding {
    /// The encoding of a known OpenAI model family, by name.
    pub fn for_model(name: &str) -> Option<Encoding> {
        let name = name.rsplit('/').next().unwrap_or(name);
        const O200K: &[&str] = &[
            "gpt-4o",
            "gpt-4.1",
            "gpt-4.5",
            "gpt-5",
            "o1",
            "o3",
            "o4",
            "chatgpt-4o",
            "gpt-oss",
        ];
        const CL100K: &[&str] = &[
            "gpt-4",
            "gpt-3.5",
            "gpt-35",
            "text-embedding-3",
            "text-embedding-ada-002",
        ];
        if O200K.iter().any(|prefix| name.starts_with(prefix)) {
            Some(Encoding::O200kBase)
        } else if CL100K.iter().any(|prefix| name.starts_with(prefix)) {
            Some(Encoding::Cl100kBase)
        } else {
            None
        }
    }

    pub fn from_name(name: &str) -> Option<Encoding> {
        match name {
            "o200k_base" => Some(Encoding::O200kBase),
            "cl100k_base" => Some(Encoding::Cl100kBase),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Encoding::O200kBase => "o200k_base",
            Encoding::Cl100kBase => "cl100k_base",
        }
    }

    /// Constants of the cookbook's function-definition estimate, which differ by family.
    fn function_init(self) -> u64 {
        match self {
            Encoding::O200kBase => 7,
            Encoding::Cl100kBase => 10,
        }
    }
}

/// Token counts of pre-tokenized pieces seen recently on this thread. Prompts and answers are
/// mostly common words, each a piece the regex splits off; looking one up costs a hash where
/// encoding it costs an allocation and a backtracking search. Bounded in entries and piece
/// length so that hostile text can neither grow it nor make its lookups slow.
#[derive(Default)]
struct PieceCache {
    counts: foldhash::HashMap<Box<str>, u32>,
}

impl PieceCache {
    const MAX_ENTRIES: usize = 16_384;
    const MAX_PIECE_BYTES: usize = 24;

    fn count(&mut self, piece: &str, encode: impl FnOnce(&str) -> usize) -> usize {
        if piece.len() > Self::MAX_PIECE_BYTES {
            return encode(piece);
        }
        if let Some(&count) = self.counts.get(piece) {
            return count as usize;
        }
        let count = encode(piece);
        if self.counts.len() >= Self::MAX_ENTRIES {
            self.counts.clear();
        }
        self.counts.insert(piece.into(), count as u32);
        count
    }
}

/// Token counts of whole prompt texts, shared by every thread. Applications resend the same
/// system prompt, tool definitions and conversation history with each request; counting a
/// text costs some 200 instructions per byte (and a short one a fixed half microsecond of
/// normalizing and splitting) where a hit costs a hash and a compare. Answers are not cached:
/// they rarely repeat. Bounded in bytes, each entry's own overhead included, and it starts
/// over when full, so a client sending unique texts only costs itself the lookups.
struct PromptCache {
    counts: [DashMap<Box<str>, u64, foldhash::fast::RandomState>; 2],
    held_bytes: AtomicUsize,
}

impl PromptCache {
    const MAX_TEXT_BYTES: usize = 256 * 1024;
    const BUDGET_BYTES: usize = 16 * 1024 * 1024;
    /// What an entry holds besides its text: the map's slot, the box's header and rounding.
    const ENTRY_BYTES: usize = 64;

    fn count(&self, encoding: Encoding, text: &str, count: impl FnOnce(&str) -> u64) -> u64 {
        if text.is_empty() || text.len() > Self::MAX_TEXT_BYTES {
            return count(text);
        }
        let counts = &self.counts[encoding as usize];
        if let Some(known) = counts.get(text) {
            return *known;
        }
        let tokens = count(text);
        let held = text.len() + Self::ENTRY_BYTES;
        if self.held_bytes.fetch_add(held, Ordering::Relaxed) > Self::BUDGET_BYTES {
            self.held_bytes.store(held, Ordering::Relaxed);
            for counts in &self.counts {
                counts.clear();
            }
        }
        counts.insert(text.into(), tokens);
        tokens
    }
}

static PROMPT_COUNTS: LazyLock<PromptCache> = LazyLock::new(|| PromptCache {
    counts: Default::default(),
    held_bytes: AtomicUsize::new(0),
});

thread_local! {
    /// One cache per [`Encoding`], indexed by its discriminant.
    static PIECE_COUNTS: RefCell<[PieceCache; 2]> = RefCell::default();
}

#[derive(Debug, thiserror::Error)]
#[error("tokenizer unavailable: {0}")]
pub struct TokenizerError(String);

const TOKENS_PER_MESSAGE: u64 = 3;
const TOKENS_PER_NAME: u64 = 1;
const REPLY_PRIMING: u64 = 3;
const IMAGE_PART: u64 = 85;

/// The encoders, each built once per process when first used: their tables are large (about
/// 67 MiB for o200k_base and 30 MiB for cl100k_base resident), so a gateway whose traffic
/// never needs cl100k_base never holds it. Building one takes some 30 ms.
#[derive(Clone, Copy)]
pub struct Tokenizer {
    _built: (),
}

impl Tokenizer {
    /// Builds o200k_base now, the encoding of every current OpenAI chat model, so the first
    /// request does not pay for it.
    pub fn new() -> Result<Tokenizer, TokenizerError> {
        let tokenizer = Tokenizer { _built: () };
        if tokenizer.count_text(Encoding::O200kBase, "hello world") != 2 {
            return Err(TokenizerError("o200k_base self-check failed".to_owned()));
        }
        Ok(tokenizer)
    }

    pub fn count_text(&self, encoding: Encoding, text: &str) -> u64 {
        if text.is_empty() {
            return 0;
        }
        let encoder = match encoding {
            Encoding::O200kBase => bpe_openai::o200k_base(),
            Encoding::Cl100kBase => bpe_openai::cl100k_base(),
        };
        let text = encoder.normalize(text);
        let text = text.as_str();
        PIECE_COUNTS.with_borrow_mut(|caches| {
            let cache = &mut caches[encoding as usize];
            let mut count =
                |piece: &str| cache.count(piece, |piece| encoder.bpe.count(piece.as_bytes()));
            let tokens: usize = if text.is_ascii() {
                split_ascii(encoding, text).map(&mut count).sum()
            } else {
                encoder.split(text).map(&mut count).sum()
            };
            tokens as u64
        })
    }

    /// A prompt text's tokens, through the shared cache of recent prompt texts.
    fn count_prompt_text(&self, encoding: Encoding, text: &str) -> u64 {
        PROMPT_COUNTS.count(encoding, text, |text| self.count_text(encoding, text))
    }

    /// Input tokens of a chat request body: messages, tool definitions, and the JSON schema
    /// of structured outputs.
    pub fn count_chat_prompt(&self, encoding: Encoding, body: &impl ChatRequest) -> u64 {
        let messages = body.messages().map(|messages| {
            messages
                .map(|message| message.map_or(0, |fields| self.count_message(encoding, fields)))
                .sum::<u64>()
        });
        let member = |name: &str| body.member(name).unwrap_or(&Value::Null);
        messages.map_or(0, |tokens| tokens + REPLY_PRIMING)
            + self.count_tools(encoding, member("tools"), member("functions"))
            + self.count_response_schema(encoding, member("response_format"))
    }

    /// A structured-output schema is put into the prompt in a form OpenAI does not publish,
    /// so the compact JSON text of the whole `json_schema` member (name, description, strict
    /// and schema, in the client's order) stands in for it: a schema of thousands of tokens
    /// must not count as none when a request's tokens are reserved.
    fn count_response_schema(&self, encoding: Encoding, response_format: &Value) -> u64 {
        match &response_format["json_schema"] {
            Value::Null => 0,
            schema => self.count_prompt_text(encoding, &schema.to_string()),
        }
    }

    fn count_message<'v>(
        &self,
        encoding: Encoding,
        fields: impl Iterator<Item = (&'v str, FieldRef<'v>)>,
    ) -> u64 {
        let mut total = TOKENS_PER_MESSAGE;
        for (field, value) in fields {
            total += match value {
                FieldRef::Text(text) => self.count_prompt_text(encoding, text),
                FieldRef::Tree(Value::Array(parts)) if field == "content" => {
                    self.count_parts(encoding, parts)
                }
                FieldRef::Tree(Value::Array(calls)) if field == "tool_calls" => calls
                    .iter()
                    .map(|call| {
                        self.count_text(encoding, call["function"]["name"].as_str().unwrap_or(""))
                            + self.count_text(
                                encoding,
                                call["function"]["arguments"].as_str().unwrap_or(""),
                            )
                    })
                    .sum(),
                FieldRef::Tree(Value::Object(call)) if field == "function_call" => {
                    self.count_text(
                        encoding,
                        call.get("name").and_then(Value::as_str).unwrap_or(""),
                    ) + self.count_text(
                        encoding,
                        call.get("arguments").and_then(Value::as_str).unwrap_or(""),
                    )
                }
                FieldRef::Tree(_) => 0,
            };
            if field == "name" {
                total += TOKENS_PER_NAME;
            }
        }
        total
    }

    fn count_parts(&self, encoding: Encoding, parts: &[Value]) -> u64 {
        parts
            .iter()
            .map(|part| match part["type"].as_str() {
                Some("text") | Some("input_text") => {
                    self.count_prompt_text(encoding, part["text"].as_str().unwrap_or(""))
                }
                Some("image_url") | Some("input_image") => IMAGE_PART,
                _ => part["text"]
                    .as_str()
                    .map_or(0, |text| self.count_prompt_text(encoding, text)),
            })
            .sum()
    }

    /// The OpenAI cookbook's estimate for function definitions (`tools` or `functions`).
    fn count_tools(&self, encoding: Encoding, tools: &Value, functions: &Value) -> u64 {
        let functions: Vec<&Value> = match (tools, functions) {
            (Value::Array(tools), _) => tools.iter().map(|tool| &tool["function"]).collect(),
            (_, Value::Array(functions)) => functions.iter().collect(),
            _ => return 0,
        };
        if functions.is_empty() {
            return 0;
        }
        const PROP_INIT: i64 = 3;
        const PROP_KEY: i64 = 3;
        const ENUM_INIT: i64 = -3;
        const ENUM_ITEM: i64 = 3;
        const FUNC_END: i64 = 12;
        let count = |text: &str| self.count_prompt_text(encoding, text) as i64;
        let count_rest = |schema: &Value, read: &[&str]| -> i64 {
            unread_members_json(schema, read).map_or(0, |text| count(&text))
        };
        let mut total: i64 = 0;
        for function in functions {
            total += encoding.function_init() as i64;
            let name = function["name"].as_str().unwrap_or("");
            let description = function["description"].as_str().unwrap_or("");
            let description = description.strip_suffix('.').unwrap_or(description);
            total += count(&format!("{name}:{description}"));
            let properties = function["parameters"]["properties"]
                .as_object()
                .filter(|properties| !properties.is_empty());
            if properties.is_some() {
                total += PROP_INIT;
            }
            for (key, property) in properties.into_iter().flatten() {
                total += PROP_KEY;
                if let Some(items) = property["enum"].as_array() {
                    total += ENUM_INIT;
                    for item in items {
                        total += ENUM_ITEM;
                        total += match item {
                            Value::String(text) => count(text),
                            other => count(&other.to_string()),
                        };
                    }
                }
                let kind = match &property["type"] {
                    Value::String(kind) => kind.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                };
                let description = property["description"].as_str().unwrap_or("");
                let description = description.strip_suffix('.').unwrap_or(description);
                total += count(&format!("{key}:{kind}:{description}"));
                // The cookbook's estimate reads a property's type, description and enum;
                // whatever else it holds (nested properties, items, anyOf, bounds…) counts as
                // its JSON text.
                total += count_rest(property, &["type", "description", "enum"]);
            }
            // Likewise the schema's own members beyond its properties: `$defs`, `required`,
            // `additionalProperties`, `anyOf`…
            total += count_rest(&function["parameters"], &["type", "properties"]);
        }
        total += FUNC_END;
        total.max(0) as u64
    }

    /// Input tokens of a legacy completions `prompt`: a string, strings, or token arrays.
    pub fn count_completion_prompt(&self, encoding: Encoding, prompt: &Value) -> u64 {
        self.count_inputs(encoding, prompt)
    }

    /// Input tokens of an embeddings `input`: same shapes as a completions prompt.
    pub fn count_embedding_input(&self, encoding: Encoding, input: &Value) -> u64 {
        self.count_inputs(encoding, input)
    }

    fn count_inputs(&self, encoding: Encoding, value: &Value) -> u64 {
        match value {
            Value::String(text) => self.count_text(encoding, text),
            Value::Array(items) if items.iter().all(Value::is_number) => items.len() as u64,
            Value::Array(items) => items
                .iter()
                .map(|item| self.count_inputs(encoding, item))
                .sum(),
            _ => 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Text,
    Refusal,
    ToolArguments(u64),
}

/// Accumulates a streamed answer's text, per choice and per part, to count it once at the end:
/// tokens straddle chunk boundaries, so chunks cannot be counted one by one.
#[derive(Debug, Default)]
pub struct OutputCounter {
    parts: Vec<((u64, Part), String)>,
    finish_reason: Option<super::record::Name>,
}

impl OutputCounter {
    /// Streamed answer text of choice `index` (a delta's content, or a legacy completion's
    /// text).
    pub fn push_text(&mut self, index: u64, text: &str) {
        self.push(index, Part::Text, text);
    }

    pub fn push_refusal(&mut self, index: u64, text: &str) {
        self.push(index, Part::Refusal, text);
    }

    pub fn push_tool_arguments(&mut self, index: u64, tool: u64, arguments: &str) {
        self.push(index, Part::ToolArguments(tool), arguments);
    }

    /// The answer's finish reason is the first choice's, or else the first one given.
    pub fn set_finish_reason(&mut self, index: u64, reason: &str) {
        if index == 0 || self.finish_reason.is_none() {
            self.finish_reason = Some(reason.into());
        }
    }

    fn push(&mut self, choice: u64, part: Part, text: &str) {
        if text.is_empty() {
            return;
        }
        let key = (choice, part);
        match self.parts.iter_mut().find(|(k, _)| *k == key) {
            Some((_, buffer)) => buffer.push_str(text),
            None => self.parts.push((key, text.to_owned())),
        }
    }

    pub fn finish(&self, tokenizer: &Tokenizer, encoding: Encoding) -> u64 {
        self.parts
            .iter()
            .map(|(_, text)| tokenizer.count_text(encoding, text))
            .sum()
    }

    pub fn finish_reason(&self) -> Option<&str> {
        self.finish_reason.as_deref()
    }

    /// Bytes of answer text held so far.
    pub fn text_len(&self) -> usize {
        self.parts.iter().map(|(_, text)| text.len()).sum()
    }
}

/// The compact JSON text of an object's members other than `read`, in the client's order;
/// `None` when there are none.
fn unread_members_json(schema: &Value, read: &[&str]) -> Option<String> {
    let mut text = Vec::new();
    for (name, value) in schema.as_object()? {
        if read.contains(&name.as_str()) {
            continue;
        }
        text.push(if text.is_empty() { b'{' } else { b',' });
        serde_json::to_writer(&mut text, name).ok()?;
        text.push(b':');
        serde_json::to_writer(&mut text, value).ok()?;
    }
    if text.is_empty() {
        return None;
    }
    text.push(b'}');
    String::from_utf8(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tokenizer() -> Tokenizer {
        Tokenizer::new().unwrap()
    }

    #[test]
    fn families_map_to_encodings() {
        assert_eq!(
            Encoding::for_model("gpt-4o-mini"),
            Some(Encoding::O200kBase)
        );
        assert_eq!(
            Encoding::for_model("gpt-4.1-nano"),
            Some(Encoding::O200kBase)
        );
        assert_eq!(Encoding::for_model("o3-mini"), Some(Encoding::O200kBase));
        assert_eq!(Encoding::for_model("gpt-5"), Some(Encoding::O200kBase));
        assert_eq!(
            Encoding::for_model("gpt-4-turbo"),
            Some(Encoding::Cl100kBase)
        );
        assert_eq!(
            Encoding::for_model("gpt-3.5-turbo"),
            Some(Encoding::Cl100kBase)
        );
        assert_eq!(Encoding::for_model("llama-3"), None);
    }

    #[test]
    fn chat_follows_the_cookbook() {
        let t = tokenizer();
        let body = json!({"messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "name": "ana", "content": "Hi"}
        ]});
        let expected = 3
            + t.count_text(Encoding::O200kBase, "system")
            + t.count_text(Encoding::O200kBase, "You are terse.")
            + 3
            + t.count_text(Encoding::O200kBase, "user")
            + t.count_text(Encoding::O200kBase, "ana")
            + 1
            + t.count_text(Encoding::O200kBase, "Hi")
            + 3;
        assert_eq!(t.count_chat_prompt(Encoding::O200kBase, &body), expected);
    }

    #[test]
    fn schemas_beyond_the_cookbook_count_as_their_json_text() {
        let t = tokenizer();
        let o200k = Encoding::O200kBase;
        let messages = json!([{"role": "user", "content": "Hi"}]);
        let plain = t.count_chat_prompt(o200k, &json!({"messages": messages}));
        let structured: Value = serde_json::from_str(
            r#"{"messages": [{"role": "user", "content": "Hi"}], "response_format": {
                "type": "json_schema", "json_schema": {"name": "place", "strict": true,
                "schema": {"type": "object", "properties": {"city": {"type": "string"}}}}}}"#,
        )
        .unwrap();
        assert_eq!(
            t.count_chat_prompt(o200k, &structured),
            plain
                + t.count_text(
                    o200k,
                    r#"{"name":"place","strict":true,"schema":{"type":"object","properties":{"city":{"type":"string"}}}}"#
                ),
            "every member of json_schema, in the client's order"
        );

        let tool = |address: Value| {
            json!({"messages": messages, "tools": [{"type": "function", "function": {
                "name": "ship", "parameters": {"type": "object", "properties": {"to": address}}}}]})
        };
        let flat = t.count_chat_prompt(o200k, &tool(json!({"type": "string"})));
        let nested = t.count_chat_prompt(
            o200k,
            &tool(json!({"type": "object", "properties": {"zip": {"type": "string"}}})),
        );
        assert_eq!(
            nested,
            flat - t.count_text(o200k, "to:string:")
                + t.count_text(o200k, "to:object:")
                + t.count_text(o200k, r#"{"properties":{"zip":{"type":"string"}}}"#)
        );
    }

    /// A pydantic model as a tool: `$defs`, `anyOf`, `required`, bounds and
    /// `additionalProperties` are all in the prompt the model reads, so all are counted.
    #[test]
    fn every_member_of_a_tool_schema_counts() {
        let t = tokenizer();
        let o200k = Encoding::O200kBase;
        let parameters = r##"{"type": "object", "$defs": {"Address": {"type": "object",
            "properties": {"street": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "zip"]}},
            "properties": {"to": {"anyOf": [{"$ref": "#/$defs/Address"}, {"type": "null"}]},
                "weight": {"type": "number", "minimum": 0, "description": "Kilograms."}},
            "required": ["to", "weight"], "additionalProperties": false}"##;
        let body: Value = serde_json::from_str(&format!(
            r#"{{"messages": [], "tools": [{{"type": "function", "function": {{"name": "ship", "parameters": {parameters}}}}}]}}"#
        ))
        .unwrap();
        let text = |s: &str| t.count_text(o200k, s);
        let expected = 7 // function_init
            + text("ship:")
            + 3 // properties
            + 3 + text("to::") + text(r##"{"anyOf":[{"$ref":"#/$defs/Address"},{"type":"null"}]}"##)
            + 3 + text("weight:number:Kilograms") + text(r#"{"minimum":0}"#)
            + text(r#"{"$defs":{"Address":{"type":"object","properties":{"street":{"type":"string"},"zip":{"type":"string","pattern":"^[0-9]{5}$"}},"required":["street","zip"]}},"required":["to","weight"],"additionalProperties":false}"#)
            + 12 // function end
            + 3; // reply priming
        assert_eq!(t.count_chat_prompt(o200k, &body), expected);
    }

    #[test]
    fn odd_shapes_never_panic() {
        let t = tokenizer();
        for body in [
            json!(null),
            json!({"messages": 3}),
            json!({"messages": [1, "x", null]}),
            json!({"messages": [{"content": [{"type": "image_url"}, 5]}]}),
            json!({"tools": [{"function": {"parameters": {"properties": {"a": {"enum": [1]}}}}}]}),
        ] {
            t.count_chat_prompt(Encoding::O200kBase, &body);
        }
        assert_eq!(
            t.count_embedding_input(Encoding::Cl100kBase, &json!([[1, 2, 3], [4]])),
            4
        );
    }

    #[test]
    fn streamed_output_is_counted_on_joined_text() {
        let t = tokenizer();
        let mut counter = OutputCounter::default();
        for piece in ["Hel", "lo", " wor", "ld"] {
            counter.push_text(0, piece);
        }
        counter.set_finish_reason(0, "stop");
        assert_eq!(counter.finish(&t, Encoding::O200kBase), 2);
        assert_eq!(counter.finish_reason(), Some("stop"));
    }

    #[test]
    fn a_megabyte_of_one_character_is_linear() {
        let t = tokenizer();
        let started = std::time::Instant::now();
        let count = t.count_text(Encoding::O200kBase, &"a".repeat(1 << 20));
        assert_eq!(count, (1 << 20) / 8);
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn long_runs_of_one_class_count_as_the_regex_splits_them() {
        let t = tokenizer();
        for text in [
            "7".repeat(1 << 20),
            " ".repeat(1 << 20),
            "\n ".repeat(1 << 19),
            "!".repeat(1 << 20),
        ] {
            assert_eq!(
                t.count_text(Encoding::O200kBase, &text),
                bpe_openai::o200k_base().count(text.as_str()) as u64
            );
        }
    }
}
