//! Token extraction: `find_token` and `find_token_with` (the engine's entry point, with
//! `form_body_possible`) on an arbitrary Authorization value (or none), query string (or none)
//! and Content-Type.
//!
//! Input: one flags byte, then `authorization \n query \n content-type` (missing parts are
//! None). Properties: a valid token is 1..=MAX_TOKEN_LEN visible ASCII and appears in the
//! input it came from (the header value, or the form-decoded query); both entry points agree.
#![no_main]

use libfuzzer_sys::fuzz_target;
use matrix_sync_router::request::{
    find_token, find_token_with, form_body_possible, form_decode, Token, MAX_TOKEN_LEN,
};

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let mut parts = rest.splitn(3, |&b| b == b'\n');
    let auth = parts.next().filter(|_| flags & 1 == 0);
    let query = parts.next().filter(|_| flags & 2 == 0);
    let ctype = parts.next();

    let token = find_token(auth, query);
    if let Token::Valid(t) = &token {
        assert!(!t.is_empty() && t.len() <= MAX_TOKEN_LEN);
        assert!(t.iter().all(|b| (0x21..=0x7e).contains(b)), "{t:?}");
        match auth {
            Some(a) => assert!(contains(a, t), "header token not in the header"),
            None => assert!(
                contains(&form_decode(query.unwrap()), t),
                "query token not in query"
            ),
        }
    }
    // Synapse refuses a header with any `access_token` parameter (here: a plain one).
    let plain_param = query.is_some_and(|q| {
        q.split(|&b| b == b'&' || b == b';')
            .any(|item| item.starts_with(b"access_token="))
    });
    if auth.is_some() && plain_param {
        assert!(
            matches!(token, Token::Malformed(_)),
            "header + query not refused"
        );
    }

    // As the engine asks: for a GET the same answer; for a POST with any Content-Type never a
    // panic, and never a query token trusted when the body may carry one.
    let get = || form_body_possible(Some(b"GET"), None);
    assert_eq!(find_token_with(auth, query, get), token);
    let form = form_body_possible(Some(b"POST"), ctype);
    let posted = find_token_with(auth, query, || form);
    if matches!(posted, Token::Valid(_)) && auth.is_none() {
        assert!(!form);
    }
});
