//! What a request is: its path without the query, and which access token it carries.

use crate::config::RequestSettings;
use crate::matrix::is_user_id;
use crate::port::Host;
use crate::tokens;
use percent_encoding::percent_decode;
use std::borrow::Cow;

/// Longest token accepted. Synapse's own tokens are ~40 bytes and MAS tokens ~60; anything far
/// longer is garbage and is never sent to whoami.
pub const MAX_TOKEN_LEN: usize = 4096;

/// The access token a request carries.
#[derive(Debug, PartialEq, Eq)]
pub enum Token<'a> {
    /// No Authorization header and no `access_token` parameter (Synapse: 401 M_MISSING_TOKEN,
    /// unless a form-encoded POST body carries one): the request is spread over the workers.
    Absent,
    /// Exactly the token Synapse will authenticate, well-formed (1..=MAX_TOKEN_LEN visible
    /// ASCII): looked up and resolved.
    Valid(Cow<'a, [u8]>),
    /// Synapse will not authenticate a token the filter can see: it answers 401 (mixed header
    /// and query, several Authorization headers, not `Bearer <token>`, a token it cannot hold)
    /// or may take the token from a form body. Routed with the fallback key (a keyed hash of
    /// these bytes) without asking whoami: a callout could only get 401, or resolve a token
    /// that is not the one Synapse serves, and it can never inject a header.
    Malformed(Cow<'a, [u8]>),
}

/// What the filter does with a well-formed token before asking anyone.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan<'q> {
    /// A native Synapse token names its user (`native_token_server_name`): no callout.
    Local(String),
    /// Never resolved: a native token whose checksum or localpart fails, or garbage shaped like
    /// a MAS token (`refuse_bad_mas_tokens`). Synapse can only refuse it.
    Fallback,
    /// Looked up, and resolved through whoami when unknown; for an appservice token as the
    /// user it masquerades as (`?user_id=`, with `appservice_masquerading`).
    Resolve(Option<Cow<'q, str>>),
}

/// The plan for `token` (a `Token::Valid`) of a request with `query`.
pub fn plan<'q>(settings: &RequestSettings, token: &[u8], query: Option<&'q [u8]>) -> Plan<'q> {
    if let Some(server) = &settings.native_server_name {
        match tokens::native(token) {
            tokens::Native::Other => {}
            tokens::Native::Localpart(local) => {
                let user = format!("@{local}:{server}");
                return if is_user_id(&user) {
                    Plan::Local(user)
                } else {
                    Plan::Fallback
                };
            }
            tokens::Native::Broken => return Plan::Fallback,
        }
    }
    if settings.refuse_bad_mas_tokens && tokens::mas_checksum_ok(token) == Some(false) {
        return Plan::Fallback;
    }
    let masquerade = query
        .filter(|_| settings.masquerading)
        .and_then(|q| query_param(q, b"user_id"))
        .and_then(|user| match user {
            Cow::Borrowed(b) => std::str::from_utf8(b).ok().map(Cow::Borrowed),
            Cow::Owned(b) => String::from_utf8(b).ok().map(Cow::Owned),
        })
        .filter(|user| is_user_id(user));
    Plan::Resolve(masquerade)
}

/// Splits `:path` into the path and the query string (without `?`), at the first `?` like
/// Twisted's `uri.split(b"?", 1)`.
pub fn split_path(path: &[u8]) -> (&[u8], Option<&[u8]>) {
    match path.iter().position(|&b| b == b'?') {
        Some(i) => {
            let (path, query) = path.split_at(i);
            (path, query.get(1..))
        }
        None => (path, None),
    }
}

/// The token Synapse 1.163.2 will authenticate a request with, from one `Authorization` value
/// (or none) and the query string. Mirrors `Auth.get_access_token_from_request`
/// (synapse/api/auth/base.py) over Twisted's `request.args`; see [`find_token_with`] for
/// form-encoded POST bodies and docs/configuration.md, "Which token is used", for the table of
/// cases. A host hands the filter one `Authorization` value: Envoy joins repeated headers into
/// one (refused below as not `Bearer <token>`), nginx answers 400 before the filter runs.
pub fn find_token<'a>(authorization: Option<&'a [u8]>, query: Option<&'a [u8]>) -> Token<'a> {
    synapse_token(authorization, query, || false)
}

