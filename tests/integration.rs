//! The integration suite, one test binary: each module is one part of the gateway driven from
//! outside (a real gateway process or in-process server in front of the mock upstream, real
//! Redis, PostgreSQL, Chromium and SDK clients). One binary rather than one per file: each
//! test binary is linked with thin LTO against the whole crate, minutes apiece on two cores.

mod common;

mod anthropic;
mod console;
mod demo;
mod deploy;
mod groups;
mod limits;
mod observability;
mod openai_sdk;
mod proxy;
mod rating;
mod replicas;
mod responses;
mod routing;
mod routing_eval;
mod store_postgres;
mod token_counts;
