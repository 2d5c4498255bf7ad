//! The decision engine: what to do with each request, each whoami answer and each tick,
//! written against the `Host` port so that it runs natively in unit tests and, through
//! `host.rs`, in any proxy-wasm host.
//!
//! A request's path through it: not a sync path → untouched; no token → no key; this VM's
//! memory → key; a whoami call of this VM in flight for the token → wait for it; the token's
//! shared slots → key, rejection, back-off, or another VM's call in flight (wait and poll);
//! nothing → claim the in-flight marker and call whoami (within `max_whoami_in_flight`).

use crate::cache::{Entry, Secret, TokenHash};
use crate::config::Settings;
use crate::matrix::{self, Rejection};
use crate::memory::Memory;
use crate::metrics::{Counter, Tally};
use crate::port::{ContextId, Host, Level, Verdict};
use crate::request::{self, Token};
use crate::route::{self, Source, SyncKind};
use crate::slots::{Cached, Claim, Read, Slots};
use crate::tokens;
use crate::whoami::{self, Failure, Outcome, MAX_BODY};
use std::cell::{Cell, RefCell};

/// Tick period while nothing waits (counter flush, clock).
pub const TICK_MS: u32 = 1000;
/// Tick period while requests wait for another VM's whoami answer (how often its slot is read).
pub const FAST_TICK_MS: u32 = 20;
/// Extra time a marker or a waiter allows beyond the callout timeout.
const MARGIN_MS: u64 = 1000;
/// Most requests that may wait for one call, and most tokens a VM may watch at once; beyond
/// that requests are routed with the fallback key at once.
const MAX_WAITERS: usize = 1024;
const MAX_WATCHED: usize = 256;
/// The hit path reads the clock from the last tick, and from the host every this many hits, so
/// a host that never ticks still ages its entries.
const CLOCK_EVERY: u32 = 256;
/// How long an overdue call is kept for its late answer.
const FORGET_MS: u64 = 60_000;
/// Minimum time between two warnings about whoami failures from one VM.
const WARN_INTERVAL_MS: u64 = 10_000;

/// The routing key of a request.
enum Key<'a> {
    User(&'a str, Source),
    /// `~<16 hex>` of the token's keyed hash: one device's requests stay together.
    Fallback(&'a TokenHash),
}

/// One request on its way through the engine. It holds the token only as long as the request
/// headers callback runs; everything kept longer holds the keyed hash.
struct Req<'a> {
    id: ContextId,
    token: &'a [u8],
    /// The appservice user it masquerades as (`?user_id=`), part of its cache key.
    masquerade: Option<&'a str>,
    hash: TokenHash,
    now: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// The waiters have no key yet.
    Resolve,
    /// The request is routed by the cached user; the answer renews the entry.
    Refresh,
}

/// A whoami call of this VM in flight.
struct Call {
    token: u32,
    hash: TokenHash,
    purpose: Purpose,
    /// Requests to resume with the answer (on ngx_wasm_module only the one that made it).
    waiters: Vec<ContextId>,
    deadline: u64,
    /// Past its deadline: no longer counted or joined; its Envoy waiters have been routed with
    /// the fallback key. Kept until `FORGET_MS` later so a late answer still updates the cache
    /// and resumes an ngx request (the host answers every call it did not cancel).
    overdue: bool,
}

/// Requests waiting for another VM's call, seen through its in-flight marker.
struct Watch {
    hash: TokenHash,
    waiters: Vec<ContextId>,
    until: u64,
}

/// What the answer or a watched slot means for the requests that wait.
enum Settle<'a> {
    User(&'a str),
    Denied(Rejection),
    Fallback,
}

/// One plugin's engine in one VM.
pub struct Router {
    pub settings: Settings,
    secret: Cell<Secret>,
    slots: Slots,
    memory: Memory,
    tally: Tally,
    clock: Cell<u64>,
    clock_uses: Cell<u32>,
    calls: RefCell<Vec<Call>>,
    watches: RefCell<Vec<Watch>>,
    fast_tick: Cell<bool>,
    last_warn_ms: Cell<u64>,
    suppressed_warnings: Cell<u32>,
}

