//! The decision engine: what to do with each request, each whoami answer and each tick,
//! written against the `Host` port so that it runs natively in unit tests and, through
//! `host.rs`, in any proxy-wasm host.
//!
//! A request's path through it: not a sync path → untouched; no token → no key; this VM's
//! memory → key; a whoami call of this VM in flight for the token → wait for it; the token's
//! shared slots → key, rejection, back-off, or another VM's call in flight (wait and poll);
//! nothing → claim the in-flight marker and call whoami (within `max_whoami_in_flight`).
//!
//! `Router` holds the decision flow only; its parts, each with a small API: `calls` (calls in
//! flight, watched slots, deadlines, the fast tick), `store` (VM memory, shared slots, the
//! secret, storing answers), `keys` (writing the key and route metadata, edge answers) and
//! `report` (counters, the warning limiter, the clock).

mod calls;
mod keys;
mod report;
mod store;

pub use calls::{FAST_TICK_MS, TICK_MS};

use crate::cache::TokenHash;
use crate::config::{RequestSettings, Settings, WhoamiSettings};
use crate::metrics::Counter;
use crate::port::{ContextId, Host, Verdict};
use crate::profile::Capabilities;
use crate::request::{self, Plan, Token};
use crate::route::{self, Source};
use crate::slots::{Cached, Claim, Read};
use crate::whoami::{self, Outcome, MAX_BODY};
use calls::{Call, Calls, Join, Purpose};
use keys::{Key, KeyWriter, Settle};
use report::Report;
use store::Store;

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

/// One plugin's engine in one VM.
pub struct Router {
    caps: Capabilities,
    whoami: WhoamiSettings,
    requests: RequestSettings,
    store: Store,
    calls: Calls,
    keys: KeyWriter,
    report: Report,
}

impl Router {
    /// Builds the router, fetching the process's secret from shared data or creating it.
    pub fn new<H: Host>(settings: Settings, host: &H) -> Result<Router, String> {
        let store = Store::new(host, &settings.cache)?;
        host.set_tick_period(TICK_MS);
        let mut report = Report::default();
        report.exact_now(host);
        Ok(Router {
            caps: settings.caps,
            whoami: settings.whoami,
            requests: settings.requests,
            store,
            calls: Calls::default(),
            keys: KeyWriter::new(settings.keys, settings.caps),
            report,
        })
    }

    pub fn on_request_headers<H: Host>(&mut self, host: &H, id: ContextId) -> Verdict {
        self.request(host, id, true)
    }

    /// A request from its headers. `first`: its own callback (counted, route metadata
    /// written); else a queued request given a free call slot, read again for its token.
    fn request<H: Host>(&mut self, host: &H, id: ContextId, first: bool) -> Verdict {
        if self.requests.path_unneeded {
            // The proxy runs the filter on sync routes only (`trust_route_match`): a request
            // with a Bearer token needs neither its path nor its query.
            let authorization = host.request_header("authorization");
            if let Token::Valid(token) = request::find_token(authorization.as_deref(), None) {
                if first {
                    self.report.count(host, Counter::Requests);
                }
                return self.resolve(host, id, &token, None);
            }
        }
        let Some(path) = host.request_header(":path") else {
            return Verdict::Continue;
        };
        let (path_only, query) = request::split_path(&path);
        if path_only.len() > crate::paths::MAX_PATH_LEN {
            // Matched against nothing (no sync or room path is that long): no key of ours.
            self.report.count(host, Counter::OverlongPaths);
            self.keys.overlong(host);
            return Verdict::Continue;
        }
        if !self.requests.sync_paths.matches(path_only) {
            if self.keys.room_keys() {
                self.keys.room_key(host, path_only);
            }
            return Verdict::Continue;
        }
        if first {
            self.report.count(host, Counter::Requests);
            if self.requests.sync_kind_needed {
                self.keys
                    .mark_kind(host, route::sync_kind(path_only, query));
            }
        }
        let authorization = host.request_header("authorization");
        // A form POST's body may hold the `access_token` Synapse uses instead of the query's.
        let form_body = || request::form_body_possible_in(host);
        let token = match request::find_token_with(authorization.as_deref(), query, form_body) {
            Token::Absent => {
                self.report.count(host, Counter::NoToken);
                self.keys.clear(host);
                return Verdict::Continue;
            }
            Token::Malformed(token) => return self.fallback(host, &token),
            Token::Valid(token) => token,
        };
        match request::plan(&self.requests, &token, query) {
            Plan::Fallback => self.fallback(host, &token),
            Plan::Local(user) => {
                self.report.count(host, Counter::CacheHits);
                let key = Key::User(&user, Source::Local);
                self.keys.route(host, key, &mut self.report);
                Verdict::Continue
            }
            Plan::Resolve(masquerade) => self.resolve(host, id, &token, masquerade.as_deref()),
        }
    }

