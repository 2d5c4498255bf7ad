//! Token extraction: `find_token` and `request_token` on an arbitrary Authorization value (or
//! none), query string (or none), method and Content-Type.
//!
//! Input: one flags byte, then `authorization \n query \n content-type` (missing parts are
//! None). Properties: a valid token is 1..=MAX_TOKEN_LEN visible ASCII and appears in the
//! input it came from (the header value, or the form-decoded query); both entry points agree.
#![no_main]

use libfuzzer_sys::fuzz_target;
use matrix_sync_router::port::HeaderBlock;
use matrix_sync_router::request::{find_token, form_decode, request_token, Token, MAX_TOKEN_LEN};

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

    // The header block form gives the same answer for a GET with one Authorization header.
    let mut pairs: Vec<(&str, &[u8])> = vec![(":method", b"GET")];
    if let Some(a) = auth {
        pairs.push(("authorization", a));
    }
    assert_eq!(request_token(&HeaderBlock::serialize(&pairs), query), token);

    // A POST with any Content-Type, and a repeated header: never a panic, never a query token
    // trusted when the body may carry one.
    let mut pairs: Vec<(&str, &[u8])> = vec![(":method", b"POST")];
    if let Some(c) = ctype {
        pairs.push(("Content-Type", c));
    }
    if flags & 4 != 0 {
        if let Some(a) = auth {
            pairs.push(("Authorization", a));
            pairs.push(("AUTHORIZATION", a));
        }
    }
    let block = HeaderBlock::serialize(&pairs);
    let posted = request_token(&block, query);
    if flags & 4 != 0 && auth.is_some() {
        assert!(
            matches!(posted, Token::Malformed(_)),
            "repeated Authorization not refused"
        );
    }
    if matches!(posted, Token::Valid(_)) && auth.is_none() {
        assert!(!matrix_sync_router::request::body_may_carry_token(&block));
    }
});
