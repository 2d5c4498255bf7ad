//! The plugin configuration: one serde type with defaults, unknown fields refused, and
//! validation that names the offending field.

use crate::paths::PathSet;
use crate::profile::{Capabilities, Proxy};
use serde::Deserialize;
use std::fmt;

/// Default sync path family (Synapse's worker docs plus sliding sync), as path templates
/// (`paths.rs` documents the language).
pub const DEFAULT_SYNC_PATHS: [&str; 4] = [
    "/_matrix/client/{api/v1|r0|v3|unstable}/{sync|events|initialSync}",
    "/_matrix/client/{api/v1|r0|v3|unstable}/rooms/*/initialSync",
    "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync",
    // MSC4186 (stable simplified sliding sync). Synapse 1.163 answers it 404 on every process,
    // so routing it to the sync workers costs nothing and is right the day Synapse serves it.
    "/_matrix/client/v4/sync",
];

/// Default room endpoints for `room_paths`: the room-scoped client endpoints Synapse's worker
/// docs let a deployment shard by room (the first `*` is the room ID).
pub const DEFAULT_ROOM_PATHS: [&str; 2] = [
    "/_matrix/client/{api/v1|r0|v3|unstable}/rooms/*/{messages|context|members|joined_members|state|event|send|redact|relations|threads|typing|receipt|read_markers|timestamp_to_event}/**",
    "/_matrix/client/v1/rooms/*/{relations|threads|hierarchy|timestamp_to_event}/**",
];

/// Upper bound of `max_whoami_in_flight`.
pub const MAX_IN_FLIGHT: u32 = 4096;

/// Upper bound of `cache_capacity`: 16 Mi slots is far beyond any homeserver's active tokens.
pub const MAX_CACHE_CAPACITY: u32 = 1 << 24;

/// Upper bound of `cache_ttl_s` and `negative_ttl_s`: one week. Synapse's own caches and token
/// lifetimes are far shorter; a longer TTL would only keep a logged-out token's user longer.
pub const MAX_TTL_S: u32 = 7 * 24 * 3600;

/// Upper bound of `failure_backoff_s`: one hour. A longer back-off would pin a device to its
/// fallback key long after Synapse is back.
pub const MAX_BACKOFF_S: u32 = 3600;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub proxy: Proxy,
    pub whoami_upstream: String,
    pub whoami_authority: String,
    pub whoami_path: String,
    pub whoami_timeout_ms: u32,
    pub header_name: String,
    pub sync_paths: Vec<String>,
    pub cache_capacity: u32,
    pub cache_ttl_s: u32,
    pub negative_ttl_s: u32,
    pub failure_backoff_s: u32,
    pub reject_invalid_tokens: bool,
    pub shared_data_prefix: String,
    pub max_whoami_in_flight: u32,
    pub nginx_variable: String,
    pub sync_kind_header: String,
    pub nginx_sync_kind_variable: String,
    pub room_header_name: String,
    pub nginx_room_variable: String,
    pub room_paths: Vec<String>,
    pub filter_state: bool,
    pub appservice_masquerading: bool,
    pub native_token_server_name: String,
    pub refuse_bad_mas_tokens: bool,
    pub trust_route_match: bool,
    pub fallback_key_secret: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            proxy: Proxy::Envoy,
            whoami_upstream: "synapse_whoami".into(),
            whoami_authority: "localhost".into(),
            whoami_path: "/_matrix/client/v3/account/whoami".into(),
            whoami_timeout_ms: 2000,
            header_name: "x-user-identifier".into(),
            sync_paths: DEFAULT_SYNC_PATHS.iter().map(|s| s.to_string()).collect(),
            cache_capacity: 65536,
            cache_ttl_s: 3600,
            negative_ttl_s: 30,
            failure_backoff_s: 10,
            reject_invalid_tokens: false,
            shared_data_prefix: "msr".into(),
            max_whoami_in_flight: 32,
            nginx_variable: String::new(),
            sync_kind_header: String::new(),
            nginx_sync_kind_variable: String::new(),
            room_header_name: String::new(),
            nginx_room_variable: String::new(),
            room_paths: DEFAULT_ROOM_PATHS.iter().map(|s| s.to_string()).collect(),
            filter_state: false,
            appservice_masquerading: true,
            native_token_server_name: String::new(),
            refuse_bad_mas_tokens: false,
            trust_route_match: false,
            fallback_key_secret: String::new(),
        }
    }
}