    /// Routes a token that is never resolved with its fallback key.
    fn fallback<H: Host>(&mut self, host: &H, token: &[u8]) -> Verdict {
        let hash = self.store.hash(token, None);
        self.answer(host, &hash, &Settle::Fallback)
    }

    /// Routes the current request as `how` says: its verdict.
    fn answer<H: Host>(&mut self, host: &H, hash: &TokenHash, how: &Settle) -> Verdict {
        self.keys.answer(host, hash, how, &mut self.report)
    }

    fn resolve<H: Host>(
        &mut self,
        host: &H,
        id: ContextId,
        token: &[u8],
        masquerade: Option<&str>,
    ) -> Verdict {
        let hash = self.store.hash(token, masquerade);
        let now = self.report.coarse_now(host);
        if let Some(user) = self.store.remembered(&hash, now) {
            self.report.count(host, Counter::CacheHits);
            self.keys
                .route(host, Key::User(user, Source::Cache), &mut self.report);
            return Verdict::Continue;
        }
        let mut req = Req {
            id,
            token,
            masquerade,
            hash,
            now: self.report.exact_now(host),
        };
        let join = self.calls.join(&hash, id, self.caps.resumes_other_contexts);
        if join != Join::NoCall {
            self.report.count(host, Counter::Coalesced);
            return match join {
                Join::Waiting => Verdict::Pause,
                _ => self.answer(host, &hash, &Settle::Fallback),
            };
        }
        match self
            .store
            .read(host, token, masquerade, &mut req.hash, req.now)
        {
            Some(read) => self.act(host, &req, read),
            None => {
                self.report.count(host, Counter::CacheMisses);
                self.call(host, &req)
            }
        }
    }

    /// Acts on what the shared slots know.
    fn act<H: Host>(&mut self, host: &H, req: &Req<'_>, read: Read) -> Verdict {
        let (counter, settle) = match &read.cached {
            Cached::User {
                user,
                refresh,
                refresh_at,
            } => {
                self.report.count(host, Counter::CacheHits);
                let key = Key::User(user, Source::Cache);
                self.keys.route(host, key, &mut self.report);
                if *refresh {
                    return self.refresh(host, req, &read);
                }
                self.store.remember(&req.hash, *refresh_at, user, req.now);
                return Verdict::Continue;
            }
            Cached::Denied(rejection) => (Counter::NegativeHits, Settle::Denied(*rejection)),
            Cached::Backoff => (Counter::BackoffHits, Settle::Fallback),
            Cached::Pending { until } => {
                self.report.count(host, Counter::Coalesced);
                if self.caps.resumes_other_contexts && self.calls.watch(&req.hash, req.id, *until) {
                    self.set_tick(host);
                    return Verdict::Pause;
                }
                return self.answer(host, &req.hash, &Settle::Fallback);
            }
        };
        self.report.count(host, counter);
        self.answer(host, &req.hash, &settle)
    }

    /// Calls whoami for a token nobody knows. When `max_whoami_in_flight` calls are in flight
    /// (a cold start), the request waits for a free call slot for up to `whoami_timeout_ms`
    /// where the host can resume it (Envoy); else, or when too many wait, it is routed by the
    /// device now and its user resolved on a later request.
    fn call<H: Host>(&mut self, host: &H, req: &Req<'_>) -> Verdict {
        if self.calls.in_flight() >= self.whoami.max_in_flight {
            let until = req.now.saturating_add(u64::from(self.whoami.timeout_ms));
            if self.caps.resumes_other_contexts && self.calls.enqueue(req.id, &req.hash, until) {
                self.report.count(host, Counter::Queued);
                self.set_tick(host);
                return Verdict::Pause;
            }
            self.report.count(host, Counter::Shed);
            return self.answer(host, &req.hash, &Settle::Fallback);
        }
        let deadline = calls::deadline(req.now, self.whoami.timeout_ms);
        match self.store.claim_pending(host, &req.hash, req.now, deadline) {
            Claim::Won | Claim::Unwritable => {}
            Claim::Lost(read) => return self.act(host, req, read),
        }
        if self.start(host, req, Purpose::Resolve, deadline) {
            return Verdict::Pause;
        }
        // The host refused the call outright (unknown cluster, bad upstream): a config problem,
        // so say it loudly, back off, and keep routing.
        self.report.count(host, Counter::WhoamiFailed);
        self.report
            .warn(host, &whoami::refused(&self.whoami.upstream));
        if !self.store.store_backoff(host, &req.hash, req.now) {
            self.report.count(host, Counter::CacheWriteFailures);
        }
        self.answer(host, &req.hash, &Settle::Fallback)
    }

    /// Claims the refresh of an entry in its refresh window; only the request whose claim wins
    /// calls whoami. On Envoy it does not wait for the answer; on ngx_wasm_module, which drops a
    /// call whose request moved on, it waits (already routed by the cached user).
    fn refresh<H: Host>(&mut self, host: &H, req: &Req<'_>, read: &Read) -> Verdict {
        let deadline = calls::deadline(req.now, self.whoami.timeout_ms);
        if self.calls.in_flight() >= self.whoami.max_in_flight
            || !self.store.claim_refresh(host, read, deadline)
        {
            return Verdict::Continue;
        }
        if !self.start(host, req, Purpose::Refresh, deadline) {
            return Verdict::Continue;
        }
        self.report.count(host, Counter::Refreshes);
        if self.caps.callouts_run_in_background {
            Verdict::Continue
        } else {
            Verdict::Pause
        }
    }

