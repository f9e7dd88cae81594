//! The state every request shares: the current configuration (swapped whole on reload), the
//! tokenizer built at start-up, metrics and the usage channel.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::Config;
use crate::meter::sink::UsageSender;
use crate::meter::tokenizer::Tokenizer;
use crate::metrics::Metrics;

pub struct App {
    config: ArcSwap<Config>,
    pub tokenizer: Tokenizer,
    pub metrics: Arc<Metrics>,
    pub usage: UsageSender,
    ready: AtomicBool,
}

impl App {
    pub fn new(
        config: Config,
        tokenizer: Tokenizer,
        metrics: Arc<Metrics>,
        usage: UsageSender,
    ) -> App {
        App {
            config: ArcSwap::from_pointee(config),
            tokenizer,
            metrics,
            usage,
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
}