/// A configuration error, always naming the field it is about.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "field `{}`: {}", self.field, self.message)
    }
}

fn err(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        message: message.into(),
    }
}

/// The configuration compiled into what the engine uses: each part typed, each optional output
/// an `Option` of its target, and what the host can do derived from `proxy` once. Nothing in
/// the engine reads a raw configuration string.
#[derive(Debug)]
pub struct Settings {
    /// What the host can do (from `proxy`).
    pub caps: Capabilities,
    pub whoami: WhoamiSettings,
    pub cache: CacheSettings,
    pub keys: KeySettings,
    pub requests: RequestSettings,
}

/// Where and how whoami is called.
#[derive(Debug, Clone)]
pub struct WhoamiSettings {
    pub upstream: String,
    pub authority: String,
    pub path: String,
    pub timeout_ms: u32,
    /// `max_whoami_in_flight`.
    pub max_in_flight: usize,
}

/// The shared-data cache and how long each kind of answer is kept.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub prefix: String,
    pub capacity: u32,
    pub ttl_ms: u64,
    /// 0: rejections are not cached.
    pub negative_ttl_ms: u64,
    pub backoff_ms: u64,
    /// `fallback_key_secret` as a hash key: every replica that has it gives a token the same
    /// fallback key. None: the fallback key is keyed per process.
    pub fallback_secret: Option<[u8; crate::cache::SECRET_LEN]>,
}

/// Where the routing key goes: the proxy routes on one or the other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyTarget {
    /// A request header (`header_name`); client copies are scrubbed.
    Header(String),
    /// An nginx variable (`nginx_variable`), written through the `ngx.<name>` property.
    NginxVariable(String),
}

/// A request header and/or an nginx variable carrying one piece of route metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outputs {
    pub header: Option<String>,
    pub variable: Option<String>,
}

impl Outputs {
    fn new(header: &str, variable: &str) -> Outputs {
        let some = |s: &str| Some(s.to_string()).filter(|s| !s.is_empty());
        Outputs {
            header: some(header),
            variable: some(variable),
        }
    }

    pub fn any(&self) -> bool {
        self.header.is_some() || self.variable.is_some()
    }
}

/// What is written onto a request: the key and the route metadata.
#[derive(Debug)]
pub struct KeySettings {
    pub target: KeyTarget,
    /// The sync kind (`sync_kind_header`, `nginx_sync_kind_variable`).
    pub sync_kind: Outputs,
    /// The room ID of a room request (`room_header_name`, `nginx_room_variable`).
    pub room: Outputs,
    /// Compiled `room_paths` (used only when `room` has an output).
    pub room_paths: PathSet,
    /// Envoy filter state (`msr_source`, `msr_sync_kind`) for the access log.
    pub filter_state: bool,
    /// Answer a rejected token at the edge instead of forwarding it with the fallback key.
    pub reject_invalid_tokens: bool,
}

/// How a request is read: which paths are handled and what may decide a key without whoami.
#[derive(Debug)]
pub struct RequestSettings {
    pub sync_paths: PathSet,
    /// Resolve `?user_id=` for appservice tokens (`appservice_masquerading`).
    pub masquerading: bool,
    /// Decode native Synapse tokens locally as users of this server.
    pub native_server_name: Option<String>,
    pub refuse_bad_mas_tokens: bool,
    /// The sync kind is needed (an output or Envoy filter state).
    pub sync_kind_needed: bool,
    /// A request with a Bearer token can be handled without reading its `:path`: the proxy
    /// only runs the filter on sync routes (`trust_route_match`), and no option needs the path
    /// or the query (sync kind, filter state, room keys, `?user_id=` masquerading, native-token
    /// decoding, MAS checks).
    pub path_unneeded: bool,
}

impl Settings {
    /// One line for the start-up log: where the key goes and where whoami is called.
    pub fn summary(&self) -> String {
        let target = match &self.keys.target {
            KeyTarget::Header(name) => format!("header `{name}`"),
            KeyTarget::NginxVariable(name) => format!("nginx variable `${name}`"),
        };
        format!("{target}, whoami via `{}`", self.whoami.upstream)
    }
}

