//! What a request is: its path without the query, and which access token it carries.

use percent_encoding::percent_decode;
use std::borrow::Cow;

/// Longest token accepted. Synapse's own tokens are ~40 bytes and MAS tokens ~60; anything far
/// longer is garbage and is never sent to whoami.
pub const MAX_TOKEN_LEN: usize = 4096;

/// The access token a request carries.
#[derive(Debug, PartialEq, Eq)]
pub enum Token<'a> {
    /// No usable token at all: the request is spread over the workers.
    Absent,
    /// A well-formed token (1..=MAX_TOKEN_LEN visible ASCII): looked up and resolved.
    Valid(Cow<'a, [u8]>),
    /// Present but not something Synapse could accept (control characters, spaces, too long):
    /// routed with the fallback key without asking whoami, so it can never inject a header.
    Malformed(Cow<'a, [u8]>),
}

/// Splits `:path` into the path and the query string (without `?`).
pub fn split_path(path: &[u8]) -> (&[u8], Option<&[u8]>) {
    match path.iter().position(|&b| b == b'?') {
        Some(i) => (&path[..i], Some(&path[i + 1..])),
        None => (path, None),
    }
}

/// The token of a request: `Authorization: Bearer <token>` (scheme case-insensitive) wins over
/// the `access_token` query parameter (percent-decoded).
pub fn find_token<'a>(authorization: Option<&'a [u8]>, query: Option<&'a [u8]>) -> Token<'a> {
    if let Some(token) = authorization.and_then(bearer_token) {
        return classify(Cow::Borrowed(token));
    }
    match query.and_then(query_token) {
        Some(token) => classify(token),
        None => Token::Absent,
    }
}

fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let value = trim(value);
    if value.len() < 7 || !value[..6].eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    if value[6] != b' ' && value[6] != b'\t' {
        return None;
    }
    let token = trim(&value[7..]);
    (!token.is_empty()).then_some(token)
}

fn query_token(query: &[u8]) -> Option<Cow<'_, [u8]>> {
    query
        .split(|&b| b == b'&')
        .find_map(|pair| pair.strip_prefix(b"access_token="))
        .filter(|raw| !raw.is_empty())
        .map(|raw| {
            // In a query `+` is a space; a real token never has one, so it stays malformed.
            if raw.contains(&b'+') {
                let spaced: Vec<u8> = raw
                    .iter()
                    .map(|&b| if b == b'+' { b' ' } else { b })
                    .collect();
                Cow::Owned(percent_decode(&spaced).collect())
            } else {
                percent_decode(raw).into()
            }
        })
}

fn classify(token: Cow<'_, [u8]>) -> Token<'_> {
    let well_formed = !token.is_empty()
        && token.len() <= MAX_TOKEN_LEN
        && token.iter().all(|b| (0x21..=0x7e).contains(b));
    if well_formed {
        Token::Valid(token)
    } else {
        Token::Malformed(token)
    }
}

fn trim(v: &[u8]) -> &[u8] {
    let is_ws = |b: &u8| *b == b' ' || *b == b'\t';
    let start = v.iter().position(|b| !is_ws(b)).unwrap_or(v.len());
    let end = v.iter().rposition(|b| !is_ws(b)).map_or(start, |i| i + 1);
    &v[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(t: &str) -> Token<'_> {
        Token::Valid(Cow::Borrowed(t.as_bytes()))
    }

    #[test]
    fn splits_query() {
        assert_eq!(
            split_path(b"/a/sync?since=1&x"),
            (&b"/a/sync"[..], Some(&b"since=1&x"[..]))
        );
        assert_eq!(split_path(b"/a/sync"), (&b"/a/sync"[..], None));
        assert_eq!(split_path(b"/a?"), (&b"/a"[..], Some(&b""[..])));
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for h in [
            "Bearer syt_abc",
            "bearer syt_abc",
            "BEARER  syt_abc ",
            "Bearer\tsyt_abc",
        ] {
            assert_eq!(
                find_token(Some(h.as_bytes()), None),
                valid("syt_abc"),
                "{h}"
            );
        }
    }

    #[test]
    fn other_schemes_and_empty_tokens_are_no_token() {
        for h in [
            "Basic dXNlcjpwYXNz",
            "Bearer",
            "Bearer ",
            "Bearersyt_abc",
            "",
        ] {
            assert_eq!(find_token(Some(h.as_bytes()), None), Token::Absent, "{h}");
        }
    }

    #[test]
    fn header_wins_over_query() {
        assert_eq!(
            find_token(
                Some(b"Bearer from_header"),
                Some(b"access_token=from_query")
            ),
            valid("from_header")
        );
        // A non-bearer Authorization header leaves the query parameter in charge.
        assert_eq!(
            find_token(Some(b"Basic x"), Some(b"access_token=from_query")),
            valid("from_query")
        );
    }

    #[test]
    fn query_token_is_percent_decoded() {
        assert_eq!(
            find_token(
                None,
                Some(b"since=s1&access_token=%73%79%74_a%2Fb&full_state=true")
            ),
            valid("syt_a/b")
        );
        assert_eq!(find_token(None, Some(b"access_token=")), Token::Absent);
        assert_eq!(find_token(None, Some(b"xaccess_token=abc")), Token::Absent);
        assert_eq!(find_token(None, Some(b"since=1")), Token::Absent);
        // The first occurrence wins, like Synapse's `args[0]`.
        assert_eq!(
            find_token(None, Some(b"access_token=one&access_token=two")),
            valid("one")
        );
    }

    #[test]
    fn malformed_tokens_are_flagged() {
        assert!(matches!(
            find_token(None, Some(b"access_token=a%0D%0AX-Evil:%201")),
            Token::Malformed(_)
        ));
        assert!(matches!(
            find_token(None, Some(b"access_token=a+b")),
            Token::Malformed(_)
        ));
        assert!(matches!(
            find_token(Some("Bearer caf\u{e9}".as_bytes()), None),
            Token::Malformed(_)
        ));
        let long = format!("Bearer {}", "a".repeat(MAX_TOKEN_LEN + 1));
        assert!(matches!(
            find_token(Some(long.as_bytes()), None),
            Token::Malformed(_)
        ));
        let max = format!("Bearer {}", "a".repeat(MAX_TOKEN_LEN));
        assert!(matches!(
            find_token(Some(max.as_bytes()), None),
            Token::Valid(_)
        ));
    }
}
