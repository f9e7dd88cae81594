//! Exact money. Every amount in tollgate is an integer number of nano-dollars (1e-9 USD).
//!
//! Why nano and not micro: list prices are quoted per million tokens with up to three decimals
//! (`$0.075 / 1M`), which is a whole number of nano-dollars per token. Costing a request is then
//! a multiplication of integers with no rounding at all, so a key's spend, the ledger and an
//! invoice can never disagree. Rounding happens in exactly one place, [`Money::to_usd_string`],
//! when an amount is shown to a human, and nowhere in arithmetic.

use std::fmt;
use std::ops::{Add, AddAssign, Sub, SubAssign};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub const NANOS_PER_USD: i64 = 1_000_000_000;

/// An amount of US dollars in nano-dollars. Signed so that refunds and corrections are plain
/// subtraction; arithmetic saturates instead of wrapping, since a wrapped budget would admit
/// everything.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Money(pub i64);

impl Money {
    pub const ZERO: Money = Money(0);

    pub fn from_nanos(nanos: i64) -> Self {
        Money(nanos)
    }

    pub fn nanos(self) -> i64 {
        self.0
    }

    pub fn from_micros(micros: i64) -> Self {
        Money(micros.saturating_mul(1_000))
    }

    /// Parses a decimal dollar string such as `"12.5"` or `"0.000075"` exactly.
    /// More than nine decimals is an error rather than a silent rounding.
    pub fn parse_usd(text: &str) -> Result<Money, MoneyError> {
        let text = text.trim();
        let (negative, digits) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (whole, frac) = digits.split_once('.').unwrap_or((digits, ""));
        if whole.is_empty() && frac.is_empty() {
            return Err(MoneyError::Malformed(text.to_owned()));
        }
        if !whole.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return Err(MoneyError::Malformed(text.to_owned()));
        }
        if frac.len() > 9 {
            return Err(MoneyError::TooPrecise(text.to_owned()));
        }
        let whole: i64 = if whole.is_empty() {
            0
        } else {
            whole
                .parse()
                .map_err(|_| MoneyError::Malformed(text.to_owned()))?
        };
        let mut frac_nanos: i64 = 0;
        for (i, b) in frac.bytes().enumerate() {
            frac_nanos += i64::from(b - b'0') * 10_i64.pow(8 - i as u32);
        }
        let nanos = whole
            .checked_mul(NANOS_PER_USD)
            .and_then(|n| n.checked_add(frac_nanos))
            .ok_or_else(|| MoneyError::Malformed(text.to_owned()))?;
        Ok(Money(if negative { -nanos } else { nanos }))
    }

    /// Converts a configured float (TOML has no decimal type) by going through its shortest
    /// decimal representation, so `0.15` becomes exactly 150_000_000 nanos.
    pub fn from_config_float(value: f64) -> Result<Money, MoneyError> {
        if !value.is_finite() {
            return Err(MoneyError::Malformed(value.to_string()));
        }
        Money::parse_usd(&format!("{value}"))
    }

    /// The exact decimal amount in dollars, trailing zeros trimmed (`"0.00015"`, `"12"`).
    pub fn to_usd_string(self) -> String {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let whole = abs / NANOS_PER_USD as u64;
        let frac = abs % NANOS_PER_USD as u64;
        if frac == 0 {
            return format!("{sign}{whole}");
        }
        let frac = format!("{frac:09}");
        format!("{sign}{whole}.{}", frac.trim_end_matches('0'))
    }

    /// Dollars as a float, for Prometheus gauges only; never summed back into money.
    pub fn as_f64_usd(self) -> f64 {
        self.0 as f64 / NANOS_PER_USD as f64
    }

    pub fn times(self, count: u64) -> Money {
        Money(
            self.0
                .saturating_mul(i64::try_from(count).unwrap_or(i64::MAX)),
        )
    }

    pub fn max(self, other: Money) -> Money {
        if self >= other {
            self
        } else {
            other
        }
    }

    pub fn min(self, other: Money) -> Money {
        if self <= other {
            self
        } else {
            other
        }
    }
}

impl Add for Money {
    type Output = Money;
    fn add(self, rhs: Money) -> Money {
        Money(self.0.saturating_add(rhs.0))
    }
}

impl AddAssign for Money {
    fn add_assign(&mut self, rhs: Money) {
        *self = *self + rhs;
    }
}

impl Sub for Money {
    type Output = Money;
    fn sub(self, rhs: Money) -> Money {
        Money(self.0.saturating_sub(rhs.0))
    }
}

impl SubAssign for Money {
    fn sub_assign(&mut self, rhs: Money) {
        *self = *self - rhs;
    }
}

impl std::iter::Sum for Money {
    fn sum<I: Iterator<Item = Money>>(iter: I) -> Money {
        iter.fold(Money::ZERO, Add::add)
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "${}", self.to_usd_string())
    }
}