impl Config {
    /// Parses the plugin configuration. Empty input (no configuration given) means all defaults.
    pub fn parse(bytes: &[u8]) -> Result<Settings, ConfigError> {
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
        let config = match first {
            None => Config::default(),
            // serde would also read a struct from a JSON array, by position.
            Some(b) if *b != b'{' => {
                return Err(err("(root)", "must be one JSON object"));
            }
            Some(_) => parse_object(bytes)?,
        };
        config.validate()
    }

    fn validate(self) -> Result<Settings, ConfigError> {
        check_lengths(&self)?;
        self.proxy
            .validate_upstream(&self.whoami_upstream)
            .map_err(|m| err("whoami_upstream", m))?;
        if !is_header_value(&self.whoami_authority) || self.whoami_authority.is_empty() {
            return Err(err(
                "whoami_authority",
                "must be a non-empty host name without spaces",
            ));
        }
        if !self.whoami_path.starts_with('/') || !is_header_value(&self.whoami_path) {
            return Err(err(
                "whoami_path",
                "must start with `/` and contain no spaces or control characters",
            ));
        }
        if !(1..=60_000).contains(&self.whoami_timeout_ms) {
            return Err(err("whoami_timeout_ms", "must be between 1 and 60000"));
        }
        validate_header_name(&self.header_name).map_err(|m| err("header_name", m))?;
        if self.sync_paths.is_empty() {
            return Err(err("sync_paths", "must list at least one pattern"));
        }
        let sync_paths = PathSet::compile(&self.sync_paths)
            .map_err(|(i, m)| err(&format!("sync_paths[{i}]"), m))?;
        if !(1..=MAX_CACHE_CAPACITY).contains(&self.cache_capacity) {
            return Err(err(
                "cache_capacity",
                format!("must be between 1 and {MAX_CACHE_CAPACITY}"),
            ));
        }
        if !(1..=MAX_TTL_S).contains(&self.cache_ttl_s) {
            return Err(err(
                "cache_ttl_s",
                format!("must be between 1 and {MAX_TTL_S} (one week)"),
            ));
        }
        if self.negative_ttl_s > MAX_TTL_S {
            return Err(err(
                "negative_ttl_s",
                format!("must be between 0 and {MAX_TTL_S} (one week)"),
            ));
        }
        if self.failure_backoff_s > MAX_BACKOFF_S {
            return Err(err(
                "failure_backoff_s",
                format!("must be between 0 and {MAX_BACKOFF_S} (one hour)"),
            ));
        }
        let prefix_ok = !self.shared_data_prefix.is_empty()
            && self.shared_data_prefix.len() <= 64
            && self
                .shared_data_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !prefix_ok {
            return Err(err(
                "shared_data_prefix",
                "must be 1-64 characters of [A-Za-z0-9_-]",
            ));
        }
        if !(1..=MAX_IN_FLIGHT).contains(&self.max_whoami_in_flight) {
            return Err(err(
                "max_whoami_in_flight",
                format!("must be between 1 and {MAX_IN_FLIGHT}"),
            ));
        }
        self.proxy
            .validate_variable(&self.nginx_variable)
            .map_err(|m| err("nginx_variable", m))?;
        for (field, name) in [
            ("nginx_sync_kind_variable", &self.nginx_sync_kind_variable),
            ("nginx_room_variable", &self.nginx_room_variable),
        ] {
            self.proxy
                .validate_variable(name)
                .map_err(|m| err(field, m))?;
        }
        for (field, name) in [
            ("sync_kind_header", &self.sync_kind_header),
            ("room_header_name", &self.room_header_name),
        ] {
            if name.is_empty() {
                continue;
            }
            validate_header_name(name).map_err(|m| err(field, m))?;
            if *name == self.header_name {
                return Err(err(field, "must differ from header_name"));
            }
        }
        if !self.sync_kind_header.is_empty() && self.sync_kind_header == self.room_header_name {
            return Err(err("room_header_name", "must differ from sync_kind_header"));
        }
        if self.filter_state && self.proxy != Proxy::Envoy {
            return Err(err("filter_state", "is only for `\"proxy\": \"envoy\"`"));
        }
        if !self.native_token_server_name.is_empty()
            && !crate::matrix::is_user_id(&format!("@a:{}", self.native_token_server_name))
        {
            return Err(err(
                "native_token_server_name",
                "must be a server name (`example.org`, with an optional port)",
            ));
        }
        let room_paths = PathSet::compile(&self.room_paths)
            .map_err(|(i, m)| err(&format!("room_paths[{i}]"), m))?;
        let fallback_secret = fallback_secret(&self.fallback_key_secret)?;
        Ok(self.compile(sync_paths, room_paths, fallback_secret))
    }

