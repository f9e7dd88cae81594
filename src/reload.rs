//! Hot reload of `routes.toml`, on SIGHUP and when the file changes (its modification time and
//! length are polled: no platform watcher to misbehave on network or container filesystems).
//! A config that fails validation is logged with file, line and field and the old one keeps
//! serving; requests in flight finish on the config they started with, since each holds its own
//! `Arc<Config>`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use crate::app::App;
use crate::config::{Config, ConfigError};

/// What a reload did, for logs, metrics and tests.
#[derive(Debug)]
pub enum ReloadOutcome {
    Applied,
    Rejected(ConfigError),
}

/// Loads the file again and swaps it in when valid. Settings that only apply at start-up
/// (listen addresses, data dir) keep their running values.
pub fn reload(app: &App, path: &Path) -> ReloadOutcome {
    let running = app.config();
    match Config::load(path) {
        Ok(mut fresh) => {
            fresh.server.listen = running.server.listen;
            fresh.server.admin_listen = running.server.admin_listen;
            fresh.server.data_dir = running.server.data_dir.clone();
            app.replace_config(fresh);
            app.metrics
                .config_reloads
                .with_label_values(&["applied"])
                .inc();
            tracing::info!(config = %path.display(), "configuration reloaded");
            ReloadOutcome::Applied
        }
        Err(error) => {
            app.metrics
                .config_reloads
                .with_label_values(&["rejected"])
                .inc();
            tracing::error!(%error, "configuration reload rejected; the previous one keeps serving");
            ReloadOutcome::Rejected(error)
        }
    }
}

fn fingerprint(path: &Path) -> Option<(SystemTime, u64)> {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.len()))
}

/// Runs until the process ends: reloads on SIGHUP and on a changed file.
pub async fn watch(app: Arc<App>, path: PathBuf) {
    let interval = app.config().server.reload_poll;
    let mut last = fingerprint(&path);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let signalled = async {
            match hangup.as_mut() {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let signalled = std::future::pending::<()>();
        tokio::select! {
            () = signalled => {
                last = fingerprint(&path);
                run_blocking(app.clone(), path.clone()).await;
            }
            _ = ticker.tick() => {
                let now = fingerprint(&path);
                if now != last {
                    last = now;
                    run_blocking(app.clone(), path.clone()).await;
                }
            }
        }
    }
}

/// Reading the file and building HTTP clients is blocking work.
async fn run_blocking(app: Arc<App>, path: PathBuf) {
    let _ = tokio::task::spawn_blocking(move || reload(&app, &path)).await;
}
