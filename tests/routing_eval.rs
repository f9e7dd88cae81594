//! The shipped routing rules against a labelled prompt set: accuracy, confusion matrix and the
//! saving against always sending to frontier, under the example prices of `routes.toml`.
//! Run with `--nocapture` to read the report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::Path;

use rand::SeedableRng;
use serde_json::Value;
use tollgate::config::Config;
use tollgate::meter::tokenizer::{Encoding, Tokenizer};
use tollgate::money::Money;
use tollgate::route::KeyPolicy;

/// Output tokens assumed per request for the cost comparison.
const ASSUMED_OUTPUT_TOKENS: u64 = 300;

#[test]
fn shipped_rules_route_the_labelled_set() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = Config::load(&root.join("routes.toml")).unwrap();
    let router = config.router.as_ref().unwrap();
    let tokenizer = Tokenizer::new().unwrap();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let text = std::fs::read_to_string(root.join("tests/data/routing_prompts.jsonl")).unwrap();
    let mut confusion: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut by_category: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let (mut routed_cost, mut frontier_cost) = (Money::ZERO, Money::ZERO);
    let frontier = config.model("gpt-4o").unwrap();
    let mut misses = Vec::new();
    let mut total = 0;
    for line in text.lines() {
        let row: Value = serde_json::from_str(line).unwrap();
        let request = &row["request"];
        let tokens = tokenizer.count_chat_prompt(Encoding::O200kBase, request);
        let decision = router
            .decide(request, tokens, &KeyPolicy::default(), &mut rng)
            .unwrap();
        let label = row["label"].as_str().unwrap().to_owned();
        *confusion
            .entry((label.clone(), decision.tier.clone()))
            .or_default() += 1;
        let entry = by_category
            .entry(row["category"].as_str().unwrap().to_owned())
            .or_default();
        entry.1 += 1;
        if decision.tier == label {
            entry.0 += 1;
        } else {
            misses.push(format!(
                "{} → {} ({}, score {})",
                row["id"], decision.tier, decision.rule, decision.signals.score
            ));
        }
        let model = config.model(&decision.model).unwrap();
        routed_cost += model.prices.cost(0, 0, tokens, ASSUMED_OUTPUT_TOKENS);
        frontier_cost += frontier.prices.cost(0, 0, tokens, ASSUMED_OUTPUT_TOKENS);
        total += 1;
    }
    let correct: u64 = confusion
        .iter()
        .filter(|((label, tier), _)| label == tier)
        .map(|(_, n)| n)
        .sum();
    let accuracy = correct as f64 / total as f64;
    println!(
        "routing accuracy: {correct}/{total} = {:.1}%",
        accuracy * 100.0
    );
    println!("confusion (label → routed): {confusion:?}");
    for (category, (ok, n)) in &by_category {
        println!("  {category:<18} {ok}/{n}");
    }
    let saving = 1.0 - routed_cost.as_f64_usd() / frontier_cost.as_f64_usd();
    println!(
        "cost with routing ${} vs always-frontier (gpt-4o) ${}: {:.1}% saved (assuming {ASSUMED_OUTPUT_TOKENS} output tokens each)",
        routed_cost.to_usd_string(),
        frontier_cost.to_usd_string(),
        saving * 100.0
    );
    for miss in &misses {
        println!("  miss: {miss}");
    }
    assert!(total >= 300, "the set has {total} prompts");
    assert!(accuracy >= 0.90, "accuracy {:.3}", accuracy);
}
