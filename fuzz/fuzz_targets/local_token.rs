//! The local token decoders: native Synapse tokens (`syt_`, checksum, base64 localpart) and MAS
//! checksums. A decoded localpart comes from a token whose checksum holds; nothing panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use matrix_sync_router::tokens::{mas_checksum_ok, native, Native};

fuzz_target!(|token: &[u8]| {
    if let Native::Localpart(local) = native(token) {
        assert!(token.starts_with(b"syt_") && !local.is_empty());
    }
    if let Some(ok) = mas_checksum_ok(token) {
        assert!(token.len() >= 4);
        if ok {
            assert_eq!(token.len(), 4 + 30 + 1 + 6);
        }
    }
});
