//! Cache-entry decoding: arbitrary bytes as a shared-data slot value (corrupted, truncated, or
//! written by another filter version or another plugin sharing the zone). Input: 8 bytes of
//! `now_ms`, then the slot value; the token hash is read from the value itself where an entry
//! keeps it, so the fuzzer reaches past the hash check. A user read is a Matrix user ID, and a
//! decoded entry round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use matrix_sync_router::cache::{
    claim, encode, holds_fresh_user, holds_token, lookup, Entry, Lookup, TokenHash,
};
use matrix_sync_router::matrix::is_user_id;

fuzz_target!(|data: &[u8]| {
    let Some((now, value)) = data.split_first_chunk::<8>() else {
        return;
    };
    let now = u64::from_le_bytes(*now);
    let mut hash = [0u8; 16];
    if let Some(h) = value.get(2..18) {
        hash.copy_from_slice(h);
    }
    let hash = TokenHash(hash, [0; 8]);
    let found = lookup(value, &hash, now);
    let _ = holds_token(value, &hash);
    let _ = holds_fresh_user(value, &hash, now);
    let _ = claim(value, now.saturating_add(1000));
    let expires = now.saturating_add(1000);
    match found {
        Lookup::User { user, .. } => {
            assert!(is_user_id(user), "{user:?}");
            let bytes = encode(&hash, expires, expires, &Entry::User(user));
            assert!(
                matches!(lookup(&bytes, &hash, now), Lookup::User { user: u, .. } if u == user)
            );
        }
        Lookup::Denied(r) => {
            assert!(r.status == 401 || r.status == 403);
            let bytes = encode(&hash, expires, expires, &Entry::Denied(r));
            assert_eq!(lookup(&bytes, &hash, now), Lookup::Denied(r));
            assert!(!r.body().is_empty());
        }
        Lookup::Pending { until } => assert!(until > now),
        Lookup::Backoff | Lookup::Miss => {}
    }
});
