//! The whoami callout: the request the filter sends and what Synapse's answer means.

use crate::config::WhoamiSettings;
use crate::matrix::{is_user_id, Errcode, Rejection};
use crate::metrics::Counter;
use crate::port::Host;
use serde::Deserialize;

/// Largest whoami body read. Synapse's answers are ~100 bytes; more is not whoami.
pub const MAX_BODY: usize = 4096;

/// Pseudo-headers and headers of the whoami request.
pub struct CalloutHeaders {
    pairs: Vec<(&'static str, String)>,
}

impl CalloutHeaders {
    pub fn as_pairs(&self) -> Vec<(&str, &str)> {
        self.pairs.iter().map(|(k, v)| (*k, v.as_str())).collect()
    }
}

/// What the whoami request copies from the client's request.
#[derive(Debug, Default, Clone, Copy)]
pub struct ClientInfo<'a> {
    pub user_agent: Option<&'a str>,
    pub forwarded_for: Option<&'a str>,
    /// Without it Synapse logs "forwarded request lacks an x-forwarded-proto header" per call.
    pub forwarded_proto: Option<&'a str>,
    /// The `source.address` property of the connection.
    pub source_address: Option<&'a str>,
    /// The appservice user the request masquerades as (`?user_id=`).
    pub masquerade: Option<&'a str>,
}

/// Builds the whoami request for `token` (already checked to be visible ASCII), carrying the
/// client's user agent and address so Synapse records the real client.
pub fn callout_headers(
    config: &WhoamiSettings,
    token: &str,
    client: ClientInfo<'_>,
) -> CalloutHeaders {
    let path = match client.masquerade {
        // Synapse honours `user_id` for appservice tokens (and ignores it for others).
        Some(user) => format!(
            "{}?user_id={}",
            config.path,
            percent_encoding::utf8_percent_encode(user, percent_encoding::NON_ALPHANUMERIC)
        ),
        None => config.path.clone(),
    };
    let mut pairs = vec![
        (":method", "GET".to_string()),
        (":path", path),
        (":authority", config.authority.clone()),
        ("authorization", format!("Bearer {token}")),
    ];
    if let Some(ua) = client.user_agent.filter(|v| is_header_text(v)) {
        pairs.push(("user-agent", ua.to_string()));
    }
    let xff = client.forwarded_for.filter(|v| is_header_text(v));
    let ip = client.source_address.and_then(client_ip);
    if let Some(xff) = extend_forwarded_for(xff, ip) {
        pairs.push(("x-forwarded-for", xff));
    }
    let proto = client.forwarded_proto.map(str::trim);
    if let Some(proto) = proto.filter(|p| matches!(*p, "http" | "https")) {
        pairs.push(("x-forwarded-proto", proto.to_string()));
    }
    CalloutHeaders { pairs }
}

/// Starts the whoami call for `token` (visible ASCII: `request::find_token` lets nothing else
/// through) from the current request, copying its client's user agent and address; the call's
/// token, or None when the host refused it. Call it from the request's own callback.
pub fn dispatch<H: Host>(
    host: &H,
    config: &WhoamiSettings,
    token: &[u8],
    masquerade: Option<&str>,
) -> Option<u32> {
    let token = std::str::from_utf8(token).ok()?;
    let ua = host.request_header("user-agent");
    let xff = host.request_header("x-forwarded-for");
    let proto = host.request_header("x-forwarded-proto");
    fn text<B: std::ops::Deref<Target = [u8]>>(v: &Option<B>) -> Option<&str> {
        v.as_deref().and_then(|v| std::str::from_utf8(v).ok())
    }
    let source = host
        .property(&["source", "address"])
        .and_then(|v| String::from_utf8(v).ok());
    let client = ClientInfo {
        user_agent: text(&ua),
        forwarded_for: text(&xff),
        forwarded_proto: text(&proto),
        source_address: source.as_deref(),
        masquerade,
    };
    let headers = callout_headers(config, token, client);
    host.dispatch(&config.upstream, &headers.as_pairs(), config.timeout_ms)
}