    /// The validated configuration as the engine's typed settings.
    fn compile(
        self,
        sync_paths: PathSet,
        room_paths: PathSet,
        fallback_secret: Option<[u8; crate::cache::SECRET_LEN]>,
    ) -> Settings {
        let sync_kind = Outputs::new(&self.sync_kind_header, &self.nginx_sync_kind_variable);
        let room = Outputs::new(&self.room_header_name, &self.nginx_room_variable);
        let native_server_name =
            Some(self.native_token_server_name).filter(|name| !name.is_empty());
        let path_unneeded = self.trust_route_match
            && !sync_kind.any()
            && !room.any()
            && !self.filter_state
            && !self.appservice_masquerading
            && native_server_name.is_none()
            && !self.refuse_bad_mas_tokens;
        let target = if self.nginx_variable.is_empty() {
            KeyTarget::Header(self.header_name)
        } else {
            KeyTarget::NginxVariable(self.nginx_variable)
        };
        Settings {
            caps: self.proxy.capabilities(),
            whoami: WhoamiSettings {
                upstream: self.whoami_upstream,
                authority: self.whoami_authority,
                path: self.whoami_path,
                timeout_ms: self.whoami_timeout_ms,
                max_in_flight: self.max_whoami_in_flight as usize,
            },
            cache: CacheSettings {
                prefix: self.shared_data_prefix,
                capacity: self.cache_capacity,
                ttl_ms: u64::from(self.cache_ttl_s) * 1000,
                negative_ttl_ms: u64::from(self.negative_ttl_s) * 1000,
                backoff_ms: u64::from(self.failure_backoff_s) * 1000,
                fallback_secret,
            },
            requests: RequestSettings {
                sync_paths,
                masquerading: self.appservice_masquerading,
                native_server_name,
                refuse_bad_mas_tokens: self.refuse_bad_mas_tokens,
                sync_kind_needed: sync_kind.any() || self.filter_state,
                path_unneeded,
            },
            keys: KeySettings {
                target,
                sync_kind,
                room,
                room_paths,
                filter_state: self.filter_state,
                reject_invalid_tokens: self.reject_invalid_tokens,
            },
        }
    }
}

/// `fallback_key_secret`: empty, or exactly 32 hex digits (128 bits). The refusal never shows
/// the value.
fn fallback_secret(text: &str) -> Result<Option<[u8; crate::cache::SECRET_LEN]>, ConfigError> {
    if text.is_empty() {
        return Ok(None);
    }
    let refused = || {
        err(
            "fallback_key_secret",
            format!(
                "must be empty or exactly 32 hexadecimal digits (128 bits, e.g. from \
                 `openssl rand -hex 16`), not {} characters of which some may not be hex \
                 (the value is not shown)",
                text.len()
            ),
        )
    };
    let digit = |b: u8| char::from(b).to_digit(16);
    let mut key = [0u8; crate::cache::SECRET_LEN];
    if text.len() != 2 * key.len() {
        return Err(refused());
    }
    for (byte, pair) in key.iter_mut().zip(text.as_bytes().chunks(2)) {
        let (Some(&hi), Some(&lo)) = (pair.first(), pair.get(1)) else {
            return Err(refused());
        };
        match (digit(hi), digit(lo)) {
            (Some(hi), Some(lo)) => *byte = (hi * 16 + lo) as u8,
            _ => return Err(refused()),
        }
    }
    Ok(Some(key))
}

fn parse_object(bytes: &[u8]) -> Result<Config, ConfigError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let config = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let field = match e.inner().classify() {
            // A value of the wrong type or range, or an unknown field: the path names it.
            serde_json::error::Category::Data => e.path().to_string(),
            // Broken JSON is about the document, never attributed to a field.
            _ => String::new(),
        };
        // The root is `.`; an empty field name (`{"": 1}`, found by fuzzing) is the root's too.
        let field = Some(field.as_str()).filter(|f| !f.is_empty() && *f != ".");
        err(field.unwrap_or("(root)"), e.inner().to_string())
    })?;
    // Bytes after the object (a templating slip such as two objects) are an error, not ignored.
    de.end().map_err(|e| err("(root)", e.to_string()))?;
    Ok(config)
}

