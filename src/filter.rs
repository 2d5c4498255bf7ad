//! The decision state machine of one request, written against the `Host` trait so that it runs
//! natively in unit tests and, through `host.rs`, in any proxy-wasm host.

use crate::cache::{self, Entry, Lookup, Secret, SlotKey, TokenHash};
use crate::config::Settings;
use crate::request::{self, HeaderBlock, Token};
use crate::whoami::{self, Failure, Outcome, MAX_BODY};
use std::cell::{Cell, RefCell};

/// What the filter needs from its host. `host.rs` maps each to proxy-wasm calls; every method
/// absorbs host errors (a failed read is "absent", a failed write is reported) so no host status
/// can make the filter panic.
pub trait Host {
    /// All request headers, in one host call.
    fn request_headers(&self) -> HeaderBlock;
    fn set_request_header(&self, name: &str, value: &[u8]);
    fn remove_request_header(&self, name: &str);
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
    /// The value and CAS of a shared-data key; CAS 0 when the key is absent.
    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, u32);
    fn shared_set(&self, key: &str, value: &[u8], cas: u32) -> SetStatus;
    fn now_ms(&self) -> u64;
    fn random(&self, buf: &mut [u8]) -> bool;
    /// Starts an HTTP callout; the answer comes back through `Router::on_whoami_response`.
    fn dispatch(&self, upstream: &str, headers: &[(&str, &str)], timeout_ms: u32) -> bool;
    fn send_response(&self, status: u16, headers: &[(&str, &str)], body: &[u8]);
    fn resume(&self);
    fn count(&self, counter: Counter);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetStatus {
    Ok,
    CasMismatch,
    Failed,
}

/// What the request-headers callback returns to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    Pause,
}

/// The filter's counters. Names are stable: operators alert on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    Requests,
    NoToken,
    CacheHits,
    CacheMisses,
    NegativeHits,
    BackoffHits,
    WhoamiOk,
    WhoamiDenied,
    WhoamiFailed,
    Fallbacks,
    Rejected,
    CacheWriteFailures,
    Refreshes,
}

impl Counter {
    pub const ALL: [Counter; 13] = [
        Counter::Requests,
        Counter::NoToken,
        Counter::CacheHits,
        Counter::CacheMisses,
        Counter::NegativeHits,
        Counter::BackoffHits,
        Counter::WhoamiOk,
        Counter::WhoamiDenied,
        Counter::WhoamiFailed,
        Counter::Fallbacks,
        Counter::Rejected,
        Counter::CacheWriteFailures,
        Counter::Refreshes,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Counter::Requests => "matrix_sync_router_requests",
            Counter::NoToken => "matrix_sync_router_no_token",
            Counter::CacheHits => "matrix_sync_router_cache_hits",
            Counter::CacheMisses => "matrix_sync_router_cache_misses",
            Counter::NegativeHits => "matrix_sync_router_negative_hits",
            Counter::BackoffHits => "matrix_sync_router_backoff_hits",
            Counter::WhoamiOk => "matrix_sync_router_whoami_ok",
            Counter::WhoamiDenied => "matrix_sync_router_whoami_denied",
            Counter::WhoamiFailed => "matrix_sync_router_whoami_failed",
            Counter::Fallbacks => "matrix_sync_router_fallbacks",
            Counter::Rejected => "matrix_sync_router_rejected",
            Counter::CacheWriteFailures => "matrix_sync_router_cache_write_failures",
            Counter::Refreshes => "matrix_sync_router_refreshes",
        }
    }
}

/// Per-request state between the request headers and the whoami answer. It holds the token's
/// hash, never the token.
#[derive(Debug, Default)]
pub enum Phase {
    #[default]
    Idle,
    AwaitingWhoami {
        hash: TokenHash,
    },
    /// The request is routed by the cached user; a whoami refresh of its entry is in flight.
    /// `paused`: the request waits for it (hosts without background callouts).
    Refreshing {
        hash: TokenHash,
        paused: bool,
    },
}