impl Router {
    /// Builds the router, fetching the process's secret from shared data or creating it.
    pub fn new<H: Host>(settings: Settings, host: &H) -> Result<Router, String> {
        let cfg = &settings.config;
        let slots = Slots::new(&cfg.shared_data_prefix, cfg.cache_capacity);
        let secret = slots
            .load_or_create_secret(host)?
            .with_fallback(settings.fallback_secret);
        host.set_tick_period(TICK_MS);
        Ok(Router {
            secret: Cell::new(secret),
            slots,
            memory: Memory::default(),
            tally: Tally::default(),
            clock: Cell::new(host.now_ms()),
            clock_uses: Cell::new(0),
            calls: RefCell::new(Vec::new()),
            watches: RefCell::new(Vec::new()),
            fast_tick: Cell::new(false),
            last_warn_ms: Cell::new(0),
            suppressed_warnings: Cell::new(0),
            settings,
        })
    }

    // ---- request headers -----------------------------------------------------------------

    pub fn on_request_headers<H: Host>(&self, host: &H, id: ContextId) -> Verdict {
        if self.settings.path_unneeded() {
            // The proxy runs the filter on sync routes only (`trust_route_match`): a request
            // with a Bearer token needs neither its path nor its query.
            let authorization = host.request_header("authorization");
            if let Token::Valid(token) = request::find_token(authorization.as_deref(), None) {
                self.count(host, Counter::Requests);
                let hash = self.secret.get().hash(&token);
                let now = self.coarse_now(host);
                let req = Req {
                    id,
                    token: &token,
                    masquerade: None,
                    hash,
                    now,
                };
                return self.resolve(host, req);
            }
        }
        let Some(path) = host.request_header(":path") else {
            return Verdict::Continue;
        };
        let (path_only, query) = request::split_path(&path);
        if path_only.len() > crate::paths::MAX_PATH_LEN {
            self.overlong(host);
            return Verdict::Continue;
        }
        if !self.settings.sync_paths.matches(path_only) {
            if self.settings.room_keys() {
                self.room_key(host, path_only);
            }
            return Verdict::Continue;
        }
        self.count(host, Counter::Requests);
        if self.settings.sync_kinds() || self.settings.config.filter_state {
            self.mark_kind(host, route::sync_kind(path_only, query));
        }
        let authorization = host.request_header("authorization");
        // A form POST's body may hold the `access_token` Synapse uses instead of the query's.
        let form_body = || {
            let method = host.request_header(":method");
            let content_type = host.request_header("content-type");
            request::form_body_possible(method.as_deref(), content_type.as_deref())
        };
        match request::find_token_with(authorization.as_deref(), query, form_body) {
            Token::Absent => {
                self.count(host, Counter::NoToken);
                self.clear_key(host);
                Verdict::Continue
            }
            Token::Malformed(token) => {
                let hash = self.secret.get().hash(&token);
                self.route(host, Key::Fallback(&hash));
                Verdict::Continue
            }
            Token::Valid(token) => {
                let cfg = &self.settings.config;
                if !cfg.native_token_server_name.is_empty() {
                    if let Some(verdict) = self.decode_locally(host, &token) {
                        return verdict;
                    }
                }
                if cfg.refuse_bad_mas_tokens && tokens::mas_checksum_ok(&token) == Some(false) {
                    // Garbage shaped like a MAS token costs Synapse nothing.
                    let hash = self.secret.get().hash(&token);
                    self.route(host, Key::Fallback(&hash));
                    return Verdict::Continue;
                }
                let masquerade = query
                    .filter(|_| cfg.appservice_masquerading)
                    .and_then(|q| request::query_param(q, b"user_id"));
                let masquerade = masquerade
                    .as_deref()
                    .and_then(|u| std::str::from_utf8(u).ok())
                    .filter(|u| matrix::is_user_id(u));
                let now = self.coarse_now(host);
                let req = Req {
                    id,
                    token: &token,
                    masquerade,
                    hash: self.secret.get().hash_as(&token, masquerade),
                    now,
                };
                self.resolve(host, req)
            }
        }
    }

