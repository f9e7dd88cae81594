//! Invoice previews: a key's month, priced under its plan, as line items. An invoice is the
//! plan's fixed parts (seats, platform fee, a credit pack's unused part) plus usage lines that
//! are sums of the ledger's per-request charges, so it always agrees with the key's spend.

use serde::Serialize;
use serde_json::{json, Value};

use super::ledger::PeriodUsage;
use super::plan::{AtZero, Plan};
use crate::money::Money;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InvoiceLine {
    pub description: String,
    pub quantity: Value,
    pub unit_price_usd: Option<Money>,
    pub amount_usd: Money,
}

fn line(description: String, quantity: Value, unit: Option<Money>, amount: Money) -> InvoiceLine {
    InvoiceLine {
        description,
        quantity,
        unit_price_usd: unit,
        amount_usd: amount,
    }
}

/// Micro-credits as a JSON decimal number of credits.
fn credits(micro: u64) -> Value {
    let text = Money(
        i64::try_from(micro)
            .unwrap_or(i64::MAX)
            .saturating_mul(1_000),
    )
    .to_usd_string();
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// The invoice's lines and total; `extra` carries plan-specific facts (credit balance…).
pub fn lines(plan: &Plan, usage: &PeriodUsage, seats: u32) -> (Vec<InvoiceLine>, Money, Value) {
    let mut lines = Vec::new();
    let mut extra = json!({});
    match plan {
        Plan::PerToken { .. } => {
            for (model, requests, input, output, charge) in &usage.by_model {
                lines.push(line(
                    format!("{model}: {requests} requests, {input} input + {output} output tokens"),
                    json!(input + output),
                    None,
                    *charge,
                ));
            }
        }
        Plan::PerSeat {
            seat_fee,
            included_tokens_per_seat,
            overage_per_token,
        } => {
            let seats = seats.max(1);
            let allowance = included_tokens_per_seat.saturating_mul(u64::from(seats));
            lines.push(line(
                format!("Seats ({seats} × ${})", seat_fee.to_usd_string()),
                json!(seats),
                Some(*seat_fee),
                seat_fee.times(u64::from(seats)),
            ));
            lines.push(line(
                format!(
                    "Included tokens used ({} of {allowance})",
                    usage.tokens.min(allowance)
                ),
                json!(usage.tokens.min(allowance)),
                None,
                Money::ZERO,
            ));
            let overage = usage.tokens.saturating_sub(allowance);
            lines.push(line(
                format!("Overage tokens ({overage})"),
                json!(overage),
                Some(Money(overage_per_token.nanos_per_token() * 1_000)),
                usage.charge,
            ));
            extra = json!({"allowance_tokens": allowance, "used_tokens": usage.tokens});
        }
        Plan::PerOutcome {
            platform_fee,
            outcomes,
        } => {
            if *platform_fee > Money::ZERO {
                lines.push(line(
                    "Platform fee".to_owned(),
                    json!(1),
                    Some(*platform_fee),
                    *platform_fee,
                ));
            }
            for (kind, quantity, charge) in &usage.outcomes {
                lines.push(line(
                    format!("Outcome `{kind}`"),
                    json!(quantity),
                    outcomes.get(kind).copied(),
                    *charge,
                ));
            }
            if usage.charge > Money::ZERO {
                lines.push(line(
                    "Usage".to_owned(),
                    json!(usage.tokens),
                    None,
                    usage.charge,
                ));
            }
        }
        Plan::Credits {
            pack_price,
            pack_micro,
            at_zero,
            ..
        } => {
            // The ledger charges each request the pack's value of the credits it burned, then
            // overage: those lines are the ledger's charges, and the pack's unused part is the
            // fixed rest of its price.
            let within = usage.micro_credits.min(*pack_micro);
            let beyond = usage.micro_credits.saturating_sub(*pack_micro);
            let pack_used = plan.pack_value(within);
            lines.push(line(
                format!("Credits used from the pack of {}", pack_micro / 1_000_000),
                credits(within),
                None,
                pack_used,
            ));
            lines.push(line(
                "Unused credits of the pack".to_owned(),
                credits(pack_micro - within),
                None,
                *pack_price - pack_used,
            ));
            if *at_zero == AtZero::Overage || beyond > 0 {
                lines.push(line(
                    "Overage credits".to_owned(),
                    credits(beyond),
                    None,
                    usage.charge - pack_used,
                ));
            }
            extra = json!({
                "pack_price_usd": pack_price,
                "credits_included": credits(*pack_micro),
                "credits_used": credits(usage.micro_credits),
                "credits_remaining": credits(pack_micro.saturating_sub(usage.micro_credits)),
            });
        }
    }
    let total = lines.iter().map(|l| l.amount_usd).sum();
    (lines, total, extra)
}
