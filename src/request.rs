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

/// A request's headers as proxy-wasm serializes a header map: a u32 count, a (name length, value
/// length) u32 pair per header, then each name and value followed by a NUL. Read in one host call
/// (each data-returning call costs about a microsecond in Envoy) and parsed with bounds checks,
/// so a surprising host answer yields fewer headers, never a trap.
#[derive(Debug, Clone, Default)]
pub struct HeaderBlock(Vec<u8>);

impl HeaderBlock {
    pub fn from_bytes(bytes: Vec<u8>) -> HeaderBlock {
        HeaderBlock(bytes)
    }

    /// Serializes `pairs` in the same format (for local responses and for tests).
    pub fn serialize<V: AsRef<[u8]>>(pairs: &[(&str, V)]) -> HeaderBlock {
        let size: usize = pairs
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().len() + 10)
            .sum();
        let mut out = Vec::with_capacity(4 + size);
        out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
        for (k, v) in pairs {
            out.extend_from_slice(&(k.len() as u32).to_le_bytes());
            out.extend_from_slice(&(v.as_ref().len() as u32).to_le_bytes());
        }
        for (k, v) in pairs {
            out.extend_from_slice(k.as_bytes());
            out.push(0);
            out.extend_from_slice(v.as_ref());
            out.push(0);
        }
        HeaderBlock(out)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Every (name, value) in order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let bytes = &self.0[..];
        let word = move |at: usize| -> Option<usize> {
            let b = bytes.get(at..)?.first_chunk::<4>()?;
            Some(u32::from_le_bytes(*b) as usize)
        };
        let count = word(0).unwrap_or(0);
        let mut data = count.checked_mul(8).and_then(|n| n.checked_add(4));
        (0..count).map_while(move |n| {
            let (klen, vlen) = (word(4 + n * 8)?, word(8 + n * 8)?);
            let start = data?;
            let name = bytes.get(start..start.checked_add(klen)?)?;
            let vstart = start.checked_add(klen)?.checked_add(1)?;
            let value = bytes.get(vstart..vstart.checked_add(vlen)?)?;
            data = vstart.checked_add(vlen)?.checked_add(1);
            Some((name, value))
        })
    }

    /// The first value of `name` (ASCII case-insensitive: Envoy lower-cases names,
    /// ngx_wasm_module keeps the client's spelling).
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }

    /// The distinct spellings of `name` present (for hosts that remove headers by exact name).
    pub fn spellings(&self, name: &str) -> Vec<&[u8]> {
        let mut found: Vec<&[u8]> = Vec::new();
        for (n, _) in self.iter() {
            if n.eq_ignore_ascii_case(name.as_bytes()) && !found.contains(&n) {
                found.push(n);
            }
        }
        found
    }
}

/// Splits `:path` into the path and the query string (without `?`).
pub fn split_path(path: &[u8]) -> (&[u8], Option<&[u8]>) {
    match path.iter().position(|&b| b == b'?') {
        Some(i) => {
            let (path, query) = path.split_at(i);
            (path, query.get(1..))
        }
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
    fn header_blocks_round_trip_and_survive_garbage() {
        let block = HeaderBlock::serialize(&[
            (":path", &b"/sync"[..]),
            ("Authorization", b"Bearer t"),
            ("x-empty", b""),
            ("AUTHORIZATION", b"second"),
        ]);
        assert_eq!(block.get(":path"), Some(&b"/sync"[..]));
        assert_eq!(block.get("authorization"), Some(&b"Bearer t"[..]));
        assert_eq!(block.get("x-empty"), Some(&b""[..]));
        assert_eq!(block.get("missing"), None);
        assert_eq!(
            block.spellings("authorization"),
            vec![&b"Authorization"[..], &b"AUTHORIZATION"[..]]
        );
        assert_eq!(block.iter().count(), 4);
        // Truncated at every length, or with a huge count: fewer headers, no panic.
        for cut in 0..block.as_bytes().len() {
            let partial = HeaderBlock::from_bytes(block.as_bytes()[..cut].to_vec());
            assert!(partial.iter().count() <= 4);
        }
        let mut huge = block.as_bytes().to_vec();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(HeaderBlock::from_bytes(huge).iter().count() <= 4);
        assert_eq!(HeaderBlock::default().iter().count(), 0);
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
