//! Sync-path matching and classification with the default configuration: a path template match
//! is always under `/_matrix/client/` and ends in a sync endpoint; the sync kind of any path and
//! query is computed without a panic; a room key taken from a path (raw, as Envoy passes it, or
//! decoded, as ngx_wasm_module does) is a room ID.
#![no_main]

use libfuzzer_sys::fuzz_target;
use matrix_sync_router::config::{Config, Settings};
use matrix_sync_router::request::split_path;
use matrix_sync_router::route::{room_id, room_id_in_decoded_path, sync_kind};
use std::sync::OnceLock;

fn settings() -> &'static Settings {
    static SETTINGS: OnceLock<Settings> = OnceLock::new();
    SETTINGS.get_or_init(|| Config::parse(b"").unwrap())
}

fuzz_target!(|path_and_query: &[u8]| {
    let (path, query) = split_path(path_and_query);
    let _ = sync_kind(path, query);
    if settings().requests.sync_paths.matches(path) {
        assert!(path.starts_with(b"/_matrix/client/"), "{path:?}");
        assert!(
            path.ends_with(b"/sync")
                || path.ends_with(b"/events")
                || path.ends_with(b"/initialSync"),
            "{path:?}"
        );
    }
    // As Envoy hands the path over (raw) and as ngx_wasm_module does (already decoded).
    let rooms = [
        room_id(&settings().keys.room_paths, path),
        room_id_in_decoded_path(&settings().keys.room_paths, path),
    ];
    for room in rooms.into_iter().flatten() {
        assert!(room.first() == Some(&b'!') && room.len() <= 255, "{room:?}");
        assert!(room.iter().all(|b| (0x21..=0x7e).contains(b)), "{room:?}");
    }
});
