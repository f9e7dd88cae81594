//! What metering reads of an upstream answer: a whole chat completion or completion, or one
//! streamed chunk of either (a chunk's `delta` has a message's shape); a whole Responses API
//! response, or one of its stream's typed events; a whole Anthropic message, or one of its
//! stream's events. Strings are borrowed
//! where the JSON has no escapes and every other field is skipped unallocated: parsing answers
//! into `serde_json::Value` was a fifth of a request's instructions.

use std::borrow::Cow;

use serde::Deserialize;

use super::record::TokenUsage;
use super::tokenizer::OutputCounter;

#[derive(Deserialize)]
pub struct Answer<'a> {
    #[serde(borrow)]
    choices: Option<Vec<Choice<'a>>>,
    usage: Option<WireUsage>,
    /// A Responses or Anthropic stream event's type (`response.output_text.delta`,
    /// `content_block_delta`, …), or `message` for a whole Anthropic message.
    #[serde(borrow, default, deserialize_with = "text", rename = "type")]
    event: Option<Cow<'a, str>>,
    #[serde(borrow)]
    delta: Option<Delta<'a>>,
    output_index: Option<u64>,
    /// The content block an Anthropic stream event is about.
    index: Option<u64>,
    /// An Anthropic message's content blocks.
    #[serde(borrow)]
    content: Option<Vec<Block<'a>>>,
    #[serde(borrow, default, deserialize_with = "text")]
    stop_reason: Option<Cow<'a, str>>,
    /// The message an Anthropic stream's `message_start` carries (with the input usage).
    message: Option<Box<StartedMessage>>,
    /// The response a stream's first and last events carry.
    #[serde(borrow)]
    response: Option<Box<Response<'a>>>,
    /// `response` when the answer is a whole Responses API response.
    #[serde(borrow, default, deserialize_with = "text")]
    object: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "text")]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "text")]
    status: Option<Cow<'a, str>>,
    #[serde(borrow)]
    output: Option<Vec<OutputItem<'a>>>,
    #[serde(borrow)]
    incomplete_details: Option<IncompleteDetails<'a>>,
}

/// A stream event's `delta`: text in the Responses API, an object in Anthropic's.
#[derive(Deserialize)]
#[serde(untagged)]
enum Delta<'a> {
    Text(#[serde(borrow)] Cow<'a, str>),
    Anthropic {
        #[serde(borrow, default, deserialize_with = "text")]
        text: Option<Cow<'a, str>>,
        #[serde(borrow, default, deserialize_with = "text")]
        partial_json: Option<Cow<'a, str>>,
        #[serde(borrow, default, deserialize_with = "text")]
        thinking: Option<Cow<'a, str>>,
        #[serde(borrow, default, deserialize_with = "text")]
        stop_reason: Option<Cow<'a, str>>,
    },
}

/// An Anthropic content block: text, tool use (its `input` counted as its JSON text), thinking.
#[derive(Deserialize)]
struct Block<'a> {
    #[serde(borrow, default, deserialize_with = "text")]
    text: Option<Cow<'a, str>>,
    #[serde(borrow)]
    input: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow, default, deserialize_with = "text")]
    thinking: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct StartedMessage {
    usage: Option<WireUsage>,
}

/// A Responses API response object, as a stream event carries it (only what metering reads).
#[derive(Deserialize)]
struct Response<'a> {
    #[serde(borrow, default, deserialize_with = "text")]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "text")]
    status: Option<Cow<'a, str>>,
    #[serde(borrow)]
    incomplete_details: Option<IncompleteDetails<'a>>,
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct OutputItem<'a> {
    #[serde(borrow, default, deserialize_with = "text", rename = "type")]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    content: Option<Vec<ContentPart<'a>>>,
    #[serde(borrow, default, deserialize_with = "text")]
    arguments: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct ContentPart<'a> {
    #[serde(borrow, default, deserialize_with = "text")]
    text: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "text")]
    refusal: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct IncompleteDetails<'a> {
    #[serde(borrow, default, deserialize_with = "text")]
    reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    index: Option<u64>,
    #[serde(borrow, alias = "delta")]
    message: Option<Message<'a>>,
    #[serde(borrow, default, deserialize_with = "text")]
    text: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "text")]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default, deserialize_with = "text")]
    content: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "text")]
    refusal: Option<Cow<'a, str>>,
    #[serde(borrow)]
    tool_calls: Option<Vec<ToolCall<'a>>>,
}

#[derive(Deserialize)]
struct ToolCall<'a> {
    index: Option<u64>,
    #[serde(borrow)]
    function: Option<Function<'a>>,
}