/// [`find_token`] for a request read header by header (the filter's hit path reads only what it
/// needs): `body_may_carry_token` is asked only when the token would come from the query, and
/// can look at `:method` and `content-type` then (see [`form_body_possible`]).
pub fn find_token_with<'a>(
    authorization: Option<&'a [u8]>,
    query: Option<&'a [u8]>,
    body_may_carry_token: impl FnOnce() -> bool,
) -> Token<'a> {
    synapse_token(authorization, query, body_may_carry_token)
}

/// Whether Twisted may read `access_token` from the body, from a request's `:method` and
/// (first) `content-type`: it parses the body into `request.args` for method `POST` (exactly)
/// with a `Content-Type` whose media type is `application/x-www-form-urlencoded`
/// (case-insensitive, parameters allowed, and through Python's e-mail header parser, which
/// even decodes RFC 2047 `=?..?=` words). Any value that mentions the form type or holds an
/// encoded word counts, so the check errs towards "may".
pub fn form_body_possible(method: Option<&[u8]>, content_type: Option<&[u8]>) -> bool {
    method == Some(&b"POST"[..]) && form_content_type(content_type)
}

/// [`form_body_possible`] for the current request of `host` (two header reads).
pub fn form_body_possible_in<H: Host>(host: &H) -> bool {
    let method = host.request_header(":method");
    let content_type = host.request_header("content-type");
    form_body_possible(method.as_deref(), content_type.as_deref())
}

fn form_content_type(value: Option<&[u8]>) -> bool {
    value.is_some_and(|v| {
        let v = v.to_ascii_lowercase();
        contains(&v, b"x-www-form-urlencoded") || contains(&v, b"=?")
    })
}

fn synapse_token<'a>(
    authorization: Option<&'a [u8]>,
    query: Option<&'a [u8]>,
    body_may_carry_token: impl FnOnce() -> bool,
) -> Token<'a> {
    let query_token = query.and_then(query_access_token);
    let Some(header) = authorization else {
        return match query_token {
            // Twisted's `args.update` lets a body `access_token` replace the query's.
            Some(token) if body_may_carry_token() => Token::Malformed(token),
            Some(token) => classify(token),
            None => Token::Absent,
        };
    };
    // Synapse: 401 M_MISSING_TOKEN for "Mixing Authorization headers and access_token query
    // parameters" and "Invalid Authorization header".
    if query_token.is_some() {
        return Token::Malformed(Cow::Borrowed(header));
    }
    match bearer_token(header) {
        Some(token) => classify(Cow::Borrowed(token)),
        None => Token::Malformed(Cow::Borrowed(header)),
    }
}

/// `Bearer <token>` exactly as Synapse reads it: Twisted strips spaces and tabs around the
/// value, Synapse splits it on single spaces and wants exactly `[b"Bearer", token]` (the scheme
/// is case-sensitive; `Bearer  t`, `Bearer\tt`, `bearer t` are all 401).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let token = trim(value).strip_prefix(b"Bearer ")?;
    (!token.contains(&b' ')).then_some(token)
}

/// The first `access_token` value of Twisted's `parse_qs(query, keep_blank_values=1)`, so
/// `access%5Ftoken=` and `%61ccess_token=` are the same parameter (see [`query_param`]). The
/// first occurrence wins (`args[b"access_token"][0]`), even when it is blank.
fn query_access_token(query: &[u8]) -> Option<Cow<'_, [u8]>> {
    query_param(query, b"access_token")
}

/// The first value of query parameter `name` as Twisted's `parse_qs` reads it: items split on
/// `&` and `;`, an item without `=` skipped, name and value form-decoded (`+` is a space, then
/// `%XX` decoded).
pub fn query_param<'q>(query: &'q [u8], name: &[u8]) -> Option<Cow<'q, [u8]>> {
    query
        .split(|&b| b == b'&' || b == b';')
        .filter_map(|item| {
            let eq = item.iter().position(|&b| b == b'=')?;
            let (name, value) = item.split_at(eq);
            Some((name, value.get(1..).unwrap_or_default()))
        })
        // A raw name that decodes to `name` has 1 to 3 bytes for each of its bytes.
        .find(|(raw, _)| {
            (name.len()..=3 * name.len()).contains(&raw.len()) && form_decode(raw) == name
        })
        .map(|(_, value)| form_decode(value))
}

