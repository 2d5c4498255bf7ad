//! `Config::parse` on arbitrary plugin configuration bytes. An accepted configuration keeps
//! every bound validation promises; a refusal always names a field; parsing is deterministic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use matrix_sync_router::config::{interpreted_header, Config, MAX_FIELD_LEN, MAX_SYNC_PATHS};

fuzz_target!(|data: &[u8]| {
    match Config::parse(data) {
        Ok(s) => {
            let c = &s.config;
            for v in [
                &c.whoami_upstream,
                &c.whoami_authority,
                &c.whoami_path,
                &c.header_name,
            ] {
                assert!(!v.is_empty() && v.len() <= MAX_FIELD_LEN, "{v:?}");
                assert!(v.bytes().all(|b| (0x21..=0x7e).contains(&b)), "{v:?}");
            }
            assert!(c.whoami_path.starts_with('/'));
            assert!(interpreted_header(&c.header_name).is_none());
            assert!(!c.sync_paths.is_empty() && c.sync_paths.len() <= MAX_SYNC_PATHS);
            assert!(c.cache_capacity >= 1 && c.cache_ttl_s >= 1);
            assert!((1..=60_000).contains(&c.whoami_timeout_ms));
            // The same bytes parse to the same configuration.
            let again = Config::parse(data).unwrap();
            assert_eq!(format!("{:?}", again.config), format!("{c:?}"));
        }
        Err(e) => {
            assert!(!e.field.is_empty(), "{e}");
            assert_eq!(Config::parse(data).unwrap_err(), e);
        }
    }
});
