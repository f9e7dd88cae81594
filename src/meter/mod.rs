//! Metering: counting tokens inline and carrying one usage record per request to the sink.

pub mod answer;
pub(crate) mod pretokenize;
pub mod prompt;
pub mod record;
pub mod sink;
pub mod tokenizer;