fn is_header_value(s: &str) -> bool {
    s.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

fn validate_header_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("must be a non-empty lower-case header name of [a-z0-9-]".into());
    }
    // Headers the proxy or Synapse give meaning to must not be overwritten by the filter.
    if let Some(why) = interpreted_header(name) {
        return Err(format!(
            "`{name}` is {why}; choose a name of its own, such as x-user-identifier"
        ));
    }
    Ok(())
}

/// Longest accepted string field (upstream, authority, whoami path, header name, sync path
/// pattern), in bytes: far above any real value, and a bound on what a bad template can load.
pub const MAX_FIELD_LEN: usize = 256;

/// Most `sync_paths` patterns accepted.
pub const MAX_SYNC_PATHS: usize = 32;

/// Every string field is 1..=MAX_FIELD_LEN bytes (`shared_data_prefix`: 1-64, checked in
/// `validate`), so a 1 MiB value is refused naming its field before anything else looks at it.
fn check_lengths(config: &Config) -> Result<(), ConfigError> {
    let fields = [
        ("whoami_upstream", &config.whoami_upstream),
        ("whoami_authority", &config.whoami_authority),
        ("whoami_path", &config.whoami_path),
        ("header_name", &config.header_name),
    ];
    for (field, value) in fields {
        check_length(field, value)?;
    }
    for (field, patterns) in [
        ("sync_paths", &config.sync_paths),
        ("room_paths", &config.room_paths),
    ] {
        if patterns.len() > MAX_SYNC_PATHS {
            return Err(err(
                field,
                format!("must list at most {MAX_SYNC_PATHS} patterns"),
            ));
        }
        for (i, p) in patterns.iter().enumerate() {
            check_length(&format!("{field}[{i}]"), p)?;
        }
    }
    // Optional names: empty means off, but never longer than the bound.
    for (field, value) in [
        ("sync_kind_header", &config.sync_kind_header),
        ("room_header_name", &config.room_header_name),
        ("native_token_server_name", &config.native_token_server_name),
    ] {
        if !value.is_empty() {
            check_length(field, value)?;
        }
    }
    Ok(())
}

fn check_length(field: &str, value: &str) -> Result<(), ConfigError> {
    match value.len() {
        0 => Err(err(field, "must not be empty")),
        n if n > MAX_FIELD_LEN => Err(err(
            field,
            format!("must be at most {MAX_FIELD_LEN} bytes, not {n}"),
        )),
        _ => Ok(()),
    }
}