    fn resolve<H: Host>(&self, host: &H, mut req: Req<'_>) -> Verdict {
        let hit = self.memory.with_user(&req.hash, req.now, |user| {
            self.count(host, Counter::CacheHits);
            self.route(host, Key::User(user, Source::Cache));
        });
        if hit.is_some() {
            return Verdict::Continue;
        }
        req.now = self.exact_now(host);
        if let Some(verdict) = self.join_call(host, &req) {
            return verdict;
        }
        let mut found = self.slots.read(host, &req.hash, req.now);
        if found.is_none() {
            if let Some(newer) = self.slots.newer_secret(host, self.secret.get()) {
                // Another VM's secret won: look where that VM would have written.
                self.secret.set(newer);
                req.hash = newer.hash_as(req.token, req.masquerade);
                found = self.slots.read(host, &req.hash, req.now);
            }
        }
        match found {
            Some(read) => self.act(host, &req, read),
            None => {
                self.count(host, Counter::CacheMisses);
                self.call(host, &req)
            }
        }
    }

    /// Attaches the request to this VM's call for the same token, if there is one.
    fn join_call<H: Host>(&self, host: &H, req: &Req<'_>) -> Option<Verdict> {
        let mut calls = self.calls.try_borrow_mut().ok()?;
        let call = calls
            .iter_mut()
            .find(|c| c.hash == req.hash && c.purpose == Purpose::Resolve && !c.overdue)?;
        self.count(host, Counter::Coalesced);
        if self.settings.config.proxy.resumes_other_contexts() && call.waiters.len() < MAX_WAITERS {
            call.waiters.push(req.id);
            return Some(Verdict::Pause);
        }
        drop(calls);
        // This host cannot resume a request from another one's answer (or too many wait).
        self.route(host, Key::Fallback(&req.hash));
        Some(Verdict::Continue)
    }

    /// Acts on what the shared slots know.
    fn act<H: Host>(&self, host: &H, req: &Req<'_>, read: Read) -> Verdict {
        match &read.cached {
            Cached::User {
                user,
                refresh,
                refresh_at,
            } => {
                self.count(host, Counter::CacheHits);
                self.route(host, Key::User(user, Source::Cache));
                if *refresh {
                    return self.refresh(host, req, &read);
                }
                self.memory.remember(&req.hash, *refresh_at, user, req.now);
                Verdict::Continue
            }
            Cached::Denied(rejection) => {
                self.count(host, Counter::NegativeHits);
                self.deny(host, &req.hash, rejection)
            }
            Cached::Backoff => {
                self.count(host, Counter::BackoffHits);
                self.route(host, Key::Fallback(&req.hash));
                Verdict::Continue
            }
            Cached::Pending { until } => {
                self.count(host, Counter::Coalesced);
                if self.settings.config.proxy.resumes_other_contexts()
                    && self.watch(host, req, *until)
                {
                    return Verdict::Pause;
                }
                self.route(host, Key::Fallback(&req.hash));
                Verdict::Continue
            }
        }
    }

    /// Adds the request to the watchers of another VM's call.
    fn watch<H: Host>(&self, host: &H, req: &Req<'_>, until: u64) -> bool {
        let Ok(mut watches) = self.watches.try_borrow_mut() else {
            return false;
        };
        let count = watches.len();
        match watches.iter_mut().find(|w| w.hash == req.hash) {
            Some(w) if w.waiters.len() < MAX_WAITERS => w.waiters.push(req.id),
            Some(_) => return false,
            None if count < MAX_WATCHED => watches.push(Watch {
                hash: req.hash,
                waiters: vec![req.id],
                until,
            }),
            None => return false,
        }
        drop(watches);
        self.set_fast_tick(host, true);
        true
    }

