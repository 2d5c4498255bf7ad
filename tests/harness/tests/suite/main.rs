//! The suite over the compiled matrix-sync-router filter, under both host profiles.
//! Needs `target/wasm32-wasip1/release/matrix_sync_router.wasm` (`just build`), or `MSR_WASM`.

mod common;
mod lifecycle;
