//! Invoice previews: a key's month, priced under its plan, as line items. Usage lines are sums
//! of the ledger's per-request charges, so an invoice always agrees with the key's spend.

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
            lines.push(line(
                format!("Credit pack ({} credits)", pack_micro / 1_000_000),
                json!(1),
                Some(*pack_price),
                *pack_price,
            ));
            let within = usage.micro_credits.min(*pack_micro);
            let beyond = usage.micro_credits.saturating_sub(*pack_micro);
            lines.push(line(
                "Credits used from the pack".to_owned(),
                credits(within),
                None,
                Money::ZERO,
            ));
            // Charges inside the pack add up to the part of the pack consumed; what remains
            // of the month's charges is overage.
            let pack_used = plan_pack_value(plan, within);
            if *at_zero == AtZero::Overage || beyond > 0 {
                lines.push(line(
                    "Overage credits".to_owned(),
                    credits(beyond),
                    None,
                    usage.charge - pack_used,
                ));
            }
            extra = json!({
                "credits_included": credits(*pack_micro),
                "credits_used": credits(usage.micro_credits),
                "credits_remaining": credits(pack_micro.saturating_sub(usage.micro_credits)),
            });
        }
    }
    let total = lines.iter().map(|l| l.amount_usd).sum();
    (lines, total, extra)
}

fn plan_pack_value(plan: &Plan, micro: u64) -> Money {
    match plan {
        Plan::Credits { .. } => plan.pack_value(micro),
        _ => Money::ZERO,
    }
}
