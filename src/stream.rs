//! Server-sent-event pass-through with a usage tap. Upstream bytes go to the client as they
//! arrive, cut only at event boundaries; the tap reads each complete event to follow the
//! output (for our own token count), the finish reason and the upstream's usage figures, and
//! removes the trailing usage-only chunk when the gateway asked for it on the client's behalf.

use bytes::{Bytes, BytesMut};

use crate::meter::answer::Answer;
use crate::meter::record::TokenUsage;
use crate::meter::tokenizer::OutputCounter;

#[derive(Default)]
pub struct SseTap {
    /// Bytes of an event that has not ended yet.
    partial: BytesMut,
    strip_usage_chunk: bool,
    pub output: OutputCounter,
    pub usage: Option<TokenUsage>,
    /// The stream's end: `[DONE]`, or the last event of a Responses stream.
    pub saw_done: bool,
    /// The id of the Responses API response being streamed.
    pub response_id: Option<String>,
}

impl SseTap {
    /// `strip_usage_chunk`: the client did not ask for `include_usage`, the gateway did.
    pub fn new(strip_usage_chunk: bool) -> SseTap {
        SseTap {
            strip_usage_chunk,
            ..SseTap::default()
        }
    }

    /// Takes the next upstream bytes and returns what the client should get now: its complete
    /// events, each read once. Unless an event is dropped that is a slice of the input, not a
    /// copy.
    pub fn feed(&mut self, chunk: Bytes) -> Bytes {
        let ready = if self.partial.is_empty() {
            let complete = last_event_end(&chunk);
            self.partial.extend_from_slice(&chunk[complete..]);
            chunk.slice(..complete)
        } else {
            self.partial.extend_from_slice(&chunk);
            let complete = last_event_end(&self.partial);
            self.partial.split_to(complete).freeze()
        };
        let mut kept: Option<BytesMut> = None;
        let mut start = 0;
        for event in events(&ready) {
            let end = start + event.len();
            let keep = self.observe(event);
            match &mut kept {
                Some(out) if keep => out.extend_from_slice(event),
                None if !keep => kept = Some(BytesMut::from(&ready[..start])),
                _ => {}
            }
            start = end;
        }
        kept.map_or(ready, BytesMut::freeze)
    }

    /// Reads one complete event; returns whether it goes to the client.
    fn observe(&mut self, event: &[u8]) -> bool {
        let Some(data) = event_data(event) else {
            return true;
        };
        if data == b"[DONE]" {
            self.saw_done = true;
            return true;
        }
        let Some(chunk) = Answer::parse(data) else {
            return true;
        };
        if let Some(usage) = chunk.usage() {
            self.usage = Some(usage);
        } else if let (Some(output), Some(usage)) = (chunk.later_output(), &mut self.usage) {
            usage.output = output.min(crate::meter::answer::MAX_REPORTED_TOKENS);
        }
        if self.response_id.is_none() {
            self.response_id = chunk.response_id().map(str::to_owned);
        }
        self.saw_done |= chunk.ends_response();
        let usage_only = chunk.is_usage_only();
        chunk.read_output(&mut self.output);
        !(self.strip_usage_chunk && usage_only)
    }

    /// Bytes still held because their event never ended (the stream was cut).
    pub fn unfinished(&self) -> usize {
        self.partial.len()
    }
}

/// Answer bytes taken from upstream and not yet sent: events that arrive together leave in one
/// write. One write per event cost a syscall and a wakeup of the client each, which is most of a
/// fast stream's cost.
#[derive(Default)]
pub struct Gathered {
    first: Option<Bytes>,
    rest: BytesMut,
}

impl Gathered {
    /// Past this many bytes the gathered answer is sent without waiting for more.
    pub const FLUSH_BYTES: usize = 64 * 1024;