    /// Calls whoami for a token nobody knows, unless too many calls are in flight already.
    fn call<H: Host>(&self, host: &H, req: &Req<'_>) -> Verdict {
        let cfg = &self.settings.config;
        if self.calls_in_flight() >= cfg.max_whoami_in_flight as usize {
            // A restart storm: route by the device now, resolve the user on a later request.
            self.count(host, Counter::Shed);
            self.route(host, Key::Fallback(&req.hash));
            return Verdict::Continue;
        }
        let deadline = req
            .now
            .saturating_add(u64::from(cfg.whoami_timeout_ms))
            .saturating_add(MARGIN_MS);
        match self.slots.claim_pending(host, &req.hash, req.now, deadline) {
            Claim::Won | Claim::Unwritable => {}
            Claim::Lost(read) => return self.act(host, req, read),
        }
        let Some(token) = self.dispatch_whoami(host, req) else {
            // The host refused the call outright (unknown cluster, bad upstream): a config
            // problem, so say it loudly, back off, and keep routing.
            self.count(host, Counter::WhoamiFailed);
            self.warn(
                host,
                &format!(
                    "whoami callout to `{}` was refused by the host; check whoami_upstream",
                    cfg.whoami_upstream
                ),
            );
            self.store_backoff(host, &req.hash, req.now);
            self.route(host, Key::Fallback(&req.hash));
            return Verdict::Continue;
        };
        self.track(Call {
            token,
            hash: req.hash,
            purpose: Purpose::Resolve,
            waiters: vec![req.id],
            deadline,
            overdue: false,
        });
        Verdict::Pause
    }

    /// Claims the refresh of an entry in its refresh window; only the request whose claim wins
    /// calls whoami. On Envoy it does not wait for the answer; on ngx_wasm_module, which drops a
    /// call whose request moved on, it waits (already routed by the cached user).
    fn refresh<H: Host>(&self, host: &H, req: &Req<'_>, read: &Read) -> Verdict {
        let cfg = &self.settings.config;
        let deadline = req
            .now
            .saturating_add(u64::from(cfg.whoami_timeout_ms))
            .saturating_add(MARGIN_MS);
        if self.calls_in_flight() >= cfg.max_whoami_in_flight as usize
            || !self.slots.claim_refresh(host, read, deadline)
        {
            return Verdict::Continue;
        }
        let Some(token) = self.dispatch_whoami(host, req) else {
            return Verdict::Continue;
        };
        self.count(host, Counter::Refreshes);
        let waits = !cfg.proxy.callouts_run_in_background();
        self.track(Call {
            token,
            hash: req.hash,
            purpose: Purpose::Refresh,
            waiters: if waits { vec![req.id] } else { Vec::new() },
            deadline,
            overdue: false,
        });
        if waits {
            Verdict::Pause
        } else {
            Verdict::Continue
        }
    }

    fn track(&self, call: Call) {
        if let Ok(mut calls) = self.calls.try_borrow_mut() {
            calls.push(call);
        }
    }

    fn calls_in_flight(&self) -> usize {
        self.calls
            .try_borrow()
            .map_or(usize::MAX, |c| c.iter().filter(|c| !c.overdue).count())
    }

    /// Starts the whoami callout for the request's token; its token id, None when refused.
    fn dispatch_whoami<H: Host>(&self, host: &H, req: &Req<'_>) -> Option<u32> {
        let cfg = &self.settings.config;
        // `find_token` only lets visible ASCII through, so this never fails.
        let token = std::str::from_utf8(req.token).ok()?;
        let ua = host.request_header("user-agent");
        let xff = host.request_header("x-forwarded-for");
        let proto = host.request_header("x-forwarded-proto");
        fn text<B: std::ops::Deref<Target = [u8]>>(v: &Option<B>) -> Option<&str> {
            v.as_deref().and_then(|v| std::str::from_utf8(v).ok())
        }
        let source = host
            .property(&["source", "address"])
            .and_then(|v| String::from_utf8(v).ok());
        let client = whoami::ClientInfo {
            user_agent: text(&ua),
            forwarded_for: text(&xff),
            forwarded_proto: text(&proto),
            source_address: source.as_deref(),
            masquerade: req.masquerade,
        };
        let headers = whoami::callout_headers(cfg, token, client);
        host.dispatch(
            &cfg.whoami_upstream,
            &headers.as_pairs(),
            cfg.whoami_timeout_ms,
        )
    }

