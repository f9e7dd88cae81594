//! Cost of one routing decision for a 1k-token chat request, token counting excluded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use rand::SeedableRng;
use serde_json::json;
use tollgate::config::Config;
use tollgate::meter::tokenizer::{Encoding, Tokenizer};
use tollgate::route::KeyPolicy;

fn bench_router(c: &mut Criterion) {
    std::env::set_var("OPENAI_API_KEY", "sk-bench");
    let config = Config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("routes.toml")).unwrap();
    let router = config.router.as_ref().unwrap();
    let context =
        "Our service handles payments for small shops. Refunds are processed nightly and the \
                   ledger is reconciled against the bank statement every morning. "
            .repeat(36);
    let body = json!({
        "model": "auto",
        "messages": [
            {"role": "system", "content": "You are a careful assistant for a payments team."},
            {"role": "user", "content": format!("{context}\nGiven the above, why do refunds sometimes appear twice? List likely causes.")}
        ]
    });
    let tokens = Tokenizer::new()
        .unwrap()
        .count_chat_prompt(Encoding::O200kBase, &body);
    assert!((900..1_300).contains(&tokens), "{tokens} tokens");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
    let policy = KeyPolicy::default();
    c.bench_function("route/decide/1k-token-chat", |b| {
        b.iter(|| router.decide(&body, tokens, &policy, &mut rng).unwrap())
    });
}

criterion_group!(benches, bench_router);
criterion_main!(benches);