/// Twisted's `unquote_to_bytes(s.replace(b"+", b" "))`: `+` becomes a space, then every `%XX`
/// with two hex digits becomes its byte; any other `%` stays as it is (one pass, not repeated).
pub fn form_decode(raw: &[u8]) -> Cow<'_, [u8]> {
    if raw.contains(&b'+') {
        let spaced: Vec<u8> = raw
            .iter()
            .map(|&b| if b == b'+' { b' ' } else { b })
            .collect();
        Cow::Owned(percent_decode(&spaced).collect())
    } else {
        percent_decode(raw).into()
    }
}

/// Valid: 1..=MAX_TOKEN_LEN bytes of visible ASCII, the only tokens that can be sent to whoami
/// as `Authorization: Bearer`. Anything else Synapse cannot resolve to a user (it answers 401
/// M_UNKNOWN_TOKEN, or fails to decode non-ASCII).
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
    v.get(start..end).unwrap_or_default()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_query() {
        assert_eq!(
            split_path(b"/a/sync?since=1&x"),
            (&b"/a/sync"[..], Some(&b"since=1&x"[..]))
        );
        assert_eq!(split_path(b"/a/sync"), (&b"/a/sync"[..], None));
        assert_eq!(split_path(b"/a?"), (&b"/a"[..], Some(&b""[..])));
        assert_eq!(split_path(b"/a?b?c"), (&b"/a"[..], Some(&b"b?c"[..])));
    }

    /// What the filter expects for a case.
    #[derive(Debug)]
    enum Want<'w> {
        Absent,
        Valid(&'w str),
        Malformed(&'w [u8]),
    }

    fn check(auth: Option<&[u8]>, query: Option<&[u8]>, want: &Want<'_>, got: Token<'_>) {
        let ok = match (want, &got) {
            (Want::Absent, Token::Absent) => true,
            (Want::Valid(w), Token::Valid(t)) => t.as_ref() == w.as_bytes(),
            (Want::Malformed(w), Token::Malformed(t)) => t.as_ref() == *w,
            _ => false,
        };
        let show = |v: Option<&[u8]>| v.map(|v| String::from_utf8_lossy(v).into_owned());
        assert!(
            ok,
            "auth {:?} query {:?}: want {want:?}, got {got:?}",
            show(auth),
            show(query)
        );
    }

    /// Every case of tests/data/token_cases.json, which also records what Synapse 1.163.2 does
    /// with it; tests/e2e/test_token_extraction.py checks those outcomes against Synapse's own
    /// `get_access_token_from_request` and, for the query cases, the real Synapse behind Envoy.
    #[test]
    fn tokens_are_the_ones_synapse_authenticates() {
        let cases: Vec<serde_json::Value> =
            serde_json::from_str(include_str!("../tests/data/token_cases.json")).unwrap();
        assert!(cases.len() > 40);
        for case in &cases {
            let text = |k: &str| case[k].as_str().map(str::as_bytes);
            let (auth, query) = (text("authorization"), text("query"));
            let bytes = case["bytes"].as_str().unwrap_or_default();
            let want = match case["filter"].as_str().unwrap() {
                "absent" => Want::Absent,
                "valid" => Want::Valid(bytes),
                "malformed" => Want::Malformed(bytes.as_bytes()),
                other => panic!("unknown filter outcome {other}"),
            };
            check(auth, query, &want, find_token(auth, query));
            // The same as the engine asks, for a GET (no form body).
            let get = || form_body_possible(Some(b"GET"), None);
            check(auth, query, &want, find_token_with(auth, query, get));
        }
    }

    #[test]
    fn non_utf8_and_oversized_tokens_are_malformed() {
        let raw = b"Bearer \xff\xfe";
        check(
            Some(raw),
            None,
            &Want::Malformed(b"\xff\xfe"),
            find_token(Some(raw), None),
        );
        let long = format!("Bearer {}", "a".repeat(MAX_TOKEN_LEN + 1));
        assert!(matches!(
            find_token(Some(long.as_bytes()), None),
            Token::Malformed(t) if t.len() == MAX_TOKEN_LEN + 1
        ));
        let max = format!("Bearer {}", "a".repeat(MAX_TOKEN_LEN));
        assert!(matches!(
            find_token(Some(max.as_bytes()), None),
            Token::Valid(_)
        ));
        // 64 KiB of header: the token is malformed, never resolved.
        let huge = format!("Bearer {}", "x".repeat(64 * 1024));
        assert!(matches!(
            find_token(Some(huge.as_bytes()), None),
            Token::Malformed(_)
        ));
    }

    #[test]
    fn a_form_encoded_post_body_may_replace_the_query_token() {
        // Twisted merges a form body into `request.args` (`args.update`), so its access_token
        // wins over the query's: the query token is not trusted, the header's still is.
        let token = |auth: Option<&'static str>, q, method: &str, ctype: Option<&str>| {
            let body = || form_body_possible(Some(method.as_bytes()), ctype.map(str::as_bytes));
            find_token_with(auth.map(str::as_bytes), q, body)
        };
        let q = Some(&b"access_token=q"[..]);
        for ctype in [
            "application/x-www-form-urlencoded",
            "Application/X-WWW-Form-Urlencoded; charset=utf-8",
            "=?utf-8?q?application/x-www-form-urlencoded?=",
        ] {
            assert!(form_body_possible(Some(b"POST"), Some(ctype.as_bytes())));
            let got = token(None, q, "POST", Some(ctype));
            check(None, q, &Want::Malformed(b"q"), got);
            // Without a query token: spread, as for any token-less request.
            check(
                None,
                None,
                &Want::Absent,
                token(None, None, "POST", Some(ctype)),
            );
        }
        for (method, ctype) in [
            ("POST", Some("application/json")),
            ("GET", Some("application/x-www-form-urlencoded")),
            ("post", Some("application/x-www-form-urlencoded")), // Twisted compares b"POST"
            ("POST", None),
        ] {
            let ctype_bytes = ctype.map(str::as_bytes);
            assert!(!form_body_possible(Some(method.as_bytes()), ctype_bytes));
            check(None, q, &Want::Valid("q"), token(None, q, method, ctype));
        }
        // A header token stays valid: Synapse either uses it or answers 401 (mixing).
        let form = Some("application/x-www-form-urlencoded");
        let got = token(Some("Bearer h"), None, "POST", form);
        check(Some(b"Bearer h"), None, &Want::Valid("h"), got);
    }

    /// Python's `urllib.parse.unquote_to_bytes(s.replace(b"+", b" "))`, transcribed.
    fn python_unquote_plus(s: &[u8]) -> Vec<u8> {
        let s: Vec<u8> = s
            .iter()
            .map(|&b| if b == b'+' { b' ' } else { b })
            .collect();
        let mut bits = s.split(|&b| b == b'%');
        let mut out = bits.next().unwrap_or_default().to_vec();
        for item in bits {
            match item.get(..2).and_then(|h| std::str::from_utf8(h).ok()) {
                Some(h) if h.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    out.push(u8::from_str_radix(h, 16).unwrap());
                    out.extend_from_slice(&item[2..]);
                }
                _ => {
                    out.push(b'%');
                    out.extend_from_slice(item);
                }
            }
        }
        out
    }

    #[test]
    fn form_decoding_matches_python() {
        let alphabet = b"%+2aFgz_ ";
        // Every string of up to 4 characters over an alphabet that exercises escapes.
        let mut strings = vec![Vec::new()];
        for _ in 0..4 {
            let longer: Vec<Vec<u8>> = strings
                .iter()
                .flat_map(|s| {
                    alphabet.iter().map(move |&c| {
                        let mut t = s.clone();
                        t.push(c);
                        t
                    })
                })
                .collect();
            strings.extend(longer);
        }
        strings.dedup();
        for s in &strings {
            assert_eq!(form_decode(s).as_ref(), python_unquote_plus(s), "{s:?}");
        }
    }
}
