//! Cost of the SSE usage tap per streamed answer: splitting events, reading each chunk's delta
//! and usage, and (when the client did not ask for usage) removing the usage chunk.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use tollgate::stream::SseTap;

fn stream_body(words: usize) -> Vec<Bytes> {
    let mut chunks = Vec::with_capacity(words + 3);
    chunks.push(Bytes::from(
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
    ));
    for i in 0..words {
        chunks.push(Bytes::from(format!(
            "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" word{}\"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n",
            i % 50
        )));
    }
    chunks.push(Bytes::from(
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":20,\"completion_tokens\":256,\"total_tokens\":276}}\n\n",
    ));
    chunks.push(Bytes::from_static(b"data: [DONE]\n\n"));
    chunks
}

fn bench_tap(c: &mut Criterion) {
    let chunks = stream_body(256);
    let bytes: usize = chunks.iter().map(Bytes::len).sum();
    let mut group = c.benchmark_group("sse_tap");
    group.throughput(Throughput::Bytes(bytes as u64));
    let joined: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
    let split: Vec<Bytes> = joined.chunks(1000).map(Bytes::copy_from_slice).collect();
    for (name, input) in [
        ("256_chunks_strip_usage", &chunks),
        ("256_chunks_split_mid_event", &split),
    ] {
        group.bench_function(name, |b| {
            b.iter_batched(
                || input.clone(),
                |chunks| {
                    let mut tap = SseTap::new(true);
                    let mut out = 0;
                    for chunk in chunks {
                        out += tap.feed(chunk).len();
                    }
                    (out, tap.usage)
                },
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();
}

criterion_group!(benches, bench_tap);
criterion_main!(benches);