    // ---- whoami answers ------------------------------------------------------------------

    /// Handles a callout answer: `status` is `:status` (None when the host delivered none),
    /// `body` the body when it was at most `MAX_BODY` bytes. An answer to a call this engine
    /// no longer knows (forgotten long after its deadline) resumes the request it belongs to
    /// where that is the current one (ngx_wasm_module), so no request is left paused; elsewhere
    /// it is ignored.
    pub fn on_whoami_response<H: Host>(
        &self,
        host: &H,
        token: u32,
        status: Option<&[u8]>,
        body: Option<&[u8]>,
    ) {
        let Some(call) = self.take_call(token) else {
            if !self.settings.config.proxy.resumes_other_contexts() {
                // Its key is unknown here: no key (and no client copy) is the safe state.
                self.clear_key(host);
                host.resume();
            }
            return;
        };
        let now = self.exact_now(host);
        let outcome = whoami::interpret(status, body.filter(|b| b.len() <= MAX_BODY));
        let settle = match &outcome {
            Outcome::User(user) => {
                self.count(host, Counter::WhoamiOk);
                self.store_user(host, &call.hash, user, now);
                Settle::User(user)
            }
            Outcome::Denied(rejection) => {
                // Logged out or locked since a cached answer: rejected from now on.
                self.count(host, Counter::WhoamiDenied);
                self.memory.forget(&call.hash);
                self.store_denied(host, &call.hash, rejection, now);
                Settle::Denied(*rejection)
            }
            Outcome::Failed(failure) => {
                self.count(host, Counter::WhoamiFailed);
                let refresh = call.purpose == Purpose::Refresh;
                self.warn(host, &describe(*failure, refresh));
                // A failed refresh leaves the entry as it is; its claim lapses and a later
                // request tries again.
                if !refresh {
                    self.store_backoff(host, &call.hash, now);
                }
                Settle::Fallback
            }
        };
        match call.purpose {
            Purpose::Resolve => self.settle(host, &call.waiters, &call.hash, &settle),
            // The waiter (ngx) was routed by the cached user before it paused.
            Purpose::Refresh => {
                for &id in &call.waiters {
                    if self.enter(host, id) {
                        host.resume();
                    }
                }
            }
        }
    }

    fn take_call(&self, token: u32) -> Option<Call> {
        let mut calls = self.calls.try_borrow_mut().ok()?;
        let i = calls.iter().position(|c| c.token == token)?;
        Some(calls.swap_remove(i))
    }

    /// Gives every waiting request its key (or its edge answer) and resumes it.
    fn settle<H: Host>(&self, host: &H, waiters: &[ContextId], hash: &TokenHash, how: &Settle) {
        for &id in waiters {
            if !self.enter(host, id) {
                continue; // the request went away meanwhile
            }
            let verdict = match how {
                Settle::User(user) => {
                    self.route(host, Key::User(user, Source::Whoami));
                    Verdict::Continue
                }
                Settle::Denied(rejection) => self.deny(host, hash, rejection),
                Settle::Fallback => {
                    self.route(host, Key::Fallback(hash));
                    Verdict::Continue
                }
            };
            if verdict == Verdict::Continue {
                host.resume();
            }
        }
    }

    /// Makes `id` current. Where contexts cannot be switched (ngx_wasm_module), the only waiter
    /// is the request whose own callback this is.
    fn enter<H: Host>(&self, host: &H, id: ContextId) -> bool {
        !self.settings.config.proxy.resumes_other_contexts() || host.enter(id)
    }

