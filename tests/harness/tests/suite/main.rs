//! The suite over the compiled matrix-sync-router filter, under both host profiles, and the
//! harness's own checks on hand-assembled modules.
//! Needs `target/wasm32-wasip1/release/matrix_sync_router.wasm` (`just build`), or `MSR_WASM`.

mod allocations;
mod cache;
mod coalescing;
mod common;
mod config;
mod expiry;
mod failures;
mod fallback_secret;
mod handmade;
mod kong_schema;
mod lifecycle;
mod path_limit;
mod privacy;
mod readme;
mod repeated_auth;
mod robustness;
mod route;
mod size;
mod version;
