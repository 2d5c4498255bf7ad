//! matrix-sync-router: a proxy-wasm filter that pins every Matrix sync request of one user to
//! one sync worker, by resolving the access token to the user through Synapse's whoami.
//!
//! Pure parsers and codecs plus a decision engine written against the `Host` port, unit tested
//! natively: `config` (the plugin configuration), `paths` (sync-path templates), `profile` (host
//! differences), `request` (which token), `route` (sync kind, room key, key source), `tokens` (what a token says by itself), `cache` (keyed token hashes, slot keys, entry codec),
//! `slots` (the shared-data protocol), `memory` (each VM's recent answers), `metrics` (the
//! counters), `whoami` (the callout and what its answer means), `port` (the `Host` trait) and
//! `filter` (the decision engine). `host` is the proxy-wasm ABI adapter, the only unsafe code.

// A panic traps the Wasm VM and breaks every request on that worker: the filter's own code
// never unwraps, expects, panics or indexes unchecked (tests may).
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod cache;
pub mod config;
pub mod filter;
pub mod matrix;
pub mod memory;
pub mod metrics;
pub mod paths;
pub mod port;
pub mod profile;
pub mod request;
pub mod route;
pub mod slots;
pub mod tokens;
pub mod whoami;

#[cfg(all(target_arch = "wasm32", not(test)))]
mod host;
