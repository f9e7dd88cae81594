//! `tollgate route --explain`: the router's decision for a request file, or for one request
//! per line on stdin (to evaluate rules over a whole prompt set), as one JSON object per line.

use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::Context;
use serde_json::Value;

use crate::config::Config;
use crate::meter::tokenizer::{Encoding, Tokenizer};
use crate::route::KeyPolicy;

pub fn run(config: &Config, input: &Path) -> anyhow::Result<()> {
    let router = config.router.as_ref().context("the config has no router")?;
    let tokenizer = Tokenizer::new()?;
    let explain = |line: &str| -> anyhow::Result<Value> {
        let body: Value = serde_json::from_str(line).context("not a JSON chat request")?;
        let tokens = tokenizer.count_chat_prompt(Encoding::O200kBase, &body);
        // A fixed seed: the same request always explains to the same weighted pick.
        let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(0);
        let decision = router.decide(&body, tokens, &KeyPolicy::default(), &mut rng)?;
        Ok(decision.explain())
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if input == Path::new("-") {
        for (number, line) in std::io::stdin().lock().lines().enumerate() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let answer = explain(&line).unwrap_or_else(
                |error| serde_json::json!({"error": format!("line {}: {error:#}", number + 1)}),
            );
            writeln!(out, "{answer}")?;
        }
        return Ok(());
    }
    let text = std::fs::read_to_string(input)
        .with_context(|| format!("cannot read {}", input.display()))?;
    writeln!(out, "{}", explain(&text)?)?;
    Ok(())
}