    // ---- ticks ---------------------------------------------------------------------------

    /// The periodic work: clock, counters, calls the host never answered, watched slots.
    pub fn on_tick<H: Host>(&self, host: &H) {
        let now = self.exact_now(host);
        self.flush(host);
        // Calls past their deadline (the host should have answered with a timeout): stop
        // counting them, and route their Envoy waiters now.
        let mut late: Vec<(TokenHash, Vec<ContextId>)> = Vec::new();
        if let Ok(mut calls) = self.calls.try_borrow_mut() {
            for c in calls.iter_mut().filter(|c| !c.overdue && c.deadline <= now) {
                c.overdue = true;
                if self.settings.config.proxy.resumes_other_contexts() {
                    late.push((c.hash, std::mem::take(&mut c.waiters)));
                }
            }
            calls.retain(|c| now < c.deadline.saturating_add(FORGET_MS));
        }
        for (hash, waiters) in late {
            self.count(host, Counter::WhoamiFailed);
            self.settle(host, &waiters, &hash, &Settle::Fallback);
        }
        self.poll_watches(host, now);
    }

    /// Reads the slot of every watched token; settles the waiters of those that are answered.
    fn poll_watches<H: Host>(&self, host: &H, now: u64) {
        let watched: Vec<Watch> = match self.watches.try_borrow_mut() {
            Ok(mut w) => w.drain(..).collect(),
            Err(_) => return,
        };
        let mut still = Vec::new();
        for w in watched {
            let found = self.slots.read(host, &w.hash, now).map(|r| r.cached);
            let settle = match &found {
                Some(Cached::User {
                    user, refresh_at, ..
                }) => {
                    self.memory.remember(&w.hash, *refresh_at, user, now);
                    Settle::User(user)
                }
                Some(Cached::Denied(rejection)) => Settle::Denied(*rejection),
                Some(Cached::Pending { .. }) if now < w.until => {
                    still.push(w);
                    continue;
                }
                _ => Settle::Fallback,
            };
            self.settle(host, &w.waiters, &w.hash, &settle);
        }
        let waiting = !still.is_empty();
        if let Ok(mut w) = self.watches.try_borrow_mut() {
            w.extend(still);
        }
        self.set_fast_tick(host, waiting);
    }

    fn set_fast_tick<H: Host>(&self, host: &H, fast: bool) {
        if self.fast_tick.replace(fast) != fast {
            host.set_tick_period(if fast { FAST_TICK_MS } else { TICK_MS });
        }
    }

    fn flush<H: Host>(&self, host: &H) {
        for (counter, n) in self.tally.take() {
            host.add_to_counter(counter, n);
        }
    }

    fn count<H: Host>(&self, host: &H, counter: Counter) {
        if self.tally.add(counter) {
            self.flush(host);
        }
    }

    /// The time of the last tick (read from the host every `CLOCK_EVERY` uses): the hit path
    /// needs no clock call, and entries age by at most a tick late.
    fn coarse_now<H: Host>(&self, host: &H) -> u64 {
        let uses = self.clock_uses.get().wrapping_add(1);
        self.clock_uses.set(uses);
        if uses.is_multiple_of(CLOCK_EVERY) {
            return self.exact_now(host);
        }
        self.clock.get()
    }

    fn exact_now<H: Host>(&self, host: &H) -> u64 {
        let now = host.now_ms();
        self.clock.set(now);
        now
    }

    // ---- routing keys and edge answers ---------------------------------------------------

    /// Routes a native Synapse token by the user it names, without any callout; None when the
    /// token is not one (ask whoami). A token shaped like one whose checksum fails is junk:
    /// the fallback key.
    fn decode_locally<H: Host>(&self, host: &H, token: &[u8]) -> Option<Verdict> {
        match tokens::native(token) {
            tokens::Native::Other => return None,
            tokens::Native::Localpart(local) => {
                let user = format!("@{local}:{}", self.settings.config.native_token_server_name);
                if matrix::is_user_id(&user) {
                    self.count(host, Counter::CacheHits);
                    self.route(host, Key::User(&user, Source::Local));
                    return Some(Verdict::Continue);
                }
            }
            tokens::Native::Broken => {}
        }
        let hash = self.secret.get().hash(token);
        self.route(host, Key::Fallback(&hash));
        Some(Verdict::Continue)
    }