    /// Calls whoami for the request and tracks the call (a refresh on a host that runs
    /// callouts in the background has no waiter); false when the host refused it.
    fn start<H: Host>(&mut self, host: &H, req: &Req<'_>, purpose: Purpose, deadline: u64) -> bool {
        let waits = purpose == Purpose::Resolve || !self.caps.callouts_run_in_background;
        let waiters = if waits { vec![req.id] } else { Vec::new() };
        let dispatched = whoami::dispatch(host, &self.whoami, req.token, req.masquerade);
        let Some(token) = dispatched else {
            return false;
        };
        let call = Call::new(token, req.hash, purpose, waiters, deadline);
        self.calls.track(call);
        true
    }

    /// Handles a callout answer: `status` is `:status` (None when the host delivered none),
    /// `body` the body when it was at most `MAX_BODY` bytes. An answer to a call this engine
    /// no longer knows (forgotten long after its deadline) resumes the request it belongs to
    /// where that is the current one (ngx_wasm_module), so no request is left paused; elsewhere
    /// it is ignored.
    pub fn on_whoami_response<H: Host>(
        &mut self,
        host: &H,
        token: u32,
        status: Option<&[u8]>,
        body: Option<&[u8]>,
    ) {
        let Some(call) = self.calls.take(token) else {
            if !self.caps.resumes_other_contexts {
                // Its key is unknown here: no key (and no client copy) is the safe state.
                self.keys.clear(host);
                host.resume();
            }
            return;
        };
        let now = self.report.exact_now(host);
        let refresh = call.purpose == Purpose::Refresh;
        let outcome = whoami::interpret(status, body.filter(|b| b.len() <= MAX_BODY));
        self.report.count(host, outcome.counter());
        if let Outcome::Failed(failure) = &outcome {
            self.report.warn(host, &failure.describe(refresh));
        }
        if !self.store.record(host, &call.hash, &outcome, refresh, now) {
            self.report.count(host, Counter::CacheWriteFailures);
        }
        match call.purpose {
            Purpose::Resolve => {
                let how = Settle::from(&outcome);
                let (keys, report) = (&self.keys, &mut self.report);
                keys.settle(host, &call.waiters, &call.hash, &how, report);
            }
            Purpose::Refresh => self.keys.resume(host, &call.waiters),
        }
        self.admit_queued(host);
    }

    /// Gives free call slots to the requests waiting for one, oldest first: each is read again
    /// in its own context (it may hit now, join a call, or call whoami itself).
    fn admit_queued<H: Host>(&mut self, host: &H) {
        while let Some(queued) = self.calls.next_queued(self.whoami.max_in_flight) {
            // A request that went away meanwhile is skipped.
            if host.enter(queued.id) && self.request(host, queued.id, false) == Verdict::Continue {
                host.resume();
            }
        }
        self.set_tick(host);
    }

    /// The periodic work: clock, counters, calls the host never answered, watched slots.
    pub fn on_tick<H: Host>(&mut self, host: &H) {
        let now = self.report.exact_now(host);
        self.report.flush(host);
        // Calls past their deadline (the host should have answered with a timeout): stop
        // counting them, and route their Envoy waiters now.
        for (hash, waiters) in self.calls.expire(now, self.caps.resumes_other_contexts) {
            self.report.count(host, Counter::WhoamiFailed);
            self.keys
                .settle(host, &waiters, &hash, &Settle::Fallback, &mut self.report);
        }
        // Requests that waited for a call slot as long as a call may take: the fallback key.
        for queued in self.calls.expire_queue(now) {
            self.report.count(host, Counter::Shed);
            let waiters = [queued.id];
            let (keys, report) = (&self.keys, &mut self.report);
            keys.settle(host, &waiters, &queued.hash, &Settle::Fallback, report);
        }
        self.admit_queued(host);
        // Watched tokens whose slot now holds an answer (or whose marker lapsed).
        for watch in self.calls.take_watches() {
            let found = self.store.poll(host, &watch.hash, now);
            let Some(settle) = Settle::from_slot(found.as_ref(), now < watch.until) else {
                self.calls.keep_watching(watch);
                continue;
            };
            let (keys, report) = (&self.keys, &mut self.report);
            keys.settle(host, &watch.waiters, &watch.hash, &settle, report);
        }
        self.set_tick(host);
    }

    fn set_tick<H: Host>(&mut self, host: &H) {
        if let Some(ms) = self.calls.tick_change() {
            host.set_tick_period(ms);
        }
    }
}

#[cfg(test)]
mod tests;
