//! Pricing plans and the rating of one request under them.
//!
//! Every request is rated once, when it settles, from its key's running totals for the
//! calendar month (tokens, cost at the plan's prices, credits). Two rules decide the charge:
//!
//! - **Per-token plans with a flat markup or graduated tiers** price each token on its own:
//!   the request's tokens take the next places in the month's count — its cached input
//!   tokens first (they are the prompt's leading part), then the rest of its input, then its
//!   output — and each is charged its plan price × the rate of the tier its place falls in ×
//!   (1 + markup). The request's exact amount is rounded half up to a whole nano-dollar, once.
//! - **Plans that re-price the month** (volume tiers, credit packs and their overage, per-seat
//!   allowances) have one month-to-date charge, an exact function of the month's totals,
//!   rounded half up inside it; a request is charged the difference it makes to that function.
//!   The charges of a month therefore add up to the function of the month's totals.
//!
//! Either way a key's spend, the ledger and the invoice agree to the nano-dollar, and the
//! totals every charge depends on are kept in the ledger, so a restart changes nothing.

use std::collections::BTreeMap;

use foldhash::HashMap;

use serde::Deserialize;

use super::RatedModel;
use crate::meter::record::TokenUsage;
use crate::money::{ModelPrices, Money, TokenPrice};

/// `[plans.NAME]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "snake_case")]
pub enum RawPlan {
    PerToken {
        #[serde(default)]
        markup_pct: f64,
        #[serde(default)]
        tiers: Vec<RawTier>,
        #[serde(default)]
        tier_mode: TierMode,
        /// Per-model prices replacing the list prices of `[models]`.
        #[serde(default)]
        prices: BTreeMap<String, RawPrice>,
    },
    PerSeat {
        seat_fee_usd: f64,
        included_tokens_per_seat: u64,
        overage_per_1k_tokens_usd: f64,
    },
    PerOutcome {
        #[serde(default)]
        platform_fee_usd: f64,
        outcomes: BTreeMap<String, f64>,
    },
    Credits {
        /// Monthly price of the credit pack (or platform fee) and the credits it includes.
        pack_price_usd: f64,
        pack_credits: u64,
        /// Credits burned per 1k tokens, by model tier (`cheap`, `frontier`, …).
        credits_per_1k_tokens: BTreeMap<String, f64>,
        #[serde(default)]
        at_zero: AtZero,
        /// Price of a credit beyond the pack, with `at_zero = "overage"`.
        #[serde(default)]
        overage_per_credit_usd: f64,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTier {
    /// Upper bound of the tier in tokens per month; the last tier has none.
    pub up_to_tokens: Option<u64>,
    /// Price as a percentage of the (marked-up) list price.
    pub rate_pct: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    pub input_per_mtok: f64,
    pub cached_input_per_mtok: Option<f64>,
    pub cache_write_input_per_mtok: Option<f64>,
    pub output_per_mtok: f64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TierMode {
    /// Each token at the rate of the tier it falls in.
    #[default]
    Graduated,
    /// All of the month's tokens at the rate of the tier the total reached.
    Volume,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AtZero {
    /// The pack is the key's monthly budget: requests are refused once it is used up.
    #[default]
    Stop,
    /// Credits beyond the pack are billed at the overage price.
    Overage,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tier {
    pub up_to_tokens: Option<u64>,
    /// Rate in basis points of the list price (10_000 = 100%).
    pub rate_bp: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    PerToken {
        markup_bp: i64,
        tiers: Vec<Tier>,
        mode: TierMode,
        prices: HashMap<String, ModelPrices>,
    },
    PerSeat {
        seat_fee: Money,
        included_tokens_per_seat: u64,
        overage_per_token: TokenPrice,
    },
    PerOutcome {
        platform_fee: Money,
        outcomes: BTreeMap<String, Money>,
    },
    Credits {
        pack_price: Money,
        /// Micro-credits in the pack.
        pack_micro: u64,
        /// Micro-credits burned per token, by tier (credits per 1k tokens × 1000).
        micro_per_token: HashMap<String, u64>,
        at_zero: AtZero,
        overage_per_credit: Money,
    },
}

/// A key's running totals for one month.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    pub tokens: u64,
    /// The tokens' cost at the plan's prices (its own, else the models' list prices), before
    /// markup and tiers.
    pub plan_cost: Money,
    pub micro_credits: u64,
}

impl Cursor {
    pub fn plus(self, delta: Cursor) -> Cursor {
        Cursor {
            tokens: self.tokens + delta.tokens,
            plan_cost: self.plan_cost + delta.plan_cost,
            micro_credits: self.micro_credits + delta.micro_credits,
        }
    }
}

/// One request as rating sees it: its billed tokens, the plan's prices for its model, and
/// what it adds to the month's totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metered {
    pub usage: TokenUsage,
    pub prices: ModelPrices,
    pub delta: Cursor,
}

/// What rating one request produced. `plan_cost` and `micro_credits` are its share of the
/// month's totals, kept in the ledger so that the totals can be rebuilt from it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rated {
    pub charge: Money,
    pub plan_cost: Money,
    pub micro_credits: u64,
}

const BP: i128 = 10_000;

/// `value × numerator / denominator`, rounded half up (the one rounding rule).
fn scale(value: i128, numerator: i128, denominator: i128) -> i64 {
    if denominator == 0 {
        return 0;
    }
    let product = value * numerator;
    let rounded = (2 * product + denominator).div_euclid(2 * denominator);
    i64::try_from(rounded).unwrap_or(i64::MAX)
}

/// A request's exact graduated amount, in nano-dollars × basis points of rate: its tokens take
/// the month's places from `placed` on — cached input, the rest of the input, then output —
/// each at its price and the rate of the tier its place falls in.
fn graduated(tiers: &[Tier], placed: u64, request: &Metered) -> i128 {
    let (cached, written, plain) = request.usage.input_parts();
    let prices = &request.prices;
    let runs = [
        (cached, prices.cached_input.nanos_per_token()),
        (written, prices.cache_write_input.nanos_per_token()),
        (plain, prices.input.nanos_per_token()),
        (request.usage.output, prices.output.nanos_per_token()),
    ];
    let mut exact = 0i128;
    let mut position = placed;
    for (count, price) in runs {
        let end = position + count;
        let mut floor = 0u64;
        for tier in tiers {
            let ceiling = tier.up_to_tokens.unwrap_or(u64::MAX);
            let inside = end.min(ceiling).saturating_sub(position.max(floor));
            exact += i128::from(inside) * i128::from(price) * i128::from(tier.rate_bp);
            floor = ceiling;
        }
        position = end;
    }
    exact
}

impl Plan {
    /// The default plan: list prices, no markup.
    pub fn list() -> Plan {
        Plan::PerToken {
            markup_bp: 0,
            tiers: Vec::new(),
            mode: TierMode::Graduated,
            prices: HashMap::default(),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Plan::PerToken { .. } => "per_token",
            Plan::PerSeat { .. } => "per_seat",
            Plan::PerOutcome { .. } => "per_outcome",
            Plan::Credits { .. } => "credits",
        }
    }

    fn prices<'a>(&'a self, model: &RatedModel<'a>) -> &'a ModelPrices {
        match self {
            Plan::PerToken { prices, .. } => prices.get(model.name).unwrap_or(model.prices),
            _ => model.prices,
        }
    }

    /// The month-to-date charge as a function of the running totals (see the module docs).
    fn charge_at(&self, cursor: Cursor) -> Money {
        match self {
            Plan::PerToken {
                markup_bp,
                tiers,
                mode: TierMode::Volume,
                ..
            } => {
                let rate = tiers
                    .iter()
                    .find(|t| t.up_to_tokens.is_none_or(|limit| cursor.tokens <= limit))
                    .map_or(BP as i64, |t| t.rate_bp);
                let marked = i128::from(BP as i64 + markup_bp);
                Money(scale(
                    i128::from(cursor.plan_cost.nanos()) * i128::from(rate),
                    marked,
                    BP * BP,
                ))
            }
            Plan::Credits {
                pack_price,
                pack_micro,
                at_zero,
                overage_per_credit,
                ..
            } => {
                let within = cursor.micro_credits.min(*pack_micro);
                let pack_value = scale(
                    i128::from(within),
                    i128::from(pack_price.nanos()),
                    i128::from(*pack_micro),
                );
                let beyond = cursor.micro_credits.saturating_sub(*pack_micro);
                let overage = match at_zero {
                    AtZero::Overage => scale(
                        i128::from(beyond),
                        i128::from(overage_per_credit.nanos()),
                        1_000_000,
                    ),
                    AtZero::Stop => 0,
                };
                Money(pack_value + overage)
            }
            _ => Money::ZERO,
        }
    }

    /// Rates one request and advances the cursor. `seats` matters for per-seat plans only.
    pub fn rate(
        &self,
        cursor: &mut Cursor,
        model: RatedModel<'_>,
        usage: TokenUsage,
        seats: u32,
    ) -> Rated {
        let request = self.meter(model, usage);
        let before = *cursor;
        *cursor = before.plus(request.delta);
        self.charge(before, &request, seats)
    }

    /// Whether a request's charge depends on where in the month it lands (tiers, allowances,
    /// credit packs, month-cumulative rounding), so rating must wait for the month's totals.
    pub fn reads_totals(&self) -> bool {
        match self {
            Plan::PerToken {
                tiers,
                mode: TierMode::Graduated,
                ..
            } => !tiers.is_empty(),
            Plan::PerToken { .. } | Plan::PerSeat { .. } | Plan::Credits { .. } => true,
            Plan::PerOutcome { .. } => false,
        }
    }

    /// The request under this plan, and what it adds to its key's month totals. Totals only
    /// ever add up, so the charge depends on nothing but where in the month the request's
    /// delta lands: whoever advances the totals atomically (a mutex here, one server-side
    /// increment across replicas) hands each request its own segment.
    pub fn meter(&self, model: RatedModel<'_>, usage: TokenUsage) -> Metered {
        let tokens = usage.input + usage.output;
        let micro_credits = match self {
            Plan::Credits {
                micro_per_token, ..
            } => tokens.saturating_mul(micro_per_token.get(model.tier).copied().unwrap_or(0)),
            _ => 0,
        };
        let prices = *self.prices(&model);
        Metered {
            usage,
            prices,
            delta: Cursor {
                tokens,
                plan_cost: usage.cost(&prices),
                micro_credits,
            },
        }
    }

    /// The charge of `request`, whose delta moved the month's totals on from `before`.
    pub fn charge(&self, before: Cursor, request: &Metered, seats: u32) -> Rated {
        let delta = request.delta;
        let after = before.plus(delta);
        let charge = match self {
            Plan::PerToken {
                markup_bp,
                tiers,
                mode: TierMode::Graduated,
                ..
            } => {
                let marked = i128::from(BP as i64 + markup_bp);
                let exact = if tiers.is_empty() {
                    i128::from(delta.plan_cost.nanos()) * BP
                } else {
                    graduated(tiers, before.tokens, request)
                };
                Money(scale(exact, marked, BP * BP))
            }
            Plan::PerSeat {
                included_tokens_per_seat,
                overage_per_token,
                ..
            } => {
                let allowance = included_tokens_per_seat.saturating_mul(u64::from(seats.max(1)));
                let overage = after.tokens.saturating_sub(allowance)
                    - before.tokens.saturating_sub(allowance);
                overage_per_token.cost(overage)
            }
            Plan::PerOutcome { .. } => Money::ZERO,
            Plan::PerToken { .. } | Plan::Credits { .. } => {
                self.charge_at(after) - self.charge_at(before)
            }
        };
        Rated {
            charge,
            plan_cost: delta.plan_cost,
            micro_credits: delta.micro_credits,
        }
    }

    /// The most a request of these tokens could be charged, for budget reservations.
    pub fn worst_case(&self, model: RatedModel<'_>, input: u64, output: u64) -> Money {
        let prices = self.prices(&model);
        // Any of the input may be written to the provider's cache, at its price.
        let cost = prices.top_input().cost(input) + prices.output.cost(output);
        match self {
            Plan::PerToken {
                markup_bp, tiers, ..
            } => {
                let top_rate = tiers
                    .iter()
                    .map(|t| t.rate_bp)
                    .max()
                    .unwrap_or(BP as i64)
                    .max(BP as i64);
                Money(scale(
                    i128::from(cost.nanos()) * i128::from(top_rate),
                    i128::from(BP as i64 + markup_bp),
                    BP * BP,
                ))
            }
            Plan::PerSeat {
                overage_per_token, ..
            } => overage_per_token.cost(input.saturating_add(output)),
            Plan::Credits {
                pack_price,
                pack_micro,
                micro_per_token,
                overage_per_credit,
                ..
            } => {
                let burn = input
                    .saturating_add(output)
                    .saturating_mul(micro_per_token.get(model.tier).copied().unwrap_or(0));
                let per_micro = Money(scale(
                    1,
                    i128::from(pack_price.nanos()),
                    i128::from(*pack_micro),
                ))
                .max(Money(scale(
                    1,
                    i128::from(overage_per_credit.nanos()),
                    1_000_000,
                )));
                // One nano-dollar per micro-credit of slack covers rounding inside the pack.
                Money(per_micro.nanos() + 1).times(burn)
            }
            Plan::PerOutcome { .. } => Money::ZERO,
        }
    }

    /// The part of a credit pack's price that `micro` micro-credits consumed.
    pub fn pack_value(&self, micro: u64) -> Money {
        match self {
            Plan::Credits {
                pack_price,
                pack_micro,
                ..
            } => Money(scale(
                i128::from(micro.min(*pack_micro)),
                i128::from(pack_price.nanos()),
                i128::from(*pack_micro),
            )),
            _ => Money::ZERO,
        }
    }

    /// A monthly cap implied by the plan (a credit pack under hard stop).
    pub fn implied_cap(&self) -> Option<Money> {
        match self {
            Plan::Credits {
                pack_price,
                at_zero: AtZero::Stop,
                ..
            } => Some(*pack_price),
            _ => None,
        }
    }
}

/// Validation problems, by field path.
pub type PlanProblem = (Vec<String>, String);

fn money(value: f64, path: &[&str], problems: &mut Vec<PlanProblem>) -> Money {
    match Money::from_config_float(value) {
        Ok(money) if money >= Money::ZERO => money,
        _ => {
            problems.push((
                path.iter().map(|s| (*s).to_owned()).collect(),
                format!("`{value}` is not a non-negative dollar amount with at most nine decimals"),
            ));
            Money::ZERO
        }
    }
}

fn basis_points(pct: f64, path: &[&str], problems: &mut Vec<PlanProblem>) -> i64 {
    let bp = pct * 100.0;
    if !bp.is_finite() || (bp - bp.round()).abs() > 1e-6 || bp < -10_000.0 {
        problems.push((
            path.iter().map(|s| (*s).to_owned()).collect(),
            format!("`{pct}` is not a percentage with at most two decimals"),
        ));
        return 0;
    }
    bp.round() as i64
}

/// Validates `[plans]` against the configured models (name → (list prices, tier)).
pub fn build_plans(
    raw: &BTreeMap<String, RawPlan>,
    models: &HashMap<String, (ModelPrices, String)>,
    problems: &mut Vec<PlanProblem>,
) -> HashMap<String, Plan> {
    let mut plans = HashMap::default();
    plans.insert("list".to_owned(), Plan::list());
    for (name, plan) in raw {
        let at = |leaf: &str| vec!["plans".to_owned(), name.clone(), leaf.to_owned()];
        let path = |leaf: &'static str| ["plans", name.as_str(), leaf];
        let built = match plan {
            RawPlan::PerToken {
                markup_pct,
                tiers,
                tier_mode,
                prices,
            } => {
                let mut built_tiers = Vec::new();
                let mut last: Option<u64> = Some(0);
                for (i, tier) in tiers.iter().enumerate() {
                    let index = i.to_string();
                    let tier_path = ["plans", name.as_str(), "tiers", index.as_str(), "rate_pct"];
                    match (last, tier.up_to_tokens) {
                        (None, _) => problems.push((
                            at("tiers"),
                            "only the last tier may omit `up_to_tokens`".to_owned(),
                        )),
                        (Some(previous), Some(limit)) if limit <= previous => {
                            problems.push((at("tiers"), "tiers must grow".to_owned()))
                        }
                        _ => {}
                    }
                    last = tier.up_to_tokens;
                    built_tiers.push(Tier {
                        up_to_tokens: tier.up_to_tokens,
                        rate_bp: basis_points(tier.rate_pct, &tier_path, problems),
                    });
                }
                if !built_tiers.is_empty() && last.is_some() {
                    problems.push((
                        at("tiers"),
                        "the last tier must have no `up_to_tokens`".to_owned(),
                    ));
                }
                let mut overrides = HashMap::default();
                for (model, price) in prices {
                    if !models.contains_key(model) {
                        problems.push((
                            vec!["plans".into(), name.clone(), "prices".into(), model.clone()],
                            format!("no model named `{model}` in [models]"),
                        ));
                        continue;
                    }
                    let per = |value: f64, leaf: &'static str, problems: &mut Vec<PlanProblem>| {
                        TokenPrice::per_million(money(
                            value,
                            &["plans", name.as_str(), "prices", model.as_str(), leaf],
                            problems,
                        ))
                        .unwrap_or_else(|_| {
                            problems.push((
                                vec![
                                    "plans".into(),
                                    name.clone(),
                                    "prices".into(),
                                    model.clone(),
                                    leaf.into(),
                                ],
                                "prices per 1M tokens take at most three decimals".into(),
                            ));
                            TokenPrice::default()
                        })
                    };
                    let input = per(price.input_per_mtok, "input_per_mtok", problems);
                    overrides.insert(
                        model.clone(),
                        ModelPrices {
                            input,
                            cached_input: price
                                .cached_input_per_mtok
                                .map_or(input, |v| per(v, "cached_input_per_mtok", problems)),
                            cache_write_input: price
                                .cache_write_input_per_mtok
                                .map_or(input, |v| per(v, "cache_write_input_per_mtok", problems)),
                            output: per(price.output_per_mtok, "output_per_mtok", problems),
                        },
                    );
                }
                Plan::PerToken {
                    markup_bp: basis_points(*markup_pct, &path("markup_pct"), problems),
                    tiers: built_tiers,
                    mode: *tier_mode,
                    prices: overrides,
                }
            }
            RawPlan::PerSeat {
                seat_fee_usd,
                included_tokens_per_seat,
                overage_per_1k_tokens_usd,
            } => {
                let per_1k = money(
                    *overage_per_1k_tokens_usd,
                    &path("overage_per_1k_tokens_usd"),
                    problems,
                );
                if per_1k.nanos() % 1_000 != 0 {
                    problems.push((
                        at("overage_per_1k_tokens_usd"),
                        "must be a whole number of nano-dollars per token (at most six decimals)"
                            .to_owned(),
                    ));
                }
                Plan::PerSeat {
                    seat_fee: money(*seat_fee_usd, &path("seat_fee_usd"), problems),
                    included_tokens_per_seat: *included_tokens_per_seat,
                    overage_per_token: TokenPrice::from_nanos_per_token(per_1k.nanos() / 1_000),
                }
            }
            RawPlan::PerOutcome {
                platform_fee_usd,
                outcomes,
            } => {
                if outcomes.is_empty() {
                    problems.push((
                        at("outcomes"),
                        "list at least one outcome type and its price".to_owned(),
                    ));
                }
                Plan::PerOutcome {
                    platform_fee: money(*platform_fee_usd, &path("platform_fee_usd"), problems),
                    outcomes: outcomes
                        .iter()
                        .map(|(kind, price)| {
                            (
                                kind.clone(),
                                money(
                                    *price,
                                    &["plans", name.as_str(), "outcomes", kind.as_str()],
                                    problems,
                                ),
                            )
                        })
                        .collect(),
                }
            }
            RawPlan::Credits {
                pack_price_usd,
                pack_credits,
                credits_per_1k_tokens,
                at_zero,
                overage_per_credit_usd,
            } => {
                if *pack_credits == 0 {
                    problems.push((at("pack_credits"), "must be greater than 0".to_owned()));
                }
                let mut micro_per_token = HashMap::default();
                for (tier, credits) in credits_per_1k_tokens {
                    let milli = credits * 1_000.0;
                    if !milli.is_finite() || milli < 0.0 || (milli - milli.round()).abs() > 1e-6 {
                        problems.push((
                            vec![
                                "plans".into(),
                                name.clone(),
                                "credits_per_1k_tokens".into(),
                                tier.clone(),
                            ],
                            "credits per 1k tokens take at most three decimals".into(),
                        ));
                    }
                    micro_per_token.insert(tier.clone(), milli.round().max(0.0) as u64);
                }
                // Every model must burn credits: a model whose tier is missing would be free.
                for (model, (_, tier)) in models {
                    if !micro_per_token.contains_key(tier) {
                        problems.push((
                            at("credits_per_1k_tokens"),
                            format!("no rate for tier `{tier}` (model `{model}`)"),
                        ));
                    }
                }
                Plan::Credits {
                    pack_price: money(*pack_price_usd, &path("pack_price_usd"), problems),
                    pack_micro: pack_credits.saturating_mul(1_000_000),
                    micro_per_token,
                    at_zero: *at_zero,
                    overage_per_credit: money(
                        *overage_per_credit_usd,
                        &path("overage_per_credit_usd"),
                        problems,
                    ),
                }
            }
        };
        plans.insert(name.clone(), built);
    }
    plans
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usd(text: &str) -> Money {
        Money::parse_usd(text).unwrap()
    }

    fn flat(nanos_per_token: i64) -> ModelPrices {
        let price = TokenPrice::from_nanos_per_token(nanos_per_token);
        ModelPrices {
            input: price,
            cached_input: price,
            cache_write_input: price,
            output: price,
        }
    }

    fn model<'a>(name: &'a str, prices: &'a ModelPrices, tier: &'a str) -> RatedModel<'a> {
        RatedModel { name, tier, prices }
    }

    fn tokens(input: u64, output: u64) -> TokenUsage {
        TokenUsage {
            input,
            cached_input: 0,
            output,
            cache_write_input: 0,
        }
    }

    fn plans(toml_text: &str, models: &[(&str, ModelPrices, &str)]) -> HashMap<String, Plan> {
        let raw: BTreeMap<String, RawPlan> = toml::from_str(toml_text).unwrap();
        let catalog = models
            .iter()
            .map(|(name, prices, tier)| ((*name).to_owned(), (*prices, (*tier).to_owned())))
            .collect();
        let mut problems = Vec::new();
        let built = build_plans(&raw, &catalog, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        built
    }

    #[test]
    fn per_token_list_price_with_markup() {
        // gpt-4o list: $2.50 in, $10.00 out per 1M = 2,500 and 10,000 nano-dollars per token.
        let gpt4o = ModelPrices {
            input: TokenPrice::from_nanos_per_token(2_500),
            cached_input: TokenPrice::from_nanos_per_token(1_250),
            output: TokenPrice::from_nanos_per_token(10_000),
            cache_write_input: TokenPrice::from_nanos_per_token(2_500),
        };
        let plans = plans(
            "[pro]\nkind = \"per_token\"\nmarkup_pct = 20\n",
            &[("gpt-4o", gpt4o, "frontier")],
        );
        let mut cursor = Cursor::default();
        // 1,000 in + 500 out = $0.0025 + $0.005 = $0.0075 at list; +20% = $0.009.
        let list = plans["list"].rate(
            &mut cursor,
            model("gpt-4o", &gpt4o, "frontier"),
            tokens(1_000, 500),
            1,
        );
        assert_eq!(list.charge, usd("0.0075"));
        let pro = plans["pro"].rate(
            &mut Cursor::default(),
            model("gpt-4o", &gpt4o, "frontier"),
            tokens(1_000, 500),
            1,
        );
        assert_eq!(pro.charge, usd("0.009"));
        // 400 of the 1,000 input tokens cached at half price: 600 × 2,500 + 400 × 1,250 + 5M.
        let cached = TokenUsage {
            input: 1_000,
            cached_input: 400,
            output: 500,
            cache_write_input: 0,
        };
        let rated = plans["list"].rate(
            &mut Cursor::default(),
            model("gpt-4o", &gpt4o, "frontier"),
            cached,
            1,
        );
        assert_eq!(
            rated.charge,
            Money(600 * 2_500 + 400 * 1_250 + 500 * 10_000)
        );
    }

    #[test]
    fn graduated_and_volume_tiers_across_a_boundary() {
        // 1,000 nano-dollars per token; the first 1,000 tokens a month at 100%, the rest at 50%.
        let tiers = "tiers = [{ up_to_tokens = 1000, rate_pct = 100 }, { rate_pct = 50 }]\n";
        let text = format!("[grad]\nkind = \"per_token\"\n{tiers}\n[vol]\nkind = \"per_token\"\ntier_mode = \"volume\"\n{tiers}");
        let plans = plans(&text, &[("m", flat(1_000), "cheap")]);
        let (mut g, mut v) = (Cursor::default(), Cursor::default());
        // Request A: 800 tokens, all in the first tier: $0.0008 either way.
        assert_eq!(
            plans["grad"]
                .rate(
                    &mut g,
                    model("m", &flat(1_000), "cheap"),
                    tokens(500, 300),
                    1
                )
                .charge,
            Money(800_000)
        );
        assert_eq!(
            plans["vol"]
                .rate(
                    &mut v,
                    model("m", &flat(1_000), "cheap"),
                    tokens(500, 300),
                    1
                )
                .charge,
            Money(800_000)
        );
        // Request B: 400 tokens across the boundary. Graduated: 200 × 1,000 + 200 × 500.
        assert_eq!(
            plans["grad"]
                .rate(
                    &mut g,
                    model("m", &flat(1_000), "cheap"),
                    tokens(300, 100),
                    1
                )
                .charge,
            Money(300_000)
        );
        // Volume: all 1,200 tokens now at 50% = $0.0006, so B is charged $0.0006 − $0.0008.
        assert_eq!(
            plans["vol"]
                .rate(
                    &mut v,
                    model("m", &flat(1_000), "cheap"),
                    tokens(300, 100),
                    1
                )
                .charge,
            Money(-200_000)
        );
    }

    #[test]
    fn graduated_tiers_place_cached_input_then_input_then_output() {
        // 100 nano-dollars per input token, 50 cached, 400 output; 1,000 tokens at 100%, then
        // 50%, under a 12.5% markup. 900 input (300 cached) and 300 output from the month's
        // start: 300 × 50 + 600 × 100 + 100 × 400 at 100%, 200 × 400 at 50% = 155,000, marked
        // up to 174,375.
        let prices = ModelPrices {
            input: TokenPrice::from_nanos_per_token(100),
            cached_input: TokenPrice::from_nanos_per_token(50),
            output: TokenPrice::from_nanos_per_token(400),
            cache_write_input: TokenPrice::from_nanos_per_token(100),
        };
        let plans = plans(
            "[g]\nkind = \"per_token\"\nmarkup_pct = 12.5\ntiers = [{ up_to_tokens = 1000, rate_pct = 100 }, { rate_pct = 50 }]\n",
            &[("m", prices, "cheap")],
        );
        let usage = TokenUsage {
            input: 900,
            cached_input: 300,
            output: 300,
            cache_write_input: 0,
        };
        let mut cursor = Cursor::default();
        let rated = plans["g"].rate(&mut cursor, model("m", &prices, "cheap"), usage, 1);
        assert_eq!(rated.charge, Money(174_375));
        assert_eq!(rated.plan_cost, Money(195_000));
        // The next request starts at place 1,200: all of it at 50%, 1 output token = 225.
        let rated = plans["g"].rate(&mut cursor, model("m", &prices, "cheap"), tokens(0, 1), 1);
        assert_eq!(rated.charge, Money(225));
    }

    #[test]
    fn per_seat_allowance_crossed_inside_one_request() {
        // $80 per seat including 500k tokens, then $0.02 per 1k (20 nano-dollars per token).
        let plans = plans(
            "[team]\nkind = \"per_seat\"\nseat_fee_usd = 80\nincluded_tokens_per_seat = 500000\noverage_per_1k_tokens_usd = 0.02\n",
            &[("m", flat(150), "cheap")],
        );
        let team = &plans["team"];
        let mut cursor = Cursor {
            tokens: 1_450_000,
            ..Cursor::default()
        };
        // 3 seats: 1.5M included. A 100k-token request straddles: 50k inside, 50k over = $1.
        let rated = team.rate(
            &mut cursor,
            model("m", &flat(150), "cheap"),
            tokens(60_000, 40_000),
            3,
        );
        assert_eq!(rated.charge, usd("1"));
        let rated = team.rate(
            &mut cursor,
            model("m", &flat(150), "cheap"),
            tokens(50_000, 0),
            3,
        );
        assert_eq!(rated.charge, usd("1"));
        assert_eq!(cursor.tokens, 1_600_000);
    }

    #[test]
    fn credits_run_out_under_hard_stop_and_overage() {
        // $99 for 10,000 credits; cheap models burn 1 credit per 1k tokens, frontier 10.
        let text = "[pack]\nkind = \"credits\"\npack_price_usd = 99\npack_credits = 10000\ncredits_per_1k_tokens = { cheap = 1, frontier = 10 }\n\n\
                    [flex]\nkind = \"credits\"\npack_price_usd = 99\npack_credits = 10000\ncredits_per_1k_tokens = { cheap = 1, frontier = 10 }\nat_zero = \"overage\"\noverage_per_credit_usd = 0.012\n";
        let plans = plans(
            text,
            &[
                ("mini", flat(150), "cheap"),
                ("big", flat(2_500), "frontier"),
            ],
        );
        for (name, last_charge) in [("pack", usd("9.9")), ("flex", usd("21.9"))] {
            let plan = &plans[name];
            let mut cursor = Cursor::default();
            // 900k frontier tokens = 9,000 credits = 90% of the pack = $89.10.
            let first = plan.rate(
                &mut cursor,
                model("big", &flat(2_500), "frontier"),
                tokens(600_000, 300_000),
                1,
            );
            assert_eq!(first.micro_credits, 9_000_000_000);
            assert_eq!(first.charge, usd("89.1"));
            // 2M cheap tokens = 2,000 credits: 1,000 left in the pack ($9.90), 1,000 beyond it —
            // free under hard stop (the budget refuses such requests up front), $12 as overage.
            let second = plan.rate(
                &mut cursor,
                model("mini", &flat(150), "cheap"),
                tokens(1_500_000, 500_000),
                1,
            );
            assert_eq!(second.charge, last_charge, "{name}");
        }
        assert_eq!(plans["pack"].implied_cap(), Some(usd("99")));
        assert_eq!(plans["flex"].implied_cap(), None);
    }

    #[test]
    fn validation_names_fields() {
        let raw: BTreeMap<String, RawPlan> = toml::from_str(
            "[c]\nkind = \"credits\"\npack_price_usd = 99\npack_credits = 10\ncredits_per_1k_tokens = { cheap = 1 }\n",
        )
        .unwrap();
        let catalog: HashMap<_, _> = [("big".to_owned(), (flat(1), "frontier".to_owned()))]
            .into_iter()
            .collect();
        let mut problems = Vec::new();
        build_plans(&raw, &catalog, &mut problems);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].0, vec!["plans", "c", "credits_per_1k_tokens"]);
    }
}
