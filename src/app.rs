//! The state every request shares: the current configuration (swapped whole on reload), the
//! tokenizer built at start-up, the key index, metrics and the usage channel.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::auth::store::KeyStore;
use crate::auth::{KeyIndex, KeyRecord};
use crate::config::Config;
use crate::meter::sink::UsageSender;
use crate::meter::tokenizer::Tokenizer;
use crate::metrics::Metrics;

pub struct App {
    config: ArcSwap<Config>,
    pub tokenizer: Tokenizer,
    pub metrics: Arc<Metrics>,
    pub usage: UsageSender,
    pub keys: KeyIndex,
    pub key_store: Arc<dyn KeyStore>,
    /// `TOLLGATE_ADMIN_TOKEN`; `None` disables the admin API.
    pub admin_token: Option<String>,
    /// Settlements (counting a finished answer, writing its record) still running on the
    /// blocking pool; shutdown waits for them before flushing the usage sink.
    pub settling: tokio_util::task::TaskTracker,
    ready: AtomicBool,
}

impl App {
    pub fn new(
        config: Config,
        tokenizer: Tokenizer,
        metrics: Arc<Metrics>,
        usage: UsageSender,
        key_store: Arc<dyn KeyStore>,
        admin_token: Option<String>,
    ) -> App {
        App {
            config: ArcSwap::from_pointee(config),
            tokenizer,
            metrics,
            usage,
            keys: KeyIndex::default(),
            key_store,
            admin_token,
            settling: tokio_util::task::TaskTracker::new(),
            ready: AtomicBool::new(false),
        }
    }

    /// The configuration a request keeps for its whole life, even across a reload.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    pub fn replace_config(&self, config: Config) {
        self.config.store(Arc::new(config));
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// A key was created or changed: the hot path sees it from the next request on.
    pub fn key_activated(&self, record: KeyRecord) {
        self.keys.put(record);
    }

    pub fn key_revoked(&self, id: &str) {
        self.keys.remove(id);
    }

    /// Live budget figures for the admin API.
    pub fn budget_view(&self, _record: &KeyRecord) -> serde_json::Value {
        serde_json::Value::Null
    }
}