#[derive(Deserialize)]
struct Function<'a> {
    #[serde(borrow, default, deserialize_with = "text")]
    arguments: Option<Cow<'a, str>>,
}

/// An optional string, borrowed from the answer where the JSON has no escapes: serde borrows
/// a `Cow<str>` field only when it is not wrapped, and copied every `Option<Cow<str>>` (each
/// streamed chunk's text among them).
fn text<'de: 'a, 'a, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Cow<'a, str>>, D::Error> {
    #[derive(Deserialize)]
    struct Text<'a>(#[serde(borrow)] Cow<'a, str>);
    Ok(Option::<Text<'a>>::deserialize(deserializer)?.map(|text| text.0))
}

/// The most tokens one request is billed for on the provider's word: a thousand times any
/// model's context. A broken or hostile provider reporting more would otherwise overflow the
/// month's totals (and the ledger's sums) and, wrapped negative, lift the key's budget cap.
pub const MAX_REPORTED_TOKENS: u64 = 1_000_000_000;

/// OpenAI's usage object (chat, completions and embeddings share the names; Responses
/// calls them input and output).
#[derive(Deserialize)]
struct WireUsage {
    #[serde(alias = "input_tokens")]
    prompt_tokens: Option<u64>,
    #[serde(alias = "output_tokens")]
    completion_tokens: Option<u64>,
    total_tokens: Option<u64>,
    #[serde(alias = "input_tokens_details")]
    prompt_tokens_details: Option<PromptTokensDetails>,
    /// Anthropic's `input_tokens` leave out what was read from and written to the cache.
    cache_read_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct PromptTokensDetails {
    cached_tokens: Option<u64>,
}

impl<'a> Answer<'a> {
    /// `None` when the bytes are not an answer-shaped JSON object.
    pub fn parse(bytes: &'a [u8]) -> Option<Answer<'a>> {
        crate::json::from_slice(bytes).ok()
    }

    /// The upstream's own usage figures, when it reported them, each held to
    /// [`MAX_REPORTED_TOKENS`] and cached input to at most the input. Output is
    /// `completion_tokens`, or `total_tokens` less the prompt (embeddings send only those); a
    /// usage object that gives neither is not believed, and the gateway's own count is billed.
    pub fn usage(&self) -> Option<TokenUsage> {
        let usage = self
            .usage
            .as_ref()
            .or_else(|| self.response.as_ref()?.usage.as_ref())
            .or_else(|| self.message.as_ref()?.usage.as_ref())?;
        let cache_read = usage.cache_read_input_tokens.unwrap_or(0);
        let prompt = usage
            .prompt_tokens?
            .saturating_add(cache_read)
            .saturating_add(usage.cache_creation_input_tokens.unwrap_or(0));
        let output = usage
            .completion_tokens
            .or_else(|| usage.total_tokens.map(|total| total.saturating_sub(prompt)))?;
        let input = prompt.min(MAX_REPORTED_TOKENS);
        let cached_input = usage
            .prompt_tokens_details
            .as_ref()
            .and_then(|details| details.cached_tokens)
            .unwrap_or(cache_read)
            .min(input);
        Some(TokenUsage {
            input,
            cached_input,
            output: output.min(MAX_REPORTED_TOKENS),
            cache_write_input: usage
                .cache_creation_input_tokens
                .unwrap_or(0)
                .min(input - cached_input),
        })
    }

    /// The trailing chunk that carries only usage (`stream_options.include_usage`).
    pub fn is_usage_only(&self) -> bool {
        self.choices.as_ref().is_some_and(Vec::is_empty) && self.usage.is_some()
    }

    /// The event that ends a Responses stream (completed, incomplete or failed) or an
    /// Anthropic one.
    pub fn ends_response(&self) -> bool {
        matches!(
            self.event.as_deref(),
            Some("response.completed" | "response.incomplete" | "response.failed" | "message_stop")
        )
    }

    /// The output tokens an Anthropic `message_delta` reports; its input came with
    /// `message_start`.
    pub fn later_output(&self) -> Option<u64> {
        match self.event.as_deref() {
            Some("message_delta") => self.usage.as_ref()?.completion_tokens,
            _ => None,
        }
    }

    /// The id of a Responses API response: the answer's own, or that of the response a
    /// stream event carries.
    pub fn response_id(&self) -> Option<&str> {
        match &self.response {
            Some(response) => response.id.as_deref(),
            None if self.object.as_deref() == Some("response") => self.id.as_deref(),
            None => None,
        }
    }

    /// Hands every choice's text, refusal and tool-call arguments, and its finish reason, to
    /// the counter. A Responses answer's output items count by their index in `output` (a
    /// message's text, a refusal, a function call's arguments); of its stream only the deltas
    /// count, since the closing events repeat the whole output.
    pub fn read_output(self, output: &mut OutputCounter) {
        let index = self.output_index.or(self.index).unwrap_or(0);
        match (self.event.as_deref(), &self.delta) {
            (Some("response.output_text.delta"), Some(Delta::Text(delta))) => {
                output.push_text(index, delta)
            }
            (Some("response.refusal.delta"), Some(Delta::Text(delta))) => {
                output.push_refusal(index, delta)
            }
            (Some("response.function_call_arguments.delta"), Some(Delta::Text(delta))) => {
                output.push_tool_arguments(index, 0, delta)
            }
            (
                Some("content_block_delta"),
                Some(Delta::Anthropic {
                    text,
                    partial_json,
                    thinking,
                    ..
                }),
            ) => {
                if let Some(text) = text.as_deref().or(thinking.as_deref()) {
                    output.push_text(index, text);
                }
                if let Some(json) = partial_json {
                    output.push_tool_arguments(index, 0, json);
                }
            }
            (Some("message_delta"), Some(Delta::Anthropic { stop_reason, .. })) => {
                if let Some(reason) = stop_reason {
                    output.set_finish_reason(0, reason);
                }
            }
            (Some("message"), _) => {
                for (index, block) in self.content.unwrap_or_default().into_iter().enumerate() {
                    let index = index as u64;
                    if let Some(text) = block.text.as_deref().or(block.thinking.as_deref()) {
                        output.push_text(index, text);
                    }
                    if let Some(input) = block.input {
                        output.push_tool_arguments(index, 0, input.get());
                    }
                }
                if let Some(reason) = &self.stop_reason {
                    output.set_finish_reason(0, reason);
                }
            }
            (Some(_), _) => {
                if let Some(response) = self.response.as_ref().filter(|_| self.ends_response()) {
                    read_finish(&response.status, &response.incomplete_details, output);
                }
            }
            (None, _) => match self.output {
                Some(items) => {
                    read_finish(&self.status, &self.incomplete_details, output);
                    read_items(items, output);
                }
                None => read_choices(self.choices.unwrap_or_default(), output),
            },
        }
    }
}

/// A whole Responses answer's output items, each counted under its index in `output`.
fn read_items(items: Vec<OutputItem<'_>>, output: &mut OutputCounter) {
    for (index, item) in items.into_iter().enumerate() {
        let index = index as u64;
        if let Some(arguments) = item.arguments {
            output.push_tool_arguments(index, 0, &arguments);
        }
        if item.kind.as_deref() != Some("message") {
            continue;
        }
        for part in item.content.unwrap_or_default() {
            if let Some(text) = part.text {
                output.push_text(index, &text);
            }
            if let Some(text) = part.refusal {
                output.push_refusal(index, &text);
            }
        }
    }
}

/// Chat completion and completion choices, each counted under its own index.
fn read_choices(choices: Vec<Choice<'_>>, output: &mut OutputCounter) {
    for choice in choices {
        let index = choice.index.unwrap_or(0);
        if let Some(message) = choice.message {
            if let Some(text) = message.content {
                output.push_text(index, &text);
            }
            if let Some(text) = message.refusal {
                output.push_refusal(index, &text);
            }
            let calls = message.tool_calls.unwrap_or_default();
            for (position, call) in calls.into_iter().enumerate() {
                let tool = call.index.unwrap_or(position as u64);
                if let Some(arguments) = call.function.and_then(|f| f.arguments) {
                    output.push_tool_arguments(index, tool, &arguments);
                }
            }
        }
        if let Some(text) = choice.text {
            output.push_text(index, &text);
        }
        if let Some(reason) = choice.finish_reason {
            output.set_finish_reason(index, &reason);
        }
    }
}

/// A Responses API response's finish reason: why it is incomplete, else its status.
fn read_finish(
    status: &Option<Cow<'_, str>>,
    incomplete: &Option<IncompleteDetails<'_>>,
    output: &mut OutputCounter,
) {
    let reason = incomplete
        .as_ref()
        .and_then(|details| details.reason.as_deref())
        .or(status.as_deref());
    if let Some(reason) = reason {
        output.set_finish_reason(0, reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optional_strings_are_borrowed_unless_they_hold_escapes() {
        let body = br#"{"id":"chatcmpl-1","object":null,"choices":[{"index":0,
            "message":{"content":"a \"quoted\" word"},"finish_reason":"stop"}]}"#;
        let answer = Answer::parse(body).unwrap();
        assert!(matches!(answer.id, Some(Cow::Borrowed("chatcmpl-1"))));
        assert!(answer.object.is_none());
        let choice = &answer.choices.as_ref().unwrap()[0];
        assert!(matches!(choice.finish_reason, Some(Cow::Borrowed("stop"))));
        let content = &choice.message.as_ref().unwrap().content;
        assert!(matches!(content, Some(Cow::Owned(text)) if text == "a \"quoted\" word"));
        assert!(
            Answer::parse(br#"{"id":7}"#).is_none(),
            "a non-string is not an answer"
        );
    }

    #[test]
    fn reported_usage_is_bounded_and_believed_only_when_it_gives_output() {
        let body = br#"{"choices":[],"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":100000000000000000,"prompt_tokens_details":{"cached_tokens":18446744073709551615}}}"#;
        let usage = Answer::parse(body).unwrap().usage().unwrap();
        assert_eq!(
            usage,
            TokenUsage {
                input: MAX_REPORTED_TOKENS,
                cached_input: MAX_REPORTED_TOKENS,
                output: MAX_REPORTED_TOKENS,
                cache_write_input: 0,
            }
        );
        let partial = br#"{"usage":{"prompt_tokens":10}}"#;
        assert_eq!(Answer::parse(partial).unwrap().usage(), None);
        let embedding = br#"{"usage":{"prompt_tokens":10,"total_tokens":10}}"#;
        let usage = Answer::parse(embedding).unwrap().usage().unwrap();
        assert_eq!((usage.input, usage.output), (10, 0));
        let cached_over_input = br#"{"usage":{"prompt_tokens":10,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":64}}}"#;
        let usage = Answer::parse(cached_over_input).unwrap().usage().unwrap();
        assert_eq!((usage.input, usage.cached_input, usage.output), (10, 10, 2));
    }

    #[test]
    fn a_responses_answer_is_read_whole_or_from_its_deltas_only() {
        use crate::meter::tokenizer::{Encoding, Tokenizer};
        let tokenizer = Tokenizer::new().unwrap();
        let whole = br#"{"id":"resp_1","object":"response","status":"incomplete","incomplete_details":{"reason":"max_output_tokens"},
            "output":[{"type":"reasoning","summary":[]},{"type":"message","content":[{"type":"output_text","text":"Hello there"}]},
                      {"type":"function_call","name":"f","arguments":"{\"a\":1}"}],
            "usage":{"input_tokens":12,"input_tokens_details":{"cached_tokens":4},"output_tokens":9}}"#;
        let answer = Answer::parse(whole).unwrap();
        assert_eq!(answer.response_id(), Some("resp_1"));
        assert_eq!(
            answer.usage(),
            Some(TokenUsage {
                input: 12,
                cached_input: 4,
                output: 9,
                cache_write_input: 0,
            })
        );
        let mut read = OutputCounter::default();
        answer.read_output(&mut read);
        let expected = tokenizer.count_text(Encoding::O200kBase, "Hello there")
            + tokenizer.count_text(Encoding::O200kBase, "{\"a\":1}");
        assert_eq!(read.finish(&tokenizer, Encoding::O200kBase), expected);
        assert_eq!(read.finish_reason(), Some("max_output_tokens"));

        let mut streamed = OutputCounter::default();
        let events = [
            r#"{"type":"response.created","response":{"id":"resp_2","status":"in_progress","output":[]}}"#,
            r#"{"type":"response.output_text.delta","output_index":1,"delta":"Hello"}"#,
            r#"{"type":"response.output_text.delta","output_index":1,"delta":" there"}"#,
            r#"{"type":"response.output_text.done","output_index":1,"text":"Hello there"}"#,
            r#"{"type":"response.function_call_arguments.delta","output_index":2,"delta":"{\"a\":1}"}"#,
            r#"{"type":"response.completed","response":{"id":"resp_2","status":"completed","output":[{"type":"message","content":[{"type":"output_text","text":"Hello there"}]}],"usage":{"input_tokens":3,"output_tokens":5}}}"#,
        ];
        let mut ended = false;
        for event in events {
            let answer = Answer::parse(event.as_bytes()).unwrap();
            assert_eq!(
                answer.response_id(),
                answer.response.as_ref().map(|_| "resp_2")
            );
            ended |= answer.ends_response();
            answer.read_output(&mut streamed);
        }
        assert!(ended);
        assert_eq!(streamed.finish(&tokenizer, Encoding::O200kBase), expected);
        assert_eq!(streamed.finish_reason(), Some("completed"));
    }
}