/// The warning for a call the host refused outright (unknown cluster, bad upstream).
pub fn refused(upstream: &str) -> String {
    format!("whoami callout to `{upstream}` was refused by the host; check whoami_upstream")
}

/// The IP of a `source.address` property: `1.2.3.4:5678`, `[::1]:5678`, or a bare address.
pub fn client_ip(address: &str) -> Option<&str> {
    let ip = if let Some(rest) = address.strip_prefix('[') {
        &rest[..rest.find(']')?]
    } else {
        match address.rsplit_once(':') {
            // One colon: IPv4 with port. More: a bare IPv6 address.
            Some((host, port))
                if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) =>
            {
                host
            }
            _ => address,
        }
    };
    let ok = !ip.is_empty()
        && ip
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b'.' || b == b':');
    ok.then_some(ip)
}

/// Appends the client address to `X-Forwarded-For`, unless the proxy already did (Envoy with
/// `use_remote_address` appends before the filter runs).
pub fn extend_forwarded_for(existing: Option<&str>, client: Option<&str>) -> Option<String> {
    match (existing.map(str::trim).filter(|v| !v.is_empty()), client) {
        (None, None) => None,
        (Some(xff), None) => Some(xff.to_string()),
        (None, Some(ip)) => Some(ip.to_string()),
        (Some(xff), Some(ip)) => {
            if xff.rsplit(',').next().map(str::trim) == Some(ip) {
                Some(xff.to_string())
            } else {
                Some(format!("{xff}, {ip}"))
            }
        }
    }
}

fn is_header_text(v: &str) -> bool {
    v.bytes().all(|b| b == b'\t' || (0x20..=0x7e).contains(&b))
}

/// What a whoami answer means for the token.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The token belongs to this user.
    User(String),
    /// Synapse rejected the token (401/403).
    Denied(Rejection),
    /// No usable answer.
    Failed(Failure),
}

