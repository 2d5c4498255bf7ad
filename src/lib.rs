//! matrix-sync-router: a proxy-wasm filter that pins every Matrix sync request of one user to
//! one sync worker, by resolving the access token to the user through Synapse's whoami.
//!
//! Everything but `host` is plain Rust without proxy-wasm, unit tested natively:
//! `config` (the plugin configuration), `profile` (host differences), `request` (is it a sync
//! request, which token), `cache` (keyed token hashes, slots, entry codec), `whoami` (the
//! callout and what its answer means) and `filter` (the decision state machine).

pub mod cache;
pub mod config;
pub mod filter;
pub mod profile;
pub mod request;
pub mod whoami;

#[cfg(all(target_arch = "wasm32", not(test)))]
mod host;