/// Serialized as a JSON number of dollars written with its exact decimal digits.
impl Serialize for Money {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let raw = serde_json::value::RawValue::from_string(self.to_usd_string())
            .map_err(serde::ser::Error::custom)?;
        raw.serialize(serializer)
    }
}

/// Accepts a JSON number or a string of dollars.
impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Money, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Number(serde_json::Number),
            Text(String),
        }
        let text = match Repr::deserialize(deserializer)? {
            // f64's Display never uses an exponent, unlike serde_json's (`1e-6`).
            Repr::Number(n) => match (n.as_i64(), n.as_f64()) {
                (Some(whole), _) => whole.to_string(),
                (None, Some(float)) => format!("{float}"),
                (None, None) => n.to_string(),
            },
            Repr::Text(s) => s,
        };
        Money::parse_usd(&text).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MoneyError {
    #[error("`{0}` is not a dollar amount")]
    Malformed(String),
    #[error("`{0}` has more than nine decimals; amounts are exact to the nano-dollar")]
    TooPrecise(String),
}

/// A price per million tokens, stored as whole nano-dollars per token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct TokenPrice {
    nanos_per_token: i64,
}

impl TokenPrice {
    /// `usd_per_million` must be a whole number of nano-dollars per token, i.e. at most three
    /// decimals (`0.075` is fine, `0.0755` is refused): refusing is better than a silent round.
    pub fn per_million(usd_per_million: Money) -> Result<TokenPrice, MoneyError> {
        if usd_per_million.0 % 1_000_000 != 0 {
            return Err(MoneyError::TooPrecise(usd_per_million.to_usd_string()));
        }
        Ok(TokenPrice {
            nanos_per_token: usd_per_million.0 / 1_000_000,
        })
    }

    pub fn from_nanos_per_token(nanos_per_token: i64) -> TokenPrice {
        TokenPrice { nanos_per_token }
    }

    pub fn nanos_per_token(self) -> i64 {
        self.nanos_per_token
    }

    pub fn per_million_usd(self) -> Money {
        Money(self.nanos_per_token.saturating_mul(1_000_000))
    }

    pub fn cost(self, tokens: u64) -> Money {
        Money(self.nanos_per_token).times(tokens)
    }
}

/// A model's list prices per token kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelPrices {
    pub input: TokenPrice,
    pub cached_input: TokenPrice,
    /// Input written to the provider's prompt cache (Anthropic's cache writes).
    pub cache_write_input: TokenPrice,
    pub output: TokenPrice,
}

impl ModelPrices {
    /// List cost of tokens: input read from the provider's cache, written to it, neither;
    /// output.
    pub fn cost(&self, cached: u64, written: u64, plain: u64, output: u64) -> Money {
        self.cached_input.cost(cached)
            + self.cache_write_input.cost(written)
            + self.input.cost(plain)
            + self.output.cost(output)
    }

    /// The dearest price an input token may have, for worst cases.
    pub fn top_input(&self) -> TokenPrice {
        self.input.max(self.cache_write_input)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_exactly() {
        assert_eq!(Money::parse_usd("0.15"), Ok(Money(150_000_000)));
        assert_eq!(Money::parse_usd("12"), Ok(Money(12 * NANOS_PER_USD)));
        assert_eq!(Money::parse_usd(".5"), Ok(Money(500_000_000)));
        assert_eq!(Money::parse_usd("-1.000000001"), Ok(Money(-1_000_000_001)));
        assert!(Money::parse_usd("1.0000000001").is_err());
        assert!(Money::parse_usd("1e3").is_err());
        assert!(Money::parse_usd("").is_err());
        assert_eq!(Money(150_000).to_usd_string(), "0.00015");
        assert_eq!(Money(-2_500_000_000).to_usd_string(), "-2.5");
        assert_eq!(Money(7 * NANOS_PER_USD).to_usd_string(), "7");
    }

    #[test]
    fn config_floats_become_exact() {
        assert_eq!(Money::from_config_float(0.075), Ok(Money(75_000_000)));
        assert_eq!(Money::from_config_float(2.5), Ok(Money(2_500_000_000)));
    }

    #[test]
    fn token_prices_are_whole_nanos_per_token() {
        let price = TokenPrice::per_million(Money::parse_usd("0.15").unwrap_or_default());
        assert_eq!(price.map(|p| p.cost(1_000)), Ok(Money(150_000)));
        assert!(TokenPrice::per_million(Money::parse_usd("0.0755").unwrap_or_default()).is_err());
    }

    #[test]
    fn serializes_as_a_json_number() {
        let json = serde_json::to_string(&Money(1_234_500_000)).unwrap_or_default();
        assert_eq!(json, "1.2345");
        let back: Money = serde_json::from_str("0.000001").unwrap_or_default();
        assert_eq!(back, Money(1_000));
    }
}