/// Size of each VM's own table of recent answers (a power of two).
const LOCAL_SLOTS: usize = 4096;

/// A user answer kept in a VM's own memory until the shared entry's refresh window, so a hit
/// costs no shared-data read (each data-returning host call costs about a microsecond in Envoy).
struct Local {
    hash: TokenHash,
    refresh_at: u64,
    user: Box<str>,
}

/// How often a cache write is retried after a CAS mismatch before it is given up.
const WRITE_ATTEMPTS: usize = 4;
/// Minimum time between two warnings about whoami failures from one VM.
const WARN_INTERVAL_MS: u64 = 10_000;

/// One VM's router: the validated settings and the process-wide hash secret.
pub struct Router {
    pub settings: Settings,
    secret: Cell<Secret>,
    /// Shared-data key of the secret (`<prefix>/secret`), re-read on every miss.
    secret_key: String,
    local: RefCell<Vec<Option<Local>>>,
    last_warn_ms: Cell<u64>,
    suppressed_warnings: Cell<u32>,
}

impl Router {
    /// Builds the router, fetching the process's secret from shared data or creating it. Fails
    /// when shared data cannot hold it (for ngx_wasm_module: the `shm_kv` zone is missing).
    pub fn new<H: Host>(settings: Settings, host: &H) -> Result<Router, String> {
        let secret_key = cache::secret_key(&settings.config.shared_data_prefix);
        let secret = load_or_create_secret(host, &secret_key)?;
        Ok(Router {
            settings,
            secret: Cell::new(secret),
            secret_key,
            local: RefCell::new((0..LOCAL_SLOTS).map(|_| None).collect()),
            last_warn_ms: Cell::new(0),
            suppressed_warnings: Cell::new(0),
        })
    }

    pub fn on_request_headers<H: Host>(&self, host: &H, phase: &mut Phase) -> Verdict {
        let headers = host.request_headers();
        let Some(path) = headers.get(":path") else {
            return Verdict::Continue;
        };
        let (path_only, query) = request::split_path(path);
        if !self.settings.sync_paths.is_match(path_only) {
            return Verdict::Continue;
        }
        host.count(Counter::Requests);
        match request::find_token(headers.get("authorization"), query) {
            Token::Absent => {
                host.count(Counter::NoToken);
                self.scrub(host, Some(&headers));
                Verdict::Continue
            }
            Token::Malformed(token) => {
                let hash = self.secret.get().hash(&token);
                self.route_fallback(host, Some(&headers), &hash);
                Verdict::Continue
            }
            Token::Valid(token) => self.route_token(host, &headers, phase, &token),
        }
    }

    fn route_token<H: Host>(
        &self,
        host: &H,
        headers: &HeaderBlock,
        phase: &mut Phase,
        token: &[u8],
    ) -> Verdict {
        let now = host.now_ms();
        let mut hash = self.secret.get().hash(token);
        if self.hit_local(host, headers, &hash, now) {
            return Verdict::Continue;
        }
        let mut found = self.read_slots(host, &hash, now);
        if found.is_none() && self.refresh_secret(host) {
            // Another VM's secret won: look again where that VM would have written.
            hash = self.secret.get().hash(token);
            found = self.read_slots(host, &hash, now);
        }
        let Some((key, bytes, cas)) = found else {
            host.count(Counter::CacheMisses);
            return self.call_whoami(host, headers, phase, token, hash);
        };
        match cache::lookup(&bytes, &hash, now) {
            Lookup::User {
                user,
                refresh,
                refresh_at,
            } => {
                host.count(Counter::CacheHits);
                self.set_key(host, Some(headers), user.as_bytes());
                if refresh {
                    let slot = (key, &bytes[..], cas);
                    return self.start_refresh(host, headers, phase, token, hash, slot, now);
                }
                self.remember(&hash, refresh_at, user, now);
                Verdict::Continue
            }
            Lookup::Denied { status, body } => {
                host.count(Counter::NegativeHits);
                self.deny(host, Some(headers), &hash, status, body)
            }
            Lookup::Backoff => {
                host.count(Counter::BackoffHits);
                self.route_fallback(host, Some(headers), &hash);
                Verdict::Continue
            }
            // `read_slots` returns only usable entries.
            Lookup::Miss => {
                host.count(Counter::CacheMisses);
                self.call_whoami(host, headers, phase, token, hash)
            }
        }
    }