/// Why `name` (lower case) is a header the filter must not set, or None. Setting one would
/// change how Envoy, nginx or Synapse treat the request: framing and hop-by-hop headers, the
/// client's identity and credentials (`authorization`, `cookie`, `x-forwarded-*`,
/// `x-real-ip`, `forwarded`, `user-agent`), proxy control (`x-envoy-*`, `x-request-id`,
/// tracing), content negotiation and conditionals that Synapse or a cache reads.
pub fn interpreted_header(name: &str) -> Option<&'static str> {
    const EXACT: &[&str] = &[
        "accept",
        "accept-charset",
        "accept-encoding",
        "accept-language",
        "authorization",
        "b3",
        "cache-control",
        "connection",
        "cookie",
        "date",
        "early-data",
        "expect",
        "forwarded",
        "host",
        "http2-settings",
        "if-match",
        "if-modified-since",
        "if-none-match",
        "if-range",
        "if-unmodified-since",
        "keep-alive",
        "max-forwards",
        "origin",
        "pragma",
        "priority",
        "range",
        "referer",
        "set-cookie",
        "te",
        "traceparent",
        "tracestate",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "via",
        "x-amzn-trace-id",
        "x-client-trace-id",
        "x-http-method-override",
        "x-ot-span-context",
        "x-real-ip",
        "x-request-id",
    ];
    const PREFIXES: &[&str] = &[
        "access-control-",
        "content-",
        "grpc-",
        "proxy-",
        "sec-",
        "x-b3-",
        "x-datadog-",
        "x-envoy-",
        "x-forwarded-",
    ];
    if EXACT.contains(&name) {
        Some("a header the proxy or Synapse interprets")
    } else if PREFIXES.iter().any(|p| name.starts_with(p)) {
        Some("in a header family the proxy or Synapse interprets")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(json: &str) -> String {
        Config::parse(json.as_bytes()).unwrap_err().field
    }

    #[test]
    fn empty_config_is_all_defaults() {
        for input in ["", "  \n", "{}"] {
            let s = Config::parse(input.as_bytes()).unwrap();
            assert_eq!(s.keys.target, KeyTarget::Header("x-user-identifier".into()));
            assert_eq!(s.whoami.timeout_ms, 2000);
            assert_eq!(s.cache.capacity, 65536);
            assert_eq!(s.cache.ttl_ms, 3_600_000);
            assert!(!s.keys.reject_invalid_tokens);
            assert_eq!(s.keys.sync_kind, Outputs::default());
            assert_eq!(s.requests.native_server_name, None);
            assert!(!s.requests.path_unneeded);
        }
    }

    #[test]
    fn fields_are_read() {
        let s = Config::parse(
            br#"{"proxy":"ngx_wasm_module","whoami_upstream":"127.0.0.1:8008",
                 "header_name":"x-mxid","cache_capacity":10,"reject_invalid_tokens":true}"#,
        )
        .unwrap();
        assert_eq!(s.caps, Proxy::NgxWasmModule.capabilities());
        assert_eq!(s.keys.target, KeyTarget::Header("x-mxid".into()));
        assert_eq!(s.cache.capacity, 10);
        assert!(s.keys.reject_invalid_tokens);
        let s = Config::parse(
            br#"{"proxy":"ngx_wasm_module","whoami_upstream":"127.0.0.1:8008",
                 "nginx_variable":"msr_key","nginx_room_variable":"msr_room",
                 "trust_route_match":true,"appservice_masquerading":false}"#,
        )
        .unwrap();
        assert_eq!(s.keys.target, KeyTarget::NginxVariable("msr_key".into()));
        assert_eq!(s.keys.room.variable.as_deref(), Some("msr_room"));
        assert_eq!(s.keys.room.header, None);
        // Room keys need the path.
        assert!(!s.requests.path_unneeded);
    }

    #[test]
    fn every_error_names_its_field() {
        assert_eq!(field_of(r#"{"cache_capcity":5}"#), "cache_capcity");
        assert_eq!(field_of(r#"{"cache_capacity":"5"}"#), "cache_capacity");
        assert_eq!(field_of(r#"{"cache_capacity":0}"#), "cache_capacity");
        assert_eq!(field_of(r#"{"cache_capacity":-1}"#), "cache_capacity");
        assert_eq!(field_of(r#"{"cache_ttl_s":0}"#), "cache_ttl_s");
        assert_eq!(field_of(r#"{"cache_ttl_s":604801}"#), "cache_ttl_s");
        assert_eq!(field_of(r#"{"cache_ttl_s":4294967295}"#), "cache_ttl_s");
        assert_eq!(field_of(r#"{"negative_ttl_s":604801}"#), "negative_ttl_s");
        assert_eq!(
            field_of(r#"{"failure_backoff_s":3601}"#),
            "failure_backoff_s"
        );
        assert_eq!(
            field_of(r#"{"failure_backoff_s":4294967295}"#),
            "failure_backoff_s"
        );
        assert_eq!(field_of(r#"{"whoami_timeout_ms":0}"#), "whoami_timeout_ms");
        assert_eq!(field_of(r#"{"whoami_upstream":""}"#), "whoami_upstream");
        assert_eq!(field_of(r#"{"whoami_path":"whoami"}"#), "whoami_path");
        assert_eq!(
            field_of(r#"{"whoami_authority":"a b"}"#),
            "whoami_authority"
        );
        assert_eq!(field_of(r#"{"header_name":"X-Up"}"#), "header_name");
        assert_eq!(
            field_of(r#"{"header_name":"authorization"}"#),
            "header_name"
        );
        assert_eq!(field_of(r#"{"sync_paths":[]}"#), "sync_paths");
        assert_eq!(
            field_of(r#"{"sync_paths":["/ok","(bad"]}"#),
            "sync_paths[1]"
        );
        assert_eq!(field_of(r#"{"sync_paths":["^/sync$"]}"#), "sync_paths[0]");
        assert_eq!(
            field_of(r#"{"max_whoami_in_flight":0}"#),
            "max_whoami_in_flight"
        );
        assert_eq!(field_of(r#"{"nginx_variable":"msr"}"#), "nginx_variable");
        assert_eq!(
            field_of(
                r#"{"proxy":"ngx_wasm_module","whoami_upstream":"h:1","nginx_variable":"a-b"}"#
            ),
            "nginx_variable"
        );
        assert_eq!(field_of(r#"{"proxy":"haproxy"}"#), "proxy");
        assert_eq!(field_of(r#"{"proxy":1}"#), "proxy");
        assert_eq!(field_of(r#"{"proxy":{"envoy":null}}"#), "proxy");
        assert_eq!(
            field_of(r#"{"shared_data_prefix":"a/b"}"#),
            "shared_data_prefix"
        );
        assert_eq!(
            field_of(r#"{"proxy":"ngx_wasm_module","whoami_upstream":"synapse_whoami"}"#),
            "whoami_upstream"
        );
        assert_eq!(field_of(r#"[1]"#), "(root)");
        assert_eq!(field_of(r#"["envoy","synapse_whoami"]"#), "(root)");
        assert_eq!(field_of(r#"{"proxy":"envoy"} x"#), "(root)");
        assert_eq!(field_of(r#"{}{"cache_capacity":0}"#), "(root)");
        assert_eq!(field_of(r#"{"cache_ttl_s":1"#), "(root)");
    }

    #[test]
    fn kong_schema_lists_exactly_the_config_fields() {
        // serde lists every field it expected when it meets an unknown one.
        let msg = Config::parse(br#"{"not_a_field":1}"#).unwrap_err().message;
        let mut expected: Vec<&str> = msg.split('`').skip(3).step_by(2).collect();
        expected.sort_unstable();
        let meta: serde_json::Value =
            serde_json::from_str(include_str!("../nginx-wasm/matrix_sync_router.meta.json"))
                .unwrap();
        let mut listed: Vec<&str> = meta["config_schema"]["properties"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        listed.sort_unstable();
        assert_eq!(listed, expected);
    }

    #[test]
    fn default_patterns_match_the_sync_family_only() {
        let s = Config::parse(b"").unwrap();
        for p in [
            "/_matrix/client/v3/sync",
            "/_matrix/client/r0/sync",
            "/_matrix/client/api/v1/events",
            "/_matrix/client/unstable/initialSync",
            "/_matrix/client/v3/rooms/!abc:example.org/initialSync",
            "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync",
            "/_matrix/client/v4/sync",
        ] {
            assert!(s.requests.sync_paths.matches(p.as_bytes()), "{p}");
        }
        for p in [
            "/_matrix/client/v3/sync/extra",
            "/_matrix/client/v4/sync/x",
            "/_matrix/client/v4/events",
            "/_matrix/client/v3/rooms/a/b/initialSync",
            "/_matrix/client/v3/account/whoami",
            "/_matrix/client/unstable/orgXmatrix.simplified_msc3575/sync",
            "/x/_matrix/client/v3/sync",
        ] {
            assert!(!s.requests.sync_paths.matches(p.as_bytes()), "{p}");
        }
    }
}

#[cfg(test)]
mod bounds_tests {
    use super::*;

    fn refusal(json: &serde_json::Value) -> ConfigError {
        Config::parse(json.to_string().as_bytes()).unwrap_err()
    }

    #[test]
    fn every_string_field_is_bounded_and_the_refusal_names_it() {
        let long = "a".repeat(MAX_FIELD_LEN + 1);
        let path = format!("/{}", "a".repeat(1 << 20));
        for (field, value) in [
            ("whoami_upstream", long.as_str()),
            ("whoami_authority", long.as_str()),
            ("whoami_path", path.as_str()),
            ("header_name", long.as_str()),
            ("whoami_authority", ""),
            ("whoami_path", ""),
            ("header_name", ""),
        ] {
            let e = refusal(&serde_json::json!({ field: value }));
            assert_eq!(e.field, field, "{e}");
        }
        let e = refusal(&serde_json::json!({"sync_paths": ["^/a$", long]}));
        assert_eq!(e.field, "sync_paths[1]", "{e}");
        let e = refusal(&serde_json::json!({"sync_paths": vec!["/a"; MAX_SYNC_PATHS + 1]}));
        assert_eq!(e.field, "sync_paths", "{e}");
        // The longest accepted values are accepted.
        let at_max = format!("/{}", "a".repeat(MAX_FIELD_LEN - 1));
        let header = format!("x-{}", "a".repeat(MAX_FIELD_LEN - 2));
        let ok = serde_json::json!({
            "whoami_path": at_max, "whoami_authority": "a".repeat(MAX_FIELD_LEN),
            "whoami_upstream": "b".repeat(MAX_FIELD_LEN), "header_name": header,
            "sync_paths": vec!["/a"; MAX_SYNC_PATHS],
        });
        Config::parse(ok.to_string().as_bytes()).unwrap();
    }

    #[test]
    fn the_fallback_key_secret_is_32_hex_digits_and_never_echoed() {
        let ok = "00112233445566778899aAbBcCdDeEfF";
        let s = Config::parse(
            serde_json::json!({ "fallback_key_secret": ok })
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        let mut expected = [0u8; 16];
        for (i, b) in expected.iter_mut().enumerate() {
            *b = (i as u8) * 0x11;
        }
        assert_eq!(s.cache.fallback_secret, Some(expected));
        assert_eq!(Config::parse(b"{}").unwrap().cache.fallback_secret, None);
        let secret_like = "zz112233445566778899aabbccddeeff";
        for bad in [
            "00112233",
            secret_like,
            "00112233445566778899aabbccddeeff00",
            "0011223344556677 8899aabbccddeeff",
            &"a".repeat(1 << 20),
        ] {
            let e = refusal(&serde_json::json!({ "fallback_key_secret": bad }));
            assert_eq!(e.field, "fallback_key_secret", "{e}");
            assert!(!e.to_string().contains("112233"), "{e}");
        }
    }

    #[test]
    fn every_number_has_an_upper_bound_the_refusal_names() {
        for (field, max) in [
            ("whoami_timeout_ms", 60_000),
            ("cache_capacity", MAX_CACHE_CAPACITY),
            ("cache_ttl_s", MAX_TTL_S),
            ("negative_ttl_s", MAX_TTL_S),
            ("failure_backoff_s", MAX_BACKOFF_S),
            ("max_whoami_in_flight", MAX_IN_FLIGHT),
        ] {
            let ok = serde_json::json!({ field: max });
            Config::parse(ok.to_string().as_bytes()).unwrap();
            for bad in [u64::from(max) + 1, u64::from(u32::MAX)] {
                let e = refusal(&serde_json::json!({ field: bad }));
                assert_eq!(e.field, field, "{e}");
                assert!(e.message.contains(&max.to_string()), "{e}");
            }
        }
    }

    #[test]
    fn header_names_the_proxy_or_synapse_interprets_are_refused() {
        for name in [
            "authorization",
            "cookie",
            "te",
            "upgrade",
            "keep-alive",
            "connection",
            "transfer-encoding",
            "content-length",
            "content-type",
            "host",
            "user-agent",
            "forwarded",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "x-real-ip",
            "x-request-id",
            "x-envoy-original-path",
            "x-envoy-upstream-rq-timeout-ms",
            "proxy-authorization",
            "proxy-connection",
            "traceparent",
            "x-b3-traceid",
        ] {
            let e = refusal(&serde_json::json!({ "header_name": name }));
            assert_eq!(e.field, "header_name", "{name}: {e}");
            assert!(e.message.contains(name), "{e}");
        }
        for name in [":path", ":authority", "X-Forwarded-For"] {
            let e = refusal(&serde_json::json!({ "header_name": name }));
            assert_eq!(e.field, "header_name", "{name}: {e}");
        }
        for name in ["x-user-identifier", "x-mxid", "x-sync-key", "x-forwarded"] {
            let s = Config::parse(
                serde_json::json!({ "header_name": name })
                    .to_string()
                    .as_bytes(),
            )
            .unwrap();
            assert_eq!(s.keys.target, KeyTarget::Header(name.into()));
        }
    }
}

#[cfg(test)]
mod fuzz_regressions {
    use super::*;

    /// fuzz/corpus/config/regression-empty-field-name: an unknown field named `""` produced an
    /// error naming the empty field.
    #[test]
    fn an_unknown_empty_field_name_is_named_as_the_root() {
        let input = include_bytes!("../fuzz/corpus/config/regression-empty-field-name");
        let e = Config::parse(input).unwrap_err();
        assert_eq!(e.field, "(root)", "{e}");
        assert!(e.message.contains("unknown field"), "{e}");
        assert_eq!(Config::parse(br#"{"":1}"#).unwrap_err().field, "(root)");
    }
}
