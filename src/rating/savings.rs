//! What routing saved: the list cost of the requests the router placed (`model = "auto"`),
//! against the list cost of the same tokens on a baseline tier — by default the dearest, as if
//! every such request had gone to the frontier. A baseline tier's cost is its models' list
//! costs weighted as the router spreads requests over them.

use serde::Serialize;

use crate::config::Config;
use crate::meter::record::TokenUsage;
use crate::money::Money;
use crate::rating::ledger::UsageRow;

/// Route rules of requests the router did not place: a named model, a stored response's model.
const NOT_ROUTED: [&str; 3] = ["", "direct", "previous_response"];

/// One route rule and model's requests, priced as served and on the baseline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SavingLine {
    pub rule: String,
    pub model: String,
    pub requests: u64,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: Money,
    pub baseline_cost_usd: Money,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Savings {
    pub baseline_tier: String,
    pub data: Vec<SavingLine>,
    pub requests: u64,
    pub cost_usd: Money,
    pub baseline_cost_usd: Money,
    pub saving_usd: Money,
    /// The saving as a share of the baseline's cost, in percent (0 without a baseline cost).
    pub saving_pct: f64,
}

/// The tier whose models cost the most per input and output token, weighted as routed.
pub fn dearest_tier(config: &Config) -> Option<String> {
    let router = config.router.as_ref()?;
    let per_token = |models: &[(String, u32)]| {
        let tokens = TokenUsage {
            input: 1_000_000,
            cached_input: 0,
            output: 1_000_000,
            cache_write_input: 0,
        };
        weighted_cost(config, models, tokens)
    };
    router
        .tiers()
        .max_by_key(|(_, models)| per_token(models))
        .map(|(name, _)| name.to_owned())
}

/// `tokens` priced on each of `models` (those still configured), weighted: the expected list
/// cost when the router spreads requests over them.
fn weighted_cost(config: &Config, models: &[(String, u32)], tokens: TokenUsage) -> Money {
    let (mut sum, mut weights) = (0_i128, 0_i128);
    for (name, weight) in models {
        if let Some(model) = config.model(name) {
            sum += i128::from(*weight) * i128::from(tokens.cost(&model.prices).nanos());
            weights += i128::from(*weight);
        }
    }
    match weights {
        0 => Money::ZERO,
        _ => Money(i64::try_from(sum / weights).unwrap_or(i64::MAX)),
    }
}

/// The saving of `rows` (usage grouped by route rule, split by model) against `baseline`.
pub fn savings(config: &Config, rows: &[UsageRow], baseline: &str) -> Savings {
    let models = config
        .router
        .as_ref()
        .and_then(|router| router.tiers().find(|(name, _)| *name == baseline))
        .map(|(_, models)| models.to_vec())
        .unwrap_or_default();
    let data: Vec<SavingLine> = rows
        .iter()
        .filter(|row| !NOT_ROUTED.contains(&row.group.as_str()))
        .map(|row| {
            let tokens = TokenUsage {
                input: row.input_tokens,
                cached_input: row.cached_input_tokens,
                output: row.output_tokens,
                cache_write_input: 0,
            };
            SavingLine {
                rule: row.group.clone(),
                model: row.split.clone().unwrap_or_default(),
                requests: row.requests,
                input_tokens: row.input_tokens,
                cached_input_tokens: row.cached_input_tokens,
                output_tokens: row.output_tokens,
                cost_usd: row.list_cost_usd,
                baseline_cost_usd: weighted_cost(config, &models, tokens),
            }
        })
        .collect();
    let cost: Money = data.iter().map(|line| line.cost_usd).sum();
    let baseline_cost: Money = data.iter().map(|line| line.baseline_cost_usd).sum();
    let saving = Money(baseline_cost.nanos() - cost.nanos());
    let saving_pct = match baseline_cost.nanos() {
        0 => 0.0,
        total => (saving.nanos() as f64 * 1_000.0 / total as f64).round() / 10.0,
    };
    Savings {
        baseline_tier: baseline.to_owned(),
        requests: data.iter().map(|line| line.requests).sum(),
        data,
        cost_usd: cost,
        baseline_cost_usd: baseline_cost,
        saving_usd: saving,
        saving_pct,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
[upstreams.mock]
base_url = "http://127.0.0.1:9/v1"

[models.small]
upstream = "mock"
tier = "cheap"
encoding = "o200k_base"
input_per_mtok = 0.15
output_per_mtok = 0.60

[models.large]
upstream = "mock"
tier = "frontier"
encoding = "o200k_base"
input_per_mtok = 2.50
cached_input_per_mtok = 1.25
output_per_mtok = 10.00

[models.larger]
upstream = "mock"
tier = "frontier"
encoding = "o200k_base"
input_per_mtok = 3.00
output_per_mtok = 12.00

[router]
default = "cheap"
[router.tiers.frontier]
models = [{ model = "large", weight = 2 }, { model = "larger", weight = 1 }]
"#;

    fn row(rule: &str, model: &str, list_cost: i64) -> UsageRow {
        UsageRow {
            group: rule.to_owned(),
            split: Some(model.to_owned()),
            requests: 3,
            input_tokens: 1_000,
            cached_input_tokens: 400,
            output_tokens: 101,
            list_cost_usd: Money(list_cost),
            ..UsageRow::default()
        }
    }

    #[test]
    fn routed_requests_are_priced_on_the_dearest_tier_as_the_router_weights_it() {
        let config = Config::parse(CONFIG, std::path::Path::new("routes.toml")).unwrap();
        assert_eq!(dearest_tier(&config).as_deref(), Some("frontier"));
        let rows = [
            row("short", "small", 150_660),
            row("direct", "large", 999_999_999),
        ];
        let saved = savings(&config, &rows, "frontier");
        // large: 600 × 2,500 + 400 × 1,250 + 101 × 10,000 = 3,010,000 nano-dollars; larger
        // (no cached price: cached input at its input price): 1,000 × 3,000 + 101 × 12,000 =
        // 4,212,000; weighted 2 : 1 = 10,232,000 / 3 = 3,410,666.67, floored.
        assert_eq!(saved.baseline_cost_usd, Money(3_410_666));
        assert_eq!(saved.cost_usd, Money(150_660));
        assert_eq!(saved.saving_usd, Money(3_410_666 - 150_660));
        assert_eq!(saved.saving_pct, 95.6);
        assert_eq!(
            saved.requests, 3,
            "a named model's requests are not the router's"
        );
        assert_eq!(saved.data.len(), 1);
    }
}