    /// A hit in this VM's own table: header set, nothing read from shared data.
    fn hit_local<H: Host>(
        &self,
        host: &H,
        headers: &HeaderBlock,
        hash: &TokenHash,
        now: u64,
    ) -> bool {
        let local = self.local.borrow();
        match local.get(hash.local_index(LOCAL_SLOTS)) {
            Some(Some(e)) if e.hash == *hash && now < e.refresh_at => {
                host.count(Counter::CacheHits);
                self.set_key(host, Some(headers), e.user.as_bytes());
                true
            }
            _ => false,
        }
    }

    fn remember(&self, hash: &TokenHash, refresh_at: u64, user: &str, now: u64) {
        if now < refresh_at {
            if let Some(slot) = self
                .local
                .borrow_mut()
                .get_mut(hash.local_index(LOCAL_SLOTS))
            {
                *slot = Some(Local {
                    hash: *hash,
                    refresh_at,
                    user: user.into(),
                });
            }
        }
    }

    fn forget(&self, hash: &TokenHash) {
        if let Some(slot) = self
            .local
            .borrow_mut()
            .get_mut(hash.local_index(LOCAL_SLOTS))
        {
            if slot.as_ref().is_some_and(|e| e.hash == *hash) {
                *slot = None;
            }
        }
    }

    fn slot_keys(&self, hash: &TokenHash) -> [SlotKey; 2] {
        let cfg = &self.settings.config;
        hash.slots(cfg.cache_capacity)
            .map(|slot| SlotKey::new(&cfg.shared_data_prefix, slot))
    }

    /// The token's usable entry from its first candidate slot that has one: key, bytes, CAS.
    fn read_slots<H: Host>(
        &self,
        host: &H,
        hash: &TokenHash,
        now: u64,
    ) -> Option<(SlotKey, Vec<u8>, u32)> {
        let keys = self.slot_keys(hash);
        let distinct = if keys[0].as_str() == keys[1].as_str() {
            1
        } else {
            2
        };
        keys[..distinct].iter().find_map(|key| {
            let (value, cas) = host.shared_get(key.as_str());
            let bytes = value?;
            (cache::lookup(&bytes, hash, now) != Lookup::Miss).then_some((*key, bytes, cas))
        })
    }

    /// Claims the refresh of an entry in its refresh window with a CAS write; only the request
    /// whose write wins calls whoami (without pausing), every other one just hits.
    #[allow(clippy::too_many_arguments)]
    fn start_refresh<H: Host>(
        &self,
        host: &H,
        headers: &HeaderBlock,
        phase: &mut Phase,
        token: &[u8],
        hash: TokenHash,
        (key, bytes, cas): (SlotKey, &[u8], u32),
        now: u64,
    ) -> Verdict {
        let timeout = u64::from(self.settings.config.whoami_timeout_ms);
        let until = now.saturating_add(timeout).saturating_add(1000);
        let Some(claimed) = cache::claim(bytes, until) else {
            return Verdict::Continue;
        };
        if host.shared_set(key.as_str(), &claimed, cas) != SetStatus::Ok
            || !self.dispatch_whoami(host, headers, token)
        {
            return Verdict::Continue;
        }
        host.count(Counter::Refreshes);
        let paused = !self.settings.config.proxy.callouts_run_in_background();
        *phase = Phase::Refreshing { hash, paused };
        if paused {
            Verdict::Pause
        } else {
            Verdict::Continue
        }
    }

