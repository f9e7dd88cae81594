//! Token counting: the hot-path counter (bpe-openai) against tiktoken-rs, the reference, for
//! 1k, 4k and 32k tokens of ordinary text in both encodings, a short answer in and outside
//! ASCII, and adversarial inputs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tollgate::meter::tokenizer::{Encoding, Tokenizer};

fn text_of(tokens: usize) -> String {
    // ~10 tokens per sentence in both encodings.
    "The gateway counts every token of the prompt before it goes upstream. ".repeat(tokens / 13 + 1)
}

fn bench_counting(c: &mut Criterion) {
    let ours = Tokenizer::new().unwrap();
    let o200k = tiktoken_rs::o200k_base_singleton();
    let cl100k = tiktoken_rs::cl100k_base_singleton();
    let mut group = c.benchmark_group("count");
    for tokens in [1_000usize, 4_000, 32_000] {
        let text = text_of(tokens);
        group.throughput(Throughput::Bytes(text.len() as u64));
        for (name, encoding) in [
            ("o200k", Encoding::O200kBase),
            ("cl100k", Encoding::Cl100kBase),
        ] {
            group.bench_with_input(
                BenchmarkId::new(format!("bpe-openai/{name}"), tokens),
                &text,
                |b, t| b.iter(|| ours.count_text(encoding, t)),
            );
        }
        group.bench_with_input(
            BenchmarkId::new("tiktoken-rs/o200k", tokens),
            &text,
            |b, t| b.iter(|| o200k.encode_ordinary(t).len()),
        );
        group.bench_with_input(
            BenchmarkId::new("tiktoken-rs/cl100k", tokens),
            &text,
            |b, t| b.iter(|| cl100k.encode_ordinary(t).len()),
        );
    }
    group.finish();

    // A short answer as the hot path counts it: plain ASCII is split by hand, anything else
    // by the encoding's regex (the same answer with one character outside ASCII).
    let mut answer = c.benchmark_group("answer");
    let ascii = "The quick brown fox jumps over the lazy dog, and it's 12 o'clock.";
    let unicode = ascii.replace("dog", "d\u{f6}g");
    for (name, text) in [("ascii", ascii), ("non-ascii", unicode.as_str())] {
        answer.throughput(Throughput::Bytes(text.len() as u64));
        answer.bench_with_input(BenchmarkId::new("bpe-openai/o200k", name), text, |b, t| {
            b.iter(|| ours.count_text(Encoding::O200kBase, t))
        });
    }
    answer.finish();

    let mut adversarial = c.benchmark_group("adversarial");
    adversarial.sample_size(10);
    // tiktoken-rs is quadratic on one long run of a character: 64 KiB already takes it most
    // of a second, so it is measured there; the hot-path counter is measured on a full MiB.
    let run_64k = "a".repeat(64 * 1024);
    let run_1m = "a".repeat(1024 * 1024);
    let digits_1m = "7".repeat(1024 * 1024);
    adversarial.bench_function("bpe-openai/o200k/1MiB-one-char", |b| {
        b.iter(|| ours.count_text(Encoding::O200kBase, &run_1m))
    });
    adversarial.bench_function("bpe-openai/o200k/1MiB-one-digit", |b| {
        b.iter(|| ours.count_text(Encoding::O200kBase, &digits_1m))
    });
    adversarial.bench_function("bpe-openai/o200k/64KiB-one-char", |b| {
        b.iter(|| ours.count_text(Encoding::O200kBase, &run_64k))
    });
    adversarial.bench_function("tiktoken-rs/o200k/64KiB-one-char", |b| {
        b.iter(|| o200k.encode_ordinary(&run_64k).len())
    });
    adversarial.finish();
}

criterion_group!(benches, bench_counting);
criterion_main!(benches);