    /// Puts the sync kind where the proxy routes on it, before the route is chosen: a header
    /// (then Envoy must match the route again: `clear_route_cache`), an nginx variable, and
    /// Envoy filter state for the access log.
    fn mark_kind<H: Host>(&self, host: &H, kind: SyncKind) {
        let cfg = &self.settings.config;
        let value = kind.as_str().as_bytes();
        if !cfg.sync_kind_header.is_empty() {
            host.set_request_header(&cfg.sync_kind_header, value);
            if cfg.proxy.clears_route_cache() {
                host.call_foreign("clear_route_cache");
            }
        }
        if !cfg.nginx_sync_kind_variable.is_empty() {
            host.set_property(&["ngx", &cfg.nginx_sync_kind_variable], value);
        }
        if cfg.filter_state {
            host.set_property(&["msr_sync_kind"], value);
        }
    }

    /// A room request's key: its room ID, from the path, without any callout. A request whose
    /// path holds no room ID carries none (the client's copies go).
    fn room_key<H: Host>(&self, host: &H, path: &[u8]) {
        let cfg = &self.settings.config;
        let room = if cfg.proxy.path_is_decoded() {
            route::room_id_in_decoded_path(&self.settings.room_paths, path)
        } else {
            route::room_id(&self.settings.room_paths, path)
        };
        let Some(room) = room else {
            if !cfg.room_header_name.is_empty() && self.settings.room_paths.matches(path) {
                host.remove_request_header(&cfg.room_header_name);
            }
            return;
        };
        if !cfg.room_header_name.is_empty() {
            host.set_request_header(&cfg.room_header_name, &room);
        }
        if !cfg.nginx_room_variable.is_empty() {
            host.set_property(&["ngx", &cfg.nginx_room_variable], &room);
        }
    }

    /// A token Synapse rejected: answered at the edge when configured, else forwarded with the
    /// fallback key so the worker gives Synapse's own error.
    fn deny<H: Host>(&self, host: &H, hash: &TokenHash, rejection: &Rejection) -> Verdict {
        if self.settings.config.reject_invalid_tokens {
            self.count(host, Counter::Rejected);
            let body = rejection.body();
            host.send_response(
                rejection.status,
                &[("content-type", "application/json")],
                body.as_bytes(),
            );
            Verdict::Pause
        } else {
            self.route(host, Key::Fallback(hash));
            Verdict::Continue
        }
    }

    /// Gives the request its key, where the host routes on it: the nginx variable, or the
    /// hash-key header (replacing every client copy).
    fn route<H: Host>(&self, host: &H, key: Key<'_>) {
        let fallback;
        let (value, source): (&[u8], Source) = match key {
            Key::User(user, source) => (user.as_bytes(), source),
            Key::Fallback(hash) => {
                self.count(host, Counter::Fallbacks);
                fallback = hash.fallback_key();
                (&fallback, Source::Fallback)
            }
        };
        let cfg = &self.settings.config;
        if cfg.filter_state {
            host.set_property(&["msr_source"], source.as_str().as_bytes());
        }
        if !cfg.nginx_variable.is_empty() {
            // nginx hashes on the variable and sets the upstream header from it; the client's
            // headers are left alone so `proxy_set_header` replaces them all.
            if !host.set_property(&["ngx", &cfg.nginx_variable], value) {
                // ngx_wasm_module cannot tell at start-up (no variables outside a request).
                self.warn(
                    host,
                    &format!(
                        "field `nginx_variable`: nginx variable `${}` cannot be set: declare it \
                         with `set ${} \"\";` in the server block",
                        cfg.nginx_variable, cfg.nginx_variable
                    ),
                );
            }
            return;
        }
        if cfg.proxy.scrub_needs_header_scan() {
            self.scrub(host);
        }
        host.set_request_header(&cfg.header_name, value);
    }

