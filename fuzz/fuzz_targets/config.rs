//! `Config::parse` on arbitrary plugin configuration bytes. An accepted configuration keeps
//! every bound validation promises; a refusal always names a field; parsing is deterministic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use matrix_sync_router::config::{interpreted_header, Config, KeyTarget, MAX_FIELD_LEN};

fuzz_target!(|data: &[u8]| {
    match Config::parse(data) {
        Ok(s) => {
            let w = &s.whoami;
            let header = match &s.keys.target {
                KeyTarget::Header(name) => Some(name),
                KeyTarget::NginxVariable(_) => None,
            };
            for v in [&w.upstream, &w.authority, &w.path]
                .into_iter()
                .chain(header)
            {
                assert!(!v.is_empty() && v.len() <= MAX_FIELD_LEN, "{v:?}");
                assert!(v.bytes().all(|b| (0x21..=0x7e).contains(&b)), "{v:?}");
            }
            assert!(w.path.starts_with('/'));
            if let Some(header) = header {
                assert!(interpreted_header(header).is_none());
            }
            for output in [&s.keys.sync_kind, &s.keys.room] {
                for name in output.header.iter().chain(&output.variable) {
                    assert!(!name.is_empty() && name.len() <= MAX_FIELD_LEN, "{name:?}");
                }
            }
            assert!(s.cache.capacity >= 1 && s.cache.ttl_ms >= 1000);
            assert!((1..=60_000).contains(&w.timeout_ms));
            assert!(w.max_in_flight >= 1);
            // The same bytes parse to the same settings.
            let again = Config::parse(data).unwrap();
            assert_eq!(format!("{again:?}"), format!("{s:?}"));
        }
        Err(e) => {
            assert!(!e.field.is_empty(), "{e}");
            assert_eq!(Config::parse(data).unwrap_err(), e);
        }
    }
});
