//! Sync-path matching with the default configuration (today a regex; re-point this target when
//! the matcher changes). A match is always under `/_matrix/client/` and ends in a sync endpoint.
#![no_main]

use libfuzzer_sys::fuzz_target;
use matrix_sync_router::config::{Config, Settings};
use std::sync::OnceLock;

fn settings() -> &'static Settings {
    static SETTINGS: OnceLock<Settings> = OnceLock::new();
    SETTINGS.get_or_init(|| Config::parse(b"").unwrap())
}

fuzz_target!(|path: &[u8]| {
    if settings().sync_paths.is_match(path) {
        assert!(path.starts_with(b"/_matrix/client/"), "{path:?}");
        assert!(
            path.ends_with(b"/sync")
                || path.ends_with(b"/events")
                || path.ends_with(b"/initialSync"),
            "{path:?}"
        );
    }
});