impl Outcome {
    /// The counter an answer of this kind adds to.
    pub fn counter(&self) -> Counter {
        match self {
            Outcome::User(_) => Counter::WhoamiOk,
            Outcome::Denied(_) => Counter::WhoamiDenied,
            Outcome::Failed(_) => Counter::WhoamiFailed,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ErrorBody<'a> {
    #[serde(borrow)]
    errcode: Option<std::borrow::Cow<'a, str>>,
    soft_logout: bool,
}

fn rejection(status: u16, body: Option<&[u8]>) -> Rejection {
    let parsed: ErrorBody<'_> = body
        .and_then(|b| serde_json::from_slice(b).ok())
        .unwrap_or_default();
    let fallback = if status == 403 {
        Errcode::Forbidden
    } else {
        Errcode::UnknownToken
    };
    Rejection {
        status,
        errcode: parsed
            .errcode
            .as_deref()
            .and_then(Errcode::parse)
            .unwrap_or(fallback),
        soft_logout: parsed.soft_logout,
    }
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Failure {
    /// No response at all: connect error, reset, timeout reported without a status.
    NoResponse,
    /// A status that is neither 200 nor 401/403 (5xx incl. Envoy's synthesized 503/504, 429, ...).
    Status(u16),
    /// Body over MAX_BODY.
    Oversized,
    /// 200 whose body is not JSON with a string `user_id`.
    Malformed,
    /// 200 whose `user_id` is not a Matrix user ID.
    InvalidUserId,
}

impl Failure {
    /// The warning logged for a failed call (`refresh`: the call renewed a cached entry).
    pub fn describe(self, refresh: bool) -> String {
        let what = match self {
            Failure::NoResponse => "no response (unreachable, reset or timed out)".to_string(),
            Failure::Status(s) => format!("status {s}"),
            Failure::Oversized => format!("a body over {MAX_BODY} bytes"),
            Failure::Malformed => "a body without a string user_id".to_string(),
            Failure::InvalidUserId => "a user_id that is not a Matrix user ID".to_string(),
        };
        if refresh {
            format!("whoami failed with {what} (cache refresh; the cached user stays)")
        } else {
            format!("whoami failed with {what}; routing with the fallback key")
        }
    }
}

#[derive(Deserialize)]
struct WhoamiBody {
    user_id: String,
}

/// Interprets a whoami answer: `status` is the `:status` header (None when the host delivered no
/// headers), `body` the body if it was read (None when it was larger than `MAX_BODY`).
pub fn interpret(status: Option<&[u8]>, body: Option<&[u8]>) -> Outcome {
    let status = status
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.trim().parse::<u16>().ok());
    let Some(status) = status else {
        return Outcome::Failed(Failure::NoResponse);
    };
    match status {
        200 => {
            let Some(body) = body else {
                return Outcome::Failed(Failure::Oversized);
            };
            match serde_json::from_slice::<WhoamiBody>(body) {
                Ok(b) if is_user_id(&b.user_id) => Outcome::User(b.user_id),
                Ok(_) => Outcome::Failed(Failure::InvalidUserId),
                Err(_) => Outcome::Failed(Failure::Malformed),
            }
        }
        401 | 403 => Outcome::Denied(rejection(status, body)),
        other => Outcome::Failed(Failure::Status(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(ua: Option<&str>, xff: Option<&str>, src: Option<&str>) -> Vec<(String, String)> {
        with_proto(ua, xff, src, None)
    }

    fn with_proto(
        ua: Option<&str>,
        xff: Option<&str>,
        src: Option<&str>,
        proto: Option<&str>,
    ) -> Vec<(String, String)> {
        let cfg = crate::config::Config::parse(b"").unwrap().whoami;
        let client = ClientInfo {
            user_agent: ua,
            forwarded_for: xff,
            forwarded_proto: proto,
            source_address: src,
            masquerade: None,
        };
        callout_headers(&cfg, "syt_tok", client)
            .as_pairs()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn get<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
        h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    #[test]
    fn callout_carries_what_synapse_needs() {
        let h = headers(Some("Element/1.0"), None, Some("192.0.2.7:51234"));
        assert_eq!(get(&h, ":method"), Some("GET"));
        assert_eq!(get(&h, ":path"), Some("/_matrix/client/v3/account/whoami"));
        assert_eq!(get(&h, ":authority"), Some("localhost"));
        assert_eq!(get(&h, "authorization"), Some("Bearer syt_tok"));
        assert_eq!(get(&h, "user-agent"), Some("Element/1.0"));
        assert_eq!(get(&h, "x-forwarded-for"), Some("192.0.2.7"));
    }

    #[test]
    fn forwarded_for_is_extended_once() {
        let h = headers(None, Some("198.51.100.1"), Some("192.0.2.7:1"));
        assert_eq!(get(&h, "x-forwarded-for"), Some("198.51.100.1, 192.0.2.7"));
        // Envoy with use_remote_address already appended the client.
        let h = headers(None, Some("198.51.100.1, 192.0.2.7"), Some("192.0.2.7:1"));
        assert_eq!(get(&h, "x-forwarded-for"), Some("198.51.100.1, 192.0.2.7"));
        let h = headers(None, None, None);
        assert_eq!(get(&h, "x-forwarded-for"), None);
        assert_eq!(get(&h, "user-agent"), None);
        // A header value with control characters is not copied into the callout.
        let h = headers(Some("a\r\nb"), Some("1.2.3.4\n"), None);
        assert_eq!(get(&h, "user-agent"), None);
        assert_eq!(get(&h, "x-forwarded-for"), None);
    }

    #[test]
    fn forwarded_proto_is_copied_when_sane() {
        let get_proto =
            |p| get(&with_proto(None, None, None, p), "x-forwarded-proto").map(String::from);
        assert_eq!(get_proto(Some("https")), Some("https".into()));
        assert_eq!(get_proto(Some("http")), Some("http".into()));
        assert_eq!(get_proto(Some("gopher")), None);
        assert_eq!(get_proto(None), None);
    }

    #[test]
    fn a_masquerading_appservice_asks_whoami_as_that_user() {
        let client = ClientInfo {
            masquerade: Some("@irc_bob:example.org"),
            ..ClientInfo::default()
        };
        let cfg = crate::config::Config::parse(b"").unwrap().whoami;
        let h = callout_headers(&cfg, "as_tok", client);
        let path = h
            .as_pairs()
            .iter()
            .find(|(k, _)| *k == ":path")
            .map(|(_, v)| v.to_string());
        assert_eq!(
            path.as_deref(),
            Some("/_matrix/client/v3/account/whoami?user_id=%40irc%5Fbob%3Aexample%2Eorg")
        );
    }

    #[test]
    fn client_ip_forms() {
        assert_eq!(client_ip("127.0.0.1:8080"), Some("127.0.0.1"));
        assert_eq!(client_ip("[2001:db8::1]:443"), Some("2001:db8::1"));
        assert_eq!(client_ip("2001:db8::1"), Some("2001:db8::1"));
        assert_eq!(client_ip("10.0.0.1"), Some("10.0.0.1"));
        assert_eq!(client_ip("unix:/tmp/sock"), None);
        assert_eq!(client_ip(""), None);
    }

    #[test]
    fn answers() {
        let ok = br#"{"user_id":"@alice:example.org","is_guest":false,"device_id":"D"}"#;
        assert_eq!(
            interpret(Some(b"200"), Some(ok)),
            Outcome::User("@alice:example.org".into())
        );
        // Appservice tokens have no device_id.
        assert_eq!(
            interpret(Some(b"200"), Some(br#"{"user_id":"@bridge:example.org"}"#)),
            Outcome::User("@bridge:example.org".into())
        );
        let body = br#"{"errcode":"M_UNKNOWN_TOKEN","error":"x","soft_logout":true}"#;
        let soft = Rejection {
            status: 401,
            errcode: Errcode::UnknownToken,
            soft_logout: true,
        };
        assert_eq!(interpret(Some(b"401"), Some(body)), Outcome::Denied(soft));
        assert_eq!(
            soft.body(),
            r#"{"errcode":"M_UNKNOWN_TOKEN","error":"Invalid access token passed.","soft_logout":true}"#
        );
        let locked = br#"{"errcode":"M_USER_LOCKED","error":"echo syt_secret"}"#;
        let Outcome::Denied(r) = interpret(Some(b"401"), Some(locked)) else {
            panic!("not denied");
        };
        assert_eq!(r.errcode, Errcode::UserLocked);
        assert!(!r.body().contains("syt_"));
        assert_eq!(
            interpret(Some(b"403"), None),
            Outcome::Denied(Rejection {
                status: 403,
                errcode: Errcode::Forbidden,
                soft_logout: false
            })
        );
        assert_eq!(
            interpret(Some(b"401"), Some(b"<html>")),
            Outcome::Denied(Rejection {
                status: 401,
                errcode: Errcode::UnknownToken,
                soft_logout: false
            })
        );
        assert_eq!(interpret(None, None), Outcome::Failed(Failure::NoResponse));
        assert_eq!(
            interpret(Some(b"503"), Some(b"upstream connect error")),
            Outcome::Failed(Failure::Status(503))
        );
        assert_eq!(
            interpret(Some(b"429"), Some(b"{}")),
            Outcome::Failed(Failure::Status(429))
        );
        assert_eq!(
            interpret(Some(b"200"), None),
            Outcome::Failed(Failure::Oversized)
        );
        assert_eq!(
            interpret(Some(b"200"), Some(b"{\"user_id\":")),
            Outcome::Failed(Failure::Malformed)
        );
        assert_eq!(
            interpret(Some(b"200"), Some(b"{\"user_id\":7}")),
            Outcome::Failed(Failure::Malformed)
        );
        assert_eq!(
            interpret(Some(b"200"), Some(b"{\"user_id\":\"alice\"}")),
            Outcome::Failed(Failure::InvalidUserId)
        );
        assert_eq!(
            interpret(Some(b"abc"), Some(ok)),
            Outcome::Failed(Failure::NoResponse)
        );
    }
}
