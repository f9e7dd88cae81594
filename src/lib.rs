//! tollgate: an OpenAI-compatible LLM gateway that authenticates, admits, routes, forwards,
//! meters and rates every request. See README.md for the request's path through the modules.

pub mod money;
pub mod meter;