    fn call_whoami<H: Host>(
        &self,
        host: &H,
        headers: &HeaderBlock,
        phase: &mut Phase,
        token: &[u8],
        hash: TokenHash,
    ) -> Verdict {
        if self.dispatch_whoami(host, headers, token) {
            *phase = Phase::AwaitingWhoami { hash };
            return Verdict::Pause;
        }
        // The host refused the call outright (unknown cluster, bad upstream): a config problem,
        // so say it loudly but keep routing.
        host.count(Counter::WhoamiFailed);
        self.warn(
            host,
            &format!(
                "whoami callout to `{}` was refused by the host; check whoami_upstream",
                self.settings.config.whoami_upstream
            ),
        );
        self.route_fallback(host, Some(headers), &hash);
        Verdict::Continue
    }

    /// Starts the whoami callout for `token`; false when the host refused it.
    fn dispatch_whoami<H: Host>(&self, host: &H, headers: &HeaderBlock, token: &[u8]) -> bool {
        let cfg = &self.settings.config;
        // `find_token` only lets visible ASCII through, so this never fails.
        let Ok(token) = std::str::from_utf8(token) else {
            return false;
        };
        let text = |name| headers.get(name).and_then(|v| std::str::from_utf8(v).ok());
        let source = host
            .property(&["source", "address"])
            .and_then(|v| String::from_utf8(v).ok());
        let client = whoami::ClientInfo {
            user_agent: text("user-agent"),
            forwarded_for: text("x-forwarded-for"),
            forwarded_proto: text("x-forwarded-proto"),
            source_address: source.as_deref(),
        };
        let headers = whoami::callout_headers(cfg, token, client);
        host.dispatch(
            &cfg.whoami_upstream,
            &headers.as_pairs(),
            cfg.whoami_timeout_ms,
        )
    }

    /// Handles the whoami answer: `status` is `:status` (None when the host delivered none),
    /// `body` the body when it was at most `MAX_BODY` bytes.
    pub fn on_whoami_response<H: Host>(
        &self,
        host: &H,
        phase: &mut Phase,
        status: Option<&[u8]>,
        body: Option<&[u8]>,
    ) {
        let body = body.filter(|b| b.len() <= MAX_BODY);
        match std::mem::take(phase) {
            Phase::Idle => {}
            Phase::AwaitingWhoami { hash } => {
                self.answer_waiting_request(host, hash, whoami::interpret(status, body));
            }
            Phase::Refreshing { hash, paused } => {
                self.finish_refresh(host, hash, whoami::interpret(status, body));
                // Whatever the answer, the request goes on as it was routed (cached user).
                if paused {
                    host.resume();
                }
            }
        }
    }

    fn answer_waiting_request<H: Host>(&self, host: &H, hash: TokenHash, outcome: Outcome) {
        match outcome {
            Outcome::User(user) => {
                host.count(Counter::WhoamiOk);
                self.store_user(host, &hash, &user);
                self.set_key(host, None, user.as_bytes());
                host.resume();
            }
            Outcome::Denied { status, body } => {
                host.count(Counter::WhoamiDenied);
                self.store_denied(host, &hash, status, &body);
                if self.deny(host, None, &hash, status, &body) == Verdict::Continue {
                    host.resume();
                }
            }
            Outcome::Failed(failure) => {
                host.count(Counter::WhoamiFailed);
                self.warn(host, &describe(failure));
                let backoff_s = self.settings.config.failure_backoff_s;
                if backoff_s > 0 {
                    let expires = host.now_ms().saturating_add(u64::from(backoff_s) * 1000);
                    self.store(host, &hash, expires, expires, &Entry::Backoff);
                }
                self.route_fallback(host, None, &hash);
                host.resume();
            }
        }
    }