    /// A path longer than `MAX_PATH_LEN` is matched against nothing (no sync path and no room
    /// path is that long): it passes as a non-sync request, counted, and carries no key of the
    /// filter's — client copies of the headers the filter owns go, so a client cannot choose
    /// its key by lengthening the path.
    fn overlong<H: Host>(&self, host: &H) {
        self.count(host, Counter::OverlongPaths);
        self.clear_key(host);
        let cfg = &self.settings.config;
        for name in [&cfg.sync_kind_header, &cfg.room_header_name] {
            if !name.is_empty() {
                host.remove_request_header(name);
            }
        }
    }

    /// A request without a token carries no key: any client copy of the header goes.
    fn clear_key<H: Host>(&self, host: &H) {
        let cfg = &self.settings.config;
        if cfg.filter_state {
            host.set_property(&["msr_source"], Source::None.as_str().as_bytes());
        }
        if !cfg.nginx_variable.is_empty() {
            return; // the variable starts empty and no client can set it
        }
        if cfg.proxy.scrub_needs_header_scan() {
            self.scrub(host);
        } else {
            host.remove_request_header(&cfg.header_name);
        }
    }

    /// Removes every spelling of the hash-key header the client sent (hosts that keep the
    /// client's letter case).
    fn scrub<H: Host>(&self, host: &H) {
        let name = &self.settings.config.header_name;
        let headers = host.request_headers();
        for spelling in headers.spellings(name) {
            // Names come from the request; a name that is not UTF-8 cannot be this header.
            if let Ok(spelling) = std::str::from_utf8(spelling) {
                host.remove_request_header(spelling);
            }
        }
    }

    // ---- cache writes --------------------------------------------------------------------

    fn store_user<H: Host>(&self, host: &H, hash: &TokenHash, user: &str, now: u64) {
        let ttl_ms = u64::from(self.settings.config.cache_ttl_s) * 1000;
        let expires = now.saturating_add(ttl_ms);
        let refresh_at = crate::cache::refresh_at(now, ttl_ms);
        self.store(host, hash, now, (expires, refresh_at), &Entry::User(user));
        self.memory.remember(hash, refresh_at, user, now);
    }

    fn store_denied<H: Host>(&self, host: &H, hash: &TokenHash, r: &Rejection, now: u64) {
        let ttl_s = self.settings.config.negative_ttl_s;
        let expires = now.saturating_add(u64::from(ttl_s) * 1000);
        // With no negative caching the in-flight marker must still go: expire it now.
        let expires = if ttl_s == 0 { now } else { expires };
        self.store(host, hash, now, (expires, expires), &Entry::Denied(*r));
    }

    fn store_backoff<H: Host>(&self, host: &H, hash: &TokenHash, now: u64) {
        let backoff_s = self.settings.config.failure_backoff_s;
        let expires = now.saturating_add(u64::from(backoff_s) * 1000);
        self.store(host, hash, now, (expires, expires), &Entry::Backoff);
    }

    fn store<H: Host>(
        &self,
        host: &H,
        hash: &TokenHash,
        now: u64,
        times: (u64, u64),
        e: &Entry<'_>,
    ) {
        if !self.slots.store(host, hash, now, times, e) {
            self.count(host, Counter::CacheWriteFailures);
        }
    }

    fn warn<H: Host>(&self, host: &H, message: &str) {
        let now = self.clock.get();
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
            host.log(
                Level::Warn,
                &format!("{message} ({suppressed} similar warnings suppressed)"),
            );
        } else {
            host.log(Level::Warn, message);
        }
    }
}

fn describe(failure: Failure, refresh: bool) -> String {
    let what = match failure {
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

#[cfg(test)]
mod tests;
