//! Complexity routing. Clients ask for the virtual model (`auto` by default) and the router
//! picks a tier — or a model — by the first matching rule of `[router]`, then a model of that
//! tier by weight, keeping the tier's other models (and its fallback tier's) as fallbacks.
//! The decision is a pure function of the request body, its token count, the key's policy,
//! the config and the random draw, so `tollgate route --explain` shows exactly what serving does.

pub mod explain;
pub mod signals;

use std::collections::BTreeMap;

use rand::Rng;
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::meter::prompt::{ChatRequest, FieldRef};

pub use signals::Signals;
use signals::{measure, Detectors};

/// `[router]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRouter {
    pub virtual_model: String,
    /// Target when no rule matches: a tier or a model. Unset: `cheap` if there is such a
    /// tier, else the tier of the first model.
    pub default: Option<String>,
    pub tiers: BTreeMap<String, RawTier>,
    pub rules: Option<Vec<RawRule>>,
    pub score: RawScore,
}

impl Default for RawRouter {
    fn default() -> Self {
        RawRouter {
            virtual_model: "auto".to_owned(),
            default: None,
            tiers: BTreeMap::new(),
            rules: None,
            score: RawScore::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTier {
    /// In fallback order.
    pub models: Vec<RawTierModel>,
    pub fallback_tier: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTierModel {
    pub model: String,
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub name: String,
    pub target: String,
    #[serde(default)]
    pub when: Conditions,
}

/// All conditions present must hold. Counts compare with `_gt` (greater than) and `_lt`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Conditions {
    pub prompt_tokens_gt: Option<u64>,
    pub prompt_tokens_lt: Option<u64>,
    pub messages_gt: Option<u64>,
    pub turns_gt: Option<u64>,
    pub system_chars_gt: Option<u64>,
    pub max_output_tokens_gt: Option<u64>,
    pub has_tools: Option<bool>,
    pub has_json_schema: Option<bool>,
    pub has_images: Option<bool>,
    pub has_audio: Option<bool>,
    pub has_code: Option<bool>,
    pub has_math: Option<bool>,
    pub reasoning_cues_gt: Option<u64>,
    pub simple_cues_gt: Option<u64>,
    pub numbered_steps_gt: Option<u64>,
    pub questions_gt: Option<u64>,
    pub score_gt: Option<f64>,
    pub score_lt: Option<f64>,
    /// Any of these words or phrases in the last user message (case-insensitive).
    pub any_keywords: Option<Vec<String>>,
    /// A regex over the last user message.
    pub last_user_matches: Option<String>,
}

/// Weights of the complexity score (each signal normalised to 0..1 first) and its keyword
/// lists. The shipped defaults were set against `tests/data/routing_prompts.jsonl`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawScore {
    pub prompt_tokens: f64,
    /// Tokens at which the length signal saturates.
    pub prompt_tokens_full: u64,
    pub reasoning_cues: f64,
    pub code: f64,
    pub math: f64,
    pub tools: f64,
    pub json_schema: f64,
    pub images: f64,
    pub numbered_steps: f64,
    pub questions: f64,
    pub turns: f64,
    pub max_output_tokens: f64,
    pub simple_cues: f64,
    pub reasoning_keywords: Vec<String>,
    pub simple_keywords: Vec<String>,
}

fn words(list: &[&str]) -> Vec<String> {
    list.iter().map(|w| (*w).to_owned()).collect()
}

impl Default for RawScore {
    fn default() -> Self {
        RawScore {
            prompt_tokens: 0.25,
            prompt_tokens_full: 3_000,
            reasoning_cues: 0.35,
            code: 0.4,
            math: 0.35,
            tools: 0.3,
            json_schema: 0.2,
            images: 0.1,
            numbered_steps: 0.15,
            questions: 0.05,
            turns: 0.05,
            max_output_tokens: 0.1,
            simple_cues: -0.15,
            reasoning_keywords: words(&[
                "step by step",
                "prove",
                "proof",
                "derive",
                "derivation",
                "trade-off",
                "trade-offs",
                "tradeoff",
                "analyze",
                "analyse",
                "analysis",
                "compare and contrast",
                "evaluate",
                "design",
                "architect",
                "algorithm",
                "optimize",
                "optimise",
                "complexity",
                "debug",
                "root cause",
                "why does",
                "why is",
                "explain why",
                "reason",
                "justify",
                "implement",
                "refactor",
                "rigorous",
                "formally",
                "theorem",
                "critique",
                "strategy",
                "plan a",
                "pros and cons",
                "in depth",
                "in-depth",
                "comprehensive",
                "investigate",
                "diagnose",
                "multi-step",
                "edge cases",
                "concurrency",
                "scalable",
                "scalability",
                "scale",
                "scales",
                "calculate",
                "solve",
                "compute",
                "estimate",
                "optimal",
                "minimize",
                "maximize",
                "probability",
                "expected",
                "converge",
                "converges",
                "rigorously",
                "show that",
                "determine",
                "interact",
                "synthesize",
                "reconcile",
                "architecture",
                "distributed",
                "deadlock",
                "race condition",
                "leak",
                "leaks",
                "root-cause",
                "slow",
                "flaky",
                "fails",
                "panic",
                "segfault",
                "crash",
                "write a",
                "build a",
                "create a",
                "implement a",
                "generate a",
                "threat model",
                "viable",
                "recommend",
                "trade-offs",
                "mitigations",
                "inconsistency",
                "inconsistencies",
            ]),
            simple_keywords: words(&[
                "hi",
                "hello",
                "hey",
                "thanks",
                "thank you",
                "who is",
                "when was",
                "where is",
                "translate",
                "define",
                "spell",
                "synonym",
                "capital of",
                "summarize",
                "summarise",
                "tl;dr",
                "rewrite",
                "rephrase",
                "fix the grammar",
                "good morning",
                "how are you",
                "one sentence",
                "one word",
                "one-line",
            ]),
        }
    }
}

/// Key-level constraints on routing (pinning and forbidding tiers, the allow-list).
#[derive(Debug, Clone, Default)]
pub struct KeyPolicy {
    pub pinned_tier: Option<String>,
    pub forbidden_tiers: Vec<String>,
    pub allowed_models: Option<Vec<String>>,
}

#[derive(Debug, Clone)]
struct Rule {
    name: String,
    target: Target,
    when: Conditions,
    keywords: Option<Regex>,
    pattern: Option<Regex>,
}

#[derive(Debug, Clone, PartialEq)]
enum Target {
    Tier(String),
    Model(String),
}

#[derive(Debug, Clone)]
struct Tier {
    /// (model, weight), in fallback order.
    models: Vec<(String, u32)>,
    fallback: Option<String>,
}

/// A validated router.
#[derive(Debug)]
pub struct Router {
    pub virtual_model: String,
    default: Target,
    tiers: BTreeMap<String, Tier>,
    rules: Vec<Rule>,
    score: RawScore,
    detectors: Detectors,
    /// Each model's tier, for direct requests and explanations.
    model_tiers: BTreeMap<String, String>,
}

/// What the router decided, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub model: String,
    pub tier: String,
    pub rule: String,
    /// Models to try next, in order, if `model` fails before answering.
    pub fallbacks: Vec<String>,
    pub signals: Signals,
}

impl Decision {
    /// The `route --explain` shape: `{"model", "tier", "rule", "signals": {…, "score"}}`.
    pub fn explain(&self) -> Value {
        serde_json::json!({
            "model": self.model,
            "tier": self.tier,
            "rule": self.rule,
            "fallbacks": self.fallbacks,
            "signals": self.signals,
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RouteError {
    #[error("no model of tier `{0}` is allowed for this key")]
    NothingAllowed(String),
}

/// The built-in rules, used when `[router]` lists none. Order matters: first match wins.
fn default_rules() -> Vec<RawRule> {
    let rule = |name: &str, target: &str, when: Conditions| RawRule {
        name: name.to_owned(),
        target: target.to_owned(),
        when,
    };
    vec![
        rule(
            "long-context",
            "frontier",
            Conditions {
                prompt_tokens_gt: Some(12_000),
                ..Conditions::default()
            },
        ),
        rule(
            "tools",
            "frontier",
            Conditions {
                has_tools: Some(true),
                ..Conditions::default()
            },
        ),
        rule(
            "structured-output",
            "frontier",
            Conditions {
                has_json_schema: Some(true),
                ..Conditions::default()
            },
        ),
        rule(
            "complex",
            "frontier",
            Conditions {
                score_gt: Some(0.3),
                ..Conditions::default()
            },
        ),
    ]
}

impl Router {
    /// Every tier with its (model, weight) pairs, in name order.
    pub fn tiers(&self) -> impl Iterator<Item = (&str, &[(String, u32)])> {
        self.tiers
            .iter()
            .map(|(name, tier)| (name.as_str(), tier.models.as_slice()))
    }

    /// Validates `[router]` against the configured models (name, tier), in declaration order.
    /// Problems come back as (field path, message).
    pub fn build(
        raw: &RawRouter,
        catalog: &[(String, String)],
    ) -> Result<Router, Vec<(Vec<String>, String)>> {
        let mut problems: Vec<(Vec<String>, String)> = Vec::new();
        let path = |parts: &[&str]| parts.iter().map(|p| (*p).to_owned()).collect::<Vec<_>>();
        let model_tiers: BTreeMap<String, String> = catalog.iter().cloned().collect();
        if model_tiers.contains_key(&raw.virtual_model) {
            problems.push((
                path(&["router", "virtual_model"]),
                format!("`{}` is also a real model's name", raw.virtual_model),
            ));
        }
        // Tiers: the declared ones, and one per model `tier` not declared (weight 1, config order).
        let mut tiers: BTreeMap<String, Tier> = BTreeMap::new();
        for (name, tier) in &raw.tiers {
            if tier.models.is_empty() {
                problems.push((
                    path(&["router", "tiers", name, "models"]),
                    "a tier needs at least one model".to_owned(),
                ));
            }
            for (i, entry) in tier.models.iter().enumerate() {
                let index = i.to_string();
                if !model_tiers.contains_key(&entry.model) {
                    problems.push((
                        path(&["router", "tiers", name, "models", &index, "model"]),
                        format!("no model named `{}` in [models]", entry.model),
                    ));
                }
                if entry.weight == 0 {
                    problems.push((
                        path(&["router", "tiers", name, "models", &index, "weight"]),
                        "weights must be at least 1".to_owned(),
                    ));
                }
            }
            tiers.insert(
                name.clone(),
                Tier {
                    models: tier
                        .models
                        .iter()
                        .map(|m| (m.model.clone(), m.weight))
                        .collect(),
                    fallback: tier.fallback_tier.clone(),
                },
            );
        }
        for (model, tier) in catalog {
            if raw.tiers.contains_key(tier) {
                continue;
            }
            tiers
                .entry(tier.clone())
                .or_insert_with(|| Tier {
                    models: Vec::new(),
                    fallback: None,
                })
                .models
                .push((model.clone(), 1));
        }
        // An undeclared cheap tier falls back to frontier, the usual safety net.
        let has_frontier = tiers.contains_key("frontier");
        if let Some(cheap) = tiers.get_mut("cheap") {
            if has_frontier && cheap.fallback.is_none() && !raw.tiers.contains_key("cheap") {
                cheap.fallback = Some("frontier".to_owned());
            }
        }
        let fallback_problems: Vec<_> = tiers
            .iter()
            .filter_map(|(name, tier)| {
                tier.fallback
                    .as_ref()
                    .filter(|f| !tiers.contains_key(*f) || *f == name)
                    .map(|f| {
                        (
                            path(&["router", "tiers", name, "fallback_tier"]),
                            format!("`{f}` is not another tier"),
                        )
                    })
            })
            .collect();
        problems.extend(fallback_problems);
        let target = |text: &str, at: Vec<String>, problems: &mut Vec<(Vec<String>, String)>| {
            if tiers.contains_key(text) {
                Target::Tier(text.to_owned())
            } else if model_tiers.contains_key(text) {
                Target::Model(text.to_owned())
            } else {
                problems.push((at, format!("`{text}` is neither a tier nor a model")));
                Target::Tier(text.to_owned())
            }
        };
        let default_name = raw.default.clone().unwrap_or_else(|| {
            if tiers.contains_key("cheap") {
                "cheap".to_owned()
            } else {
                catalog
                    .first()
                    .map(|(_, tier)| tier.clone())
                    .unwrap_or_default()
            }
        });
        let default = target(&default_name, path(&["router", "default"]), &mut problems);
        let raw_rules = raw.rules.clone().unwrap_or_else(default_rules);
        let mut rules = Vec::new();
        for (i, rule) in raw_rules.iter().enumerate() {
            let index = i.to_string();
            let built_target = match &raw.rules {
                Some(_) => target(
                    &rule.target,
                    path(&["router", "rules", &index, "target"]),
                    &mut problems,
                ),
                // Built-in rules name `frontier`; without such a tier they are skipped.
                None if tiers.contains_key(&rule.target) => Target::Tier(rule.target.clone()),
                None => continue,
            };
            let keywords = match &rule.when.any_keywords {
                Some(list) => match Regex::new(&format!(
                    r"(?i)\b(?:{})",
                    list.iter()
                        .map(|w| regex::escape(w))
                        .collect::<Vec<_>>()
                        .join("|")
                )) {
                    Ok(regex) => Some(regex),
                    Err(error) => {
                        problems.push((
                            path(&["router", "rules", &index, "when", "any_keywords"]),
                            error.to_string(),
                        ));
                        None
                    }
                },
                None => None,
            };
            let pattern = match &rule.when.last_user_matches {
                Some(text) => match Regex::new(text) {
                    Ok(regex) => Some(regex),
                    Err(error) => {
                        problems.push((
                            path(&["router", "rules", &index, "when", "last_user_matches"]),
                            format!("invalid regex: {error}"),
                        ));
                        None
                    }
                },
                None => None,
            };
            if rule.name.is_empty() {
                problems.push((
                    path(&["router", "rules", &index, "name"]),
                    "rules need a name".to_owned(),
                ));
            }
            rules.push(Rule {
                name: rule.name.clone(),
                target: built_target,
                when: rule.when.clone(),
                keywords,
                pattern,
            });
        }
        let detectors =
            match Detectors::new(&raw.score.reasoning_keywords, &raw.score.simple_keywords) {
                Ok(detectors) => Some(detectors),
                Err(error) => {
                    problems.push((path(&["router", "score"]), error.to_string()));
                    None
                }
            };
        match (problems.is_empty(), detectors) {
            (true, Some(detectors)) => Ok(Router {
                virtual_model: raw.virtual_model.clone(),
                default,
                tiers,
                rules,
                score: raw.score.clone(),
                detectors,
                model_tiers,
            }),
            _ => Err(problems),
        }
    }

    pub fn is_virtual(&self, model: &str) -> bool {
        model == self.virtual_model
    }

    fn score(&self, s: &Signals) -> f64 {
        let w = &self.score;
        let ratio = |value: u64, full: u64| (value as f64 / full.max(1) as f64).min(1.0);
        let flag = |on: bool| if on { 1.0 } else { 0.0 };
        let total = w.prompt_tokens * ratio(s.prompt_tokens, w.prompt_tokens_full)
            + w.reasoning_cues * ratio(s.reasoning_cues, 1)
            + w.code * flag(s.has_code)
            + w.math * flag(s.has_math)
            + w.tools * flag(s.has_tools)
            + w.json_schema * flag(s.has_json_schema)
            + w.images * flag(s.has_images)
            + w.numbered_steps * ratio(s.numbered_steps, 3)
            + w.questions * ratio(s.questions, 3)
            + w.turns * ratio(s.turns, 6)
            + w.max_output_tokens * ratio(s.max_output_tokens.unwrap_or(0), 4_000)
            + w.simple_cues * ratio(s.simple_cues, 1);
        (total.clamp(0.0, 1.0) * 1_000.0).round() / 1_000.0
    }

    fn matches(rule: &Rule, s: &Signals, last_user: &str) -> bool {
        let c = &rule.when;
        let gt = |limit: Option<u64>, value: u64| limit.is_none_or(|l| value > l);
        let lt = |limit: Option<u64>, value: u64| limit.is_none_or(|l| value < l);
        let is = |want: Option<bool>, value: bool| want.is_none_or(|w| w == value);
        gt(c.prompt_tokens_gt, s.prompt_tokens)
            && lt(c.prompt_tokens_lt, s.prompt_tokens)
            && gt(c.messages_gt, s.messages)
            && gt(c.turns_gt, s.turns)
            && gt(c.system_chars_gt, s.system_chars)
            && gt(c.max_output_tokens_gt, s.max_output_tokens.unwrap_or(0))
            && is(c.has_tools, s.has_tools)
            && is(c.has_json_schema, s.has_json_schema)
            && is(c.has_images, s.has_images)
            && is(c.has_audio, s.has_audio)
            && is(c.has_code, s.has_code)
            && is(c.has_math, s.has_math)
            && gt(c.reasoning_cues_gt, s.reasoning_cues)
            && gt(c.simple_cues_gt, s.simple_cues)
            && gt(c.numbered_steps_gt, s.numbered_steps)
            && gt(c.questions_gt, s.questions)
            && c.score_gt.is_none_or(|l| s.score > l)
            && c.score_lt.is_none_or(|l| s.score < l)
            && rule.keywords.as_ref().is_none_or(|k| k.is_match(last_user))
            && rule.pattern.as_ref().is_none_or(|p| p.is_match(last_user))
    }

    /// Routes a request for the virtual model.
    pub fn decide(
        &self,
        body: &impl ChatRequest,
        prompt_tokens: u64,
        policy: &KeyPolicy,
        rng: &mut impl Rng,
    ) -> Result<Decision, RouteError> {
        let mut signals = measure(body, prompt_tokens, &self.detectors);
        signals.score = self.score(&signals);
        let last_user = last_user_text(body);
        let (rule, target) = self
            .rules
            .iter()
            .find(|rule| Router::matches(rule, &signals, &last_user))
            .map_or(("default".to_owned(), &self.default), |rule| {
                (rule.name.clone(), &rule.target)
            });
        let target = match (&policy.pinned_tier, target) {
            (Some(pinned), _) => Target::Tier(pinned.clone()),
            (None, target) => target.clone(),
        };
        let (tier, preferred) = match &target {
            Target::Tier(tier) => (tier.clone(), None),
            Target::Model(model) => (
                self.model_tiers.get(model).cloned().unwrap_or_default(),
                Some(model.clone()),
            ),
        };
        let mut candidates = self.candidates(&tier, policy);
        if candidates.is_empty() {
            return Err(RouteError::NothingAllowed(tier));
        }
        let first = match preferred.filter(|m| candidates.iter().any(|(c, _)| c == m)) {
            Some(model) => model,
            None => pick_weighted(
                &self
                    .tiers
                    .get(&tier)
                    .map(|t| t.models.clone())
                    .unwrap_or_default(),
                &candidates,
                rng,
            ),
        };
        candidates.retain(|(model, _)| *model != first);
        Ok(Decision {
            model: first,
            tier,
            rule,
            fallbacks: candidates.into_iter().map(|(model, _)| model).collect(),
            signals,
        })
    }

    /// The tier's allowed models, then its fallback tiers', in order, without repeats; the
    /// second element says whether the model belongs to the tier itself.
    fn candidates(&self, tier: &str, policy: &KeyPolicy) -> Vec<(String, bool)> {
        let allowed = |model: &str| {
            policy
                .allowed_models
                .as_ref()
                .is_none_or(|list| list.iter().any(|m| m == model))
        };
        let mut out: Vec<(String, bool)> = Vec::new();
        let mut current = Some(tier.to_owned());
        let mut own = true;
        let mut seen_tiers = Vec::new();
        while let Some(name) = current {
            if seen_tiers.contains(&name) || policy.forbidden_tiers.contains(&name) {
                break;
            }
            let Some(tier) = self.tiers.get(&name) else {
                break;
            };
            for (model, _) in &tier.models {
                if allowed(model) && !out.iter().any(|(m, _)| m == model) {
                    out.push((model.clone(), own));
                }
            }
            seen_tiers.push(name);
            current = tier.fallback.clone();
            own = false;
        }
        out
    }

    /// Fallbacks for a request that named a real model: the other models of its tier.
    pub fn fallbacks_for(&self, model: &str) -> Vec<String> {
        let Some(tier) = self.model_tiers.get(model) else {
            return Vec::new();
        };
        self.tiers
            .get(tier)
            .map(|t| {
                t.models
                    .iter()
                    .map(|(m, _)| m.clone())
                    .filter(|m| m != model)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Rule names and tier names, for bounded metric labels.
    pub fn rule_names(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.name.as_str())
    }
}

/// Weighted choice among the tier's own allowed models (fallback-tier models only when the
/// tier itself has none allowed).
fn pick_weighted(
    weights: &[(String, u32)],
    candidates: &[(String, bool)],
    rng: &mut impl Rng,
) -> String {
    let own: Vec<(&String, u32)> = candidates
        .iter()
        .filter(|(_, own)| *own)
        .map(|(model, _)| {
            (
                model,
                weights
                    .iter()
                    .find(|(m, _)| m == model)
                    .map_or(1, |(_, w)| *w),
            )
        })
        .collect();
    let total: u32 = own.iter().map(|(_, w)| w).sum();
    if total == 0 {
        return candidates
            .first()
            .map(|(m, _)| m.clone())
            .unwrap_or_default();
    }
    let mut draw = rng.random_range(0..total);
    for (model, weight) in &own {
        if draw < *weight {
            return (*model).clone();
        }
        draw -= weight;
    }
    own.last().map(|(m, _)| (*m).clone()).unwrap_or_default()
}

/// The last user message as rule keywords and patterns read it: bounded like the detectors'
/// scan (see [`signals::SCANNED_BYTES`]).
pub(crate) fn last_user_text(body: &impl ChatRequest) -> String {
    let mut text = String::new();
    let mut budget = signals::SCANNED_BYTES;
    let mut read = |part: &str| {
        for piece in signals::scanned(part, budget) {
            if !piece.is_empty() {
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(piece);
            }
        }
        budget = budget.saturating_sub(part.len());
    };
    let Some(messages) = body.messages() else {
        read(body.member("prompt").and_then(Value::as_str).unwrap_or(""));
        return text;
    };
    let Some(content) = messages
        .map(signals::role_and_content)
        .filter(|(role, _)| *role == Some("user"))
        .map(|(_, content)| content)
        .last()
    else {
        return text;
    };
    match content {
        FieldRef::Text(content) => read(content),
        FieldRef::Tree(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .for_each(read),
        FieldRef::Tree(_) => {}
    }
    text
}