    /// A refresh answer only updates the cache: its request is already routed by the cached user.
    /// A failure leaves the entry as it is; its claim lapses and a later request tries again.
    fn finish_refresh<H: Host>(&self, host: &H, hash: TokenHash, outcome: Outcome) {
        match outcome {
            Outcome::User(user) => {
                host.count(Counter::WhoamiOk);
                self.store_user(host, &hash, &user);
            }
            Outcome::Denied { status, body } => {
                // Logged out or locked since: from now on the token is treated as rejected.
                host.count(Counter::WhoamiDenied);
                self.forget(&hash);
                self.store_denied(host, &hash, status, &body);
            }
            Outcome::Failed(failure) => {
                host.count(Counter::WhoamiFailed);
                self.warn(host, &format!("{} (cache refresh)", describe(failure)));
            }
        }
    }

    /// A token Synapse rejected: answered at the edge when configured, else forwarded with the
    /// fallback key so the worker gives Synapse's own error.
    fn deny<H: Host>(
        &self,
        host: &H,
        headers: Option<&HeaderBlock>,
        hash: &TokenHash,
        status: u16,
        body: &[u8],
    ) -> Verdict {
        if self.settings.config.reject_invalid_tokens {
            host.count(Counter::Rejected);
            let body: &[u8] = if body.is_empty() {
                br#"{"errcode":"M_UNKNOWN_TOKEN","error":"Invalid access token passed."}"#
            } else {
                body
            };
            host.send_response(status, &[("content-type", "application/json")], body);
            Verdict::Pause
        } else {
            self.route_fallback(host, headers, hash);
            Verdict::Continue
        }
    }

    fn route_fallback<H: Host>(&self, host: &H, headers: Option<&HeaderBlock>, hash: &TokenHash) {
        host.count(Counter::Fallbacks);
        self.set_key(host, headers, &hash.fallback_key());
    }

    /// Sets the hash-key header, replacing any copy the client sent. `headers` is the request's
    /// header block if the caller has it (read again only where the host needs a scan).
    fn set_key<H: Host>(&self, host: &H, headers: Option<&HeaderBlock>, value: &[u8]) {
        if self.settings.config.proxy.scrub_needs_header_scan() {
            self.scrub(host, headers);
        }
        host.set_request_header(&self.settings.config.header_name, value);
    }

    /// Removes every client copy of the hash-key header.
    fn scrub<H: Host>(&self, host: &H, headers: Option<&HeaderBlock>) {
        let name = &self.settings.config.header_name;
        if !self.settings.config.proxy.scrub_needs_header_scan() {
            host.remove_request_header(name);
            return;
        }
        let fresh;
        let headers = match headers {
            Some(h) => h,
            None => {
                fresh = host.request_headers();
                &fresh
            }
        };
        for spelling in headers.spellings(name) {
            // Names come from the request; a name that is not UTF-8 cannot be this header.
            if let Ok(spelling) = std::str::from_utf8(spelling) {
                host.remove_request_header(spelling);
            }
        }
    }

    fn store_user<H: Host>(&self, host: &H, hash: &TokenHash, user: &str) {
        let now = host.now_ms();
        let ttl_ms = u64::from(self.settings.config.cache_ttl_s) * 1000;
        let expires = now.saturating_add(ttl_ms);
        let refresh_at = cache::refresh_at(now, ttl_ms);
        self.store(host, hash, expires, refresh_at, &Entry::User(user));
        self.remember(hash, refresh_at, user, now);
    }

    fn store_denied<H: Host>(&self, host: &H, hash: &TokenHash, status: u16, body: &[u8]) {
        let ttl_s = self.settings.config.negative_ttl_s;
        if ttl_s > 0 {
            let expires = host.now_ms().saturating_add(u64::from(ttl_s) * 1000);
            let entry = Entry::Denied { status, body };
            self.store(host, hash, expires, expires, &entry);
        }
    }

