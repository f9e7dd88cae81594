//! tollgate: an OpenAI-compatible LLM gateway that authenticates, admits, routes, forwards,
//! meters and rates every request. See README.md for the request's path through the modules.

pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod error;
pub mod limits;
pub mod meter;
pub mod metrics;
pub mod money;
pub mod proxy;
pub mod server;
pub mod stream;
pub mod upstream;
