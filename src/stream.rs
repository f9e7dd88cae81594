//! Server-sent-event pass-through with a usage tap. Upstream bytes go to the client as they
//! arrive, cut only at event boundaries; the tap reads each complete event to follow the
//! output (for our own token count), the finish reason and the upstream's usage figures, and
//! removes the trailing usage-only chunk when the gateway asked for it on the client's behalf.

use bytes::{Bytes, BytesMut};

use crate::meter::record::TokenUsage;
use crate::meter::tokenizer::OutputCounter;

#[derive(Default)]
pub struct SseTap {
    /// Bytes of an event that has not ended yet.
    partial: BytesMut,
    strip_usage_chunk: bool,
    pub output: OutputCounter,
    pub usage: Option<TokenUsage>,
    pub saw_done: bool,
    pub events: u64,
}

impl SseTap {
    /// `strip_usage_chunk`: the client did not ask for `include_usage`, the gateway did.
    pub fn new(strip_usage_chunk: bool) -> SseTap {
        SseTap {
            strip_usage_chunk,
            ..SseTap::default()
        }
    }

    /// Takes the next upstream bytes and returns what the client should get now. In the common
    /// case (whole events, nothing to strip) that is the same buffer, not a copy.
    pub fn feed(&mut self, chunk: Bytes) -> Bytes {
        if self.partial.is_empty() {
            let complete = last_event_end(&chunk);
            let mut keep_all = true;
            for event in events(&chunk[..complete]) {
                keep_all &= self.observe(event);
            }
            if keep_all {
                if complete == chunk.len() {
                    return chunk;
                }
                self.partial.extend_from_slice(&chunk[complete..]);
                return chunk.slice(..complete);
            }
            self.partial.extend_from_slice(&chunk);
            return self.rebuild_without_replaying();
        }
        self.partial.extend_from_slice(&chunk);
        let complete = last_event_end(&self.partial);
        let ready = self.partial.split_to(complete).freeze();
        let mut out = BytesMut::with_capacity(ready.len());
        for event in events(&ready) {
            if self.observe(event) {
                out.extend_from_slice(event);
            }
        }
        out.freeze()
    }

    /// The events of `partial` were already observed by the fast path; keep the ones to send.
    fn rebuild_without_replaying(&mut self) -> Bytes {
        let complete = last_event_end(&self.partial);
        let ready = self.partial.split_to(complete).freeze();
        let mut out = BytesMut::with_capacity(ready.len());
        for event in events(&ready) {
            if !(self.strip_usage_chunk && is_usage_only(event)) {
                out.extend_from_slice(event);
            }
        }
        out.freeze()
    }

    /// Reads one complete event; returns whether it goes to the client.
    fn observe(&mut self, event: &[u8]) -> bool {
        self.events += 1;
        let Some(data) = event_data(event) else {
            return true;
        };
        if data == b"[DONE]" {
            self.saw_done = true;
            return true;
        }
        let Ok(chunk) = serde_json::from_slice::<serde_json::Value>(data) else {
            return true;
        };
        if let Some(usage) = parse_usage(&chunk["usage"]) {
            self.usage = Some(usage);
        }
        self.output.push_delta_chunk(&chunk);
        !(self.strip_usage_chunk && usage_only(&chunk))
    }

    /// Bytes still held because their event never ended (the stream was cut).
    pub fn unfinished(&self) -> usize {
        self.partial.len()
    }
}

fn usage_only(chunk: &serde_json::Value) -> bool {
    chunk["choices"].as_array().is_some_and(Vec::is_empty) && !chunk["usage"].is_null()
}

fn is_usage_only(event: &[u8]) -> bool {
    event_data(event)
        .and_then(|data| serde_json::from_slice::<serde_json::Value>(data).ok())
        .is_some_and(|chunk| usage_only(&chunk))
}

/// OpenAI's usage object (chat, completions and embeddings share the names).
pub fn parse_usage(usage: &serde_json::Value) -> Option<TokenUsage> {
    let input = usage["prompt_tokens"].as_u64()?;
    Some(TokenUsage {
        input,
        cached_input: usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0),
        output: usage["completion_tokens"].as_u64().unwrap_or(0),
    })
}

/// End of the last complete event: just past its blank line (`\n\n` or `\r\n\r\n`).
fn last_event_end(bytes: &[u8]) -> usize {
    let mut end = 0;
    let mut i = 0;
    while i + 1 < bytes.len() {
        if bytes[i] == b'\n' && bytes[i + 1] == b'\n' {
            end = i + 2;
            i += 2;
        } else if bytes[i] == b'\n' && bytes[i + 1] == b'\r' && bytes.get(i + 2) == Some(&b'\n') {
            end = i + 3;
            i += 3;
        } else {
            i += 1;
        }
    }
    end
}

/// Splits complete events, each slice keeping its terminating blank line.
fn events(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = last_event_end_first(rest);
        let (event, tail) = rest.split_at(end);
        rest = tail;
        Some(event)
    })
}

fn last_event_end_first(bytes: &[u8]) -> usize {
    let mut i = 0;
    while i + 1 < bytes.len() {
        if bytes[i] == b'\n' && bytes[i + 1] == b'\n' {
            return i + 2;
        }
        if bytes[i] == b'\n' && bytes[i + 1] == b'\r' && bytes.get(i + 2) == Some(&b'\n') {
            return i + 3;
        }
        i += 1;
    }
    bytes.len()
}

/// The payload of an event's `data:` line. OpenAI sends one data line per event; multi-line
/// data would be joined with newlines, which no OpenAI-compatible provider emits.
fn event_data(event: &[u8]) -> Option<&[u8]> {
    event
        .split(|b| *b == b'\n')
        .find_map(|line| line.strip_prefix(b"data:"))
        .map(|data| data.trim_ascii())
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
                output: 2
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
    fn crlf_events_are_events() {
        let mut tap = SseTap::new(false);
        let out = tap.feed(Bytes::from_static(b"data: [DONE]\r\n\r\n"));
        assert_eq!(out.len(), 16);
        assert!(tap.saw_done);
    }
}