    pub fn push(&mut self, bytes: Bytes) {
        match self.first.take() {
            None if self.rest.is_empty() => self.first = Some(bytes),
            first => {
                if let Some(first) = first {
                    self.rest.extend_from_slice(&first);
                }
                self.rest.extend_from_slice(&bytes);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.first.as_ref().map_or(0, Bytes::len) + self.rest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Everything gathered, in order; a lone chunk is passed on without a copy.
    pub fn take(&mut self) -> Bytes {
        self.first
            .take()
            .unwrap_or_else(|| self.rest.split().freeze())
    }
}

/// End of the last complete event: just past its blank line. `bytes` starts where an event
/// starts, so the first line may itself be blank (the empty event between extra blank lines).
fn last_event_end(bytes: &[u8]) -> usize {
    memchr::memrchr_iter(b'\n', bytes)
        .find(|&newline| ends_blank_line(bytes, newline))
        .map_or(0, |newline| newline + 1)
}

/// Splits complete events, each slice keeping its terminating blank line.
fn events(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = first_event_end(rest).unwrap_or(rest.len());
        let (event, tail) = rest.split_at(end);
        rest = tail;
        Some(event)
    })
}

/// End of the first complete event of `bytes` (which start where an event starts): just past
/// its blank line.
pub(crate) fn first_event_end(bytes: &[u8]) -> Option<usize> {
    memchr::memchr_iter(b'\n', bytes)
        .find(|&newline| ends_blank_line(bytes, newline))
        .map(|newline| newline + 1)
}

/// Whether the line ending at `newline` is blank (`\n` or `\r\n`), for `bytes` that start
/// at a line's start. Deciding from what precedes the newline makes the answer the same
/// however the stream was cut into reads.
fn ends_blank_line(bytes: &[u8], newline: usize) -> bool {
    matches!(
        &bytes[..newline],
        [] | [b'\r'] | [.., b'\n'] | [.., b'\n', b'\r']
    )
}

/// The payload of an event's `data:` line. OpenAI sends one data line per event; multi-line
/// data would be joined with newlines, which no OpenAI-compatible provider emits.
pub(crate) fn event_data(event: &[u8]) -> Option<&[u8]> {
    let mut rest = event;
    loop {
        let end = memchr::memchr(b'\n', rest).unwrap_or(rest.len());
        if let Some(data) = rest[..end].strip_prefix(b"data:") {
            return Some(data.trim_ascii());
        }
        rest = rest.get(end + 1..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}],\"usage\":null}\n\n";
    const USAGE: &str = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11,\"prompt_tokens_details\":{\"cached_tokens\":4}}}\n\n";
    const DONE: &str = "data: [DONE]\n\n";

    #[test]
    fn passes_whole_events_untouched_and_reads_usage() {
        let mut tap = SseTap::new(false);
        let all = format!("{CHUNK}{USAGE}{DONE}");
        let out = tap.feed(Bytes::from(all.clone()));
        assert_eq!(out, all.as_bytes());
        assert!(tap.saw_done);
        assert_eq!(
            tap.usage,
            Some(TokenUsage {
                input: 9,
                cached_input: 4,
                output: 2,
                cache_write_input: 0,
            })
        );
    }

    #[test]
    fn strips_the_usage_chunk_the_client_did_not_ask_for() {
        let mut tap = SseTap::new(true);
        let out = tap.feed(Bytes::from(format!("{CHUNK}{USAGE}{DONE}")));
        assert_eq!(out, format!("{CHUNK}{DONE}").as_bytes());
        assert_eq!(tap.usage.map(|u| u.output), Some(2));
    }

    /// Found by the `sse_tap` fuzz target: an extra blank line read on its own was held as
    /// an unfinished event, though read together with the event before it it was passed.
    #[test]
    fn an_extra_blank_line_is_passed_however_it_is_read() {
        let stream = ": keep-alive\r\n\r\n\n";
        let mut whole = SseTap::new(false);
        assert_eq!(
            whole.feed(Bytes::from_static(stream.as_bytes())),
            stream.as_bytes()
        );
        let mut split = SseTap::new(false);
        assert_eq!(
            split
                .feed(Bytes::from_static(b": keep-alive\r\n\r\n"))
                .len(),
            16
        );
        assert_eq!(split.feed(Bytes::from_static(b"\n")), &b"\n"[..]);
        assert_eq!(split.unfinished(), 0);
    }

    #[test]
    fn holds_partial_events_until_they_end() {
        let mut tap = SseTap::new(true);
        let all = format!("{CHUNK}{USAGE}{DONE}");
        let mut out = Vec::new();
        for piece in all.as_bytes().chunks(7) {
            out.extend_from_slice(&tap.feed(Bytes::copy_from_slice(piece)));
        }
        assert_eq!(out, format!("{CHUNK}{DONE}").as_bytes());
        assert!(tap.saw_done);
        assert_eq!(tap.unfinished(), 0);
    }

    #[test]
    fn reads_escaped_text_tool_arguments_and_the_finish_reason() {
        use crate::meter::tokenizer::{Encoding, Tokenizer};
        let events = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"say \\\"hi\\\"\\n\"}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"name\":\"f\",\"arguments\":\"{\\\"a\\\":\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"1}\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n",
        );
        let mut tap = SseTap::new(false);
        assert_eq!(
            tap.feed(Bytes::from_static(events.as_bytes())),
            events.as_bytes()
        );
        let tokenizer = Tokenizer::new().unwrap();
        let expected = tokenizer.count_text(Encoding::O200kBase, "say \"hi\"\n")
            + tokenizer.count_text(Encoding::O200kBase, "{\"a\":1}");
        assert_eq!(tap.output.finish(&tokenizer, Encoding::O200kBase), expected);
        assert_eq!(
            tap.output.text_len(),
            "say \"hi\"\n".len() + "{\"a\":1}".len()
        );
        assert_eq!(tap.output.finish_reason(), Some("tool_calls"));
    }

    #[test]
    fn gathered_chunks_leave_in_order_as_one() {
        let mut gathered = Gathered::default();
        gathered.push(Bytes::from_static(b"ab"));
        assert_eq!(gathered.len(), 2);
        gathered.push(Bytes::from_static(b"cd"));
        gathered.push(Bytes::from_static(b"e"));
        assert_eq!(gathered.take(), &b"abcde"[..]);
        assert!(gathered.is_empty());
        gathered.push(Bytes::from_static(b"f"));
        assert_eq!(gathered.take(), &b"f"[..]);
    }

    #[test]
    fn crlf_events_are_events() {
        let mut tap = SseTap::new(false);
        let out = tap.feed(Bytes::from_static(b"data: [DONE]\r\n\r\n"));
        assert_eq!(out.len(), 16);
        assert!(tap.saw_done);
    }
}
