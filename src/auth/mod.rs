//! Client keys: what a key is, how its secret is made and checked, and the in-memory index the
//! hot path authenticates against. Only a SHA-256 hash of a secret is ever stored; the secret is
//! shown once, at creation. The index is updated by every admin change, so a revoked key fails
//! on its very next request.

pub mod group;
pub mod store;

use std::sync::Arc;

use dashmap::DashMap;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::limits::BudgetPeriod;
use crate::money::Money;

pub type SecretHash = [u8; 32];

/// A key as stored and administered (never holding the secret).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: String,
    pub name: String,
    /// The first characters of the secret, to recognise a key in listings.
    pub prefix: String,
    #[serde(skip)]
    pub secret_hash: SecretHash,
    pub owner: Option<String>,
    pub team: Option<String>,
    pub customer: Option<String>,
    pub budget_usd: Option<Money>,
    pub budget_period: BudgetPeriod,
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
    pub max_concurrency: Option<u32>,
    /// Caps on dollars reserved per minute and per hour (see `limits::SpendRate`).
    #[serde(default)]
    pub max_usd_per_minute: Option<Money>,
    #[serde(default)]
    pub max_usd_per_hour: Option<Money>,
    /// Spend that is announced once per period and refuses nothing.
    #[serde(default)]
    pub soft_budget_usd: Option<Money>,
    /// Allowed models (configured names or the virtual routing model); `None` allows all.
    pub models: Option<Vec<String>>,
    pub plan: Option<String>,
    pub seats: u32,
    pub created_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
}

impl KeyRecord {
    /// A new key for `secret` with no limits, no plan and a monthly budget period.
    pub fn new(name: &str, secret: &str) -> KeyRecord {
        KeyRecord {
            id: new_key_id(),
            name: name.to_owned(),
            prefix: secret.chars().take(10).collect(),
            secret_hash: hash_secret(secret),
            owner: None,
            team: None,
            customer: None,
            budget_usd: None,
            budget_period: BudgetPeriod::Month,
            rpm: None,
            tpm: None,
            max_concurrency: None,
            max_usd_per_minute: None,
            max_usd_per_hour: None,
            soft_budget_usd: None,
            models: None,
            plan: None,
            seats: 1,
            created_at_ms: crate::unix_ms(),
            revoked_at_ms: None,
        }
    }

    pub fn is_revoked(&self) -> bool {
        self.revoked_at_ms.is_some()
    }

    /// The team or customer the key names.
    pub fn label(&self, level: crate::limits::Level) -> Option<&str> {
        match level {
            crate::limits::Level::Key => None,
            crate::limits::Level::Team => self.team.as_deref(),
            crate::limits::Level::Customer => self.customer.as_deref(),
        }
    }

    pub fn allows_model(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|models| models.iter().any(|m| m == model))
    }
}

/// A fresh secret: `sk-tg-` and 48 hex digits (192 random bits).
pub fn new_secret() -> String {
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    format!("sk-tg-{}", hex::encode(bytes))
}

pub fn new_key_id() -> String {
    let mut bytes = [0u8; 8];
    rand::rng().fill_bytes(&mut bytes);
    format!("key_{}", hex::encode(bytes))
}

pub fn hash_secret(secret: &str) -> SecretHash {
    Sha256::digest(secret.as_bytes()).into()
}

/// The secret from `Authorization: Bearer …`.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|token| !token.is_empty())
}

/// The hot path's view of every live key, by secret hash.
#[derive(Default)]
pub struct KeyIndex {
    /// Looked up on every request: foldhash, not SipHash, over a hash that is already uniform.
    by_hash: DashMap<SecretHash, Arc<KeyRecord>, foldhash::fast::RandomState>,
    by_id: DashMap<String, SecretHash>,
}

impl KeyIndex {
    /// Finds the live key for a presented secret. The map is keyed by the hash, and the hash
    /// is compared again in constant time so that no timing difference depends on a secret.
    pub fn authenticate(&self, secret: &str) -> Option<Arc<KeyRecord>> {
        let hash = hash_secret(secret);
        // The guard is dropped at the end of this statement: never held across an await.
        let found = self.by_hash.get(&hash).map(|entry| entry.value().clone())?;
        let same: bool = found.secret_hash.ct_eq(&hash).into();
        (same && !found.is_revoked()).then_some(found)
    }

    /// Adds or replaces a key; a revoked record removes it from the hot path.
    pub fn put(&self, record: KeyRecord) {
        if record.is_revoked() {
            self.remove(&record.id);
            return;
        }
        let hash = record.secret_hash;
        self.by_id.insert(record.id.clone(), hash);
        self.by_hash.insert(hash, Arc::new(record));
    }

    pub fn remove(&self, id: &str) {
        if let Some((_, hash)) = self.by_id.remove(id) {
            self.by_hash.remove(&hash);
        }
    }

    /// The live keys that `keep` picks.
    pub fn filtered(&self, keep: impl Fn(&KeyRecord) -> bool) -> Vec<Arc<KeyRecord>> {
        self.by_hash
            .iter()
            .filter(|entry| keep(entry.value()))
            .map(|entry| entry.value().clone())
            .collect()
    }

    /// A live key by id.
    pub fn get(&self, id: &str) -> Option<Arc<KeyRecord>> {
        let hash = *self.by_id.get(id)?;
        self.by_hash.get(&hash).map(|entry| entry.value().clone())
    }

    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn record(secret: &str) -> KeyRecord {
        KeyRecord {
            models: Some(vec!["gpt-4o-mini".into()]),
            ..KeyRecord::new("team-a", secret)
        }
    }

    #[test]
    fn revocation_takes_effect_immediately() {
        let secret = new_secret();
        assert!(secret.starts_with("sk-tg-") && secret.len() == 54);
        let index = KeyIndex::default();
        let mut key = record(&secret);
        index.put(key.clone());
        assert!(index.authenticate(&secret).is_some());
        assert!(index.authenticate("sk-tg-wrong").is_none());
        key.revoked_at_ms = Some(1);
        index.put(key);
        assert!(index.authenticate(&secret).is_none());
        assert!(index.is_empty());
    }

    #[test]
    fn allow_list() {
        let key = record(&new_secret());
        assert!(key.allows_model("gpt-4o-mini"));
        assert!(!key.allows_model("gpt-4o"));
    }
}