    /// Writes an entry into one of the token's two slots (`cache::choose_slot`) with
    /// read-then-CAS, which is right on both hosts: Envoy overwrites on CAS 0, ngx_wasm_module
    /// treats CAS 0 on an existing key as a mismatch. A user entry is not written over this
    /// token's user entry that is still fresh (another VM was first).
    fn store<H: Host>(
        &self,
        host: &H,
        hash: &TokenHash,
        expires: u64,
        refresh_at: u64,
        e: &Entry<'_>,
    ) {
        let bytes = cache::encode(hash, expires, refresh_at, e);
        let now = host.now_ms();
        let is_user = matches!(e, Entry::User(_));
        let keys = self.slot_keys(hash);
        for _ in 0..WRITE_ATTEMPTS {
            let [a, b] = keys.map(|k| host.shared_get(k.as_str()));
            let current = [a.0.as_deref(), b.0.as_deref()];
            let fresh = |c: &[u8]| cache::holds_fresh_user(c, hash, now);
            if is_user && current.iter().any(|c| c.is_some_and(fresh)) {
                return;
            }
            let i = cache::choose_slot(current, hash, now);
            let cas = if i == 0 { a.1 } else { b.1 };
            match host.shared_set(keys[i].as_str(), &bytes, cas) {
                SetStatus::Ok => return,
                SetStatus::CasMismatch => continue,
                SetStatus::Failed => break,
            }
        }
        host.count(Counter::CacheWriteFailures);
    }

    /// Re-reads the shared secret; true when it differs from this VM's (another VM won the race
    /// to create it, or it was evicted and re-created).
    fn refresh_secret<H: Host>(&self, host: &H) -> bool {
        let key = &self.secret_key;
        let (value, cas) = host.shared_get(key);
        match value.as_deref().and_then(Secret::from_bytes) {
            Some(shared) if shared != self.secret.get() => {
                self.secret.set(shared);
                true
            }
            Some(_) => false,
            None => {
                // Evicted (ngx_wasm_module zones evict): put ours back so the others converge.
                let _ = host.shared_set(key, self.secret.get().as_bytes(), cas);
                false
            }
        }
    }

    fn warn<H: Host>(&self, host: &H, message: &str) {
        let now = host.now_ms();
        if now.saturating_sub(self.last_warn_ms.get()) < WARN_INTERVAL_MS
            && self.last_warn_ms.get() != 0
        {
            self.suppressed_warnings
                .set(self.suppressed_warnings.get().saturating_add(1));
            return;
        }
        let suppressed = self.suppressed_warnings.replace(0);
        self.last_warn_ms.set(now.max(1));
        if suppressed > 0 {
            log::warn!("{message} ({suppressed} similar warnings suppressed)");
        } else {
            log::warn!("{message}");
        }
    }
}

fn describe(failure: Failure) -> String {
    let what = match failure {
        Failure::NoResponse => "no response (unreachable, reset or timed out)".to_string(),
        Failure::Status(s) => format!("status {s}"),
        Failure::Oversized => format!("a body over {MAX_BODY} bytes"),
        Failure::Malformed => "a body without a string user_id".to_string(),
        Failure::InvalidUserId => "a user_id that is not a Matrix user ID".to_string(),
    };
    format!("whoami failed with {what}; routing with the fallback key")
}

fn load_or_create_secret<H: Host>(host: &H, key: &str) -> Result<Secret, String> {
    let unusable = || {
        format!(
            "field `shared_data_prefix`: shared data key `{key}` cannot be stored \
             (for ngx_wasm_module, declare the shm_kv zone named like the prefix)"
        )
    };
    for _ in 0..WRITE_ATTEMPTS {
        let (value, cas) = host.shared_get(key);
        if let Some(secret) = value.as_deref().and_then(Secret::from_bytes) {
            return Ok(secret);
        }
        let mut fresh = [0u8; cache::SECRET_LEN];
        if !host.random(&mut fresh) {
            return Err("no random source to key the token hash".into());
        }
        match host.shared_set(key, &fresh, cas) {
            // Read back on the next turn: a racing VM may have written its own.
            SetStatus::Ok | SetStatus::CasMismatch => continue,
            SetStatus::Failed => return Err(unusable()),
        }
    }
    Err(unusable())
}

#[cfg(test)]
mod tests;
