//! Token counts against the reference: Python tiktoken over a corpus with code, emoji, CJK,
//! whitespace runs, chat requests with names, images, tool calls and tool definitions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::path::Path;

use serde_json::Value;
use tollgate::meter::answer::Answer;
use tollgate::meter::tokenizer::{Encoding, OutputCounter, Tokenizer};

fn ours(tokenizer: &Tokenizer, encoding: Encoding, entry: &Value) -> u64 {
    let input = &entry["input"];
    match entry["kind"].as_str().unwrap() {
        "text" => tokenizer.count_text(encoding, input.as_str().unwrap()),
        "chat" => tokenizer.count_chat_prompt(encoding, input),
        "completion" => tokenizer.count_completion_prompt(encoding, input),
        "embedding" => tokenizer.count_embedding_input(encoding, input),
        "output" => {
            let body = serde_json::to_vec(input).unwrap();
            let mut output = OutputCounter::default();
            if let Some(answer) = Answer::parse(&body) {
                answer.read_output(&mut output);
            }
            output.finish(tokenizer, encoding)
        }
        other => panic!("unknown corpus kind {other}"),
    }
}

#[test]
fn counts_match_python_tiktoken_exactly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let corpus_path = root.join("tests/data/token_corpus.jsonl");
    let cache = std::process::Command::new(root.join("tests/data/setup_tiktoken_cache.sh"))
        .output()
        .unwrap();
    assert!(
        cache.status.success(),
        "{}",
        String::from_utf8_lossy(&cache.stderr)
    );
    let cache_dir = root.join(String::from_utf8(cache.stdout).unwrap().trim());
    let reference = common::run_python(
        "reference_counts.py",
        &[corpus_path.to_str().unwrap()],
        &[("TIKTOKEN_CACHE_DIR", cache_dir.to_str().unwrap())],
    );
    let corpus = std::fs::read_to_string(&corpus_path).unwrap();
    let tokenizer = Tokenizer::new().unwrap();
    let mut checked = 0;
    for (line, expected) in corpus.lines().zip(reference.lines()) {
        let entry: Value = serde_json::from_str(line).unwrap();
        let expected: Value = serde_json::from_str(expected).unwrap();
        for encoding in [Encoding::O200kBase, Encoding::Cl100kBase] {
            assert_eq!(
                ours(&tokenizer, encoding, &entry),
                expected[encoding.name()].as_u64().unwrap(),
                "{} for {}",
                encoding.name(),
                &line[..line.len().min(120)]
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 2 * corpus.lines().count());
    assert!(checked >= 120);
}

/// tiktoken-rs, the design card's counter, is kept as a second reference for plain text.
#[test]
fn hot_path_counter_agrees_with_tiktoken_rs() {
    let corpus = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/token_corpus.jsonl"),
    )
    .unwrap();
    let tokenizer = Tokenizer::new().unwrap();
    let o200k = tiktoken_rs::o200k_base_singleton();
    let cl100k = tiktoken_rs::cl100k_base_singleton();
    for line in corpus.lines() {
        let entry: Value = serde_json::from_str(line).unwrap();
        if entry["kind"] != "text" {
            continue;
        }
        let text = entry["input"].as_str().unwrap();
        assert_eq!(
            tokenizer.count_text(Encoding::O200kBase, text),
            o200k.encode_ordinary(text).len() as u64
        );
        assert_eq!(
            tokenizer.count_text(Encoding::Cl100kBase, text),
            cl100k.encode_ordinary(text).len() as u64
        );
    }
}
