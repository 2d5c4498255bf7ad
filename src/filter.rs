//! The decision engine: what to do with each request, each whoami answer and each tick,
//! written against the `Host` port so that it runs natively in unit tests and, through
//! `host.rs`, in any proxy-wasm host.
//!
//! A request's path through it: not a sync path → untouched; no token → no key; this VM's
//! memory → key; a whoami call of this VM in flight for the token → wait for it; the token's
//! shared slots → key, rejection, back-off, or another VM's call in flight (wait and poll);
//! nothing → claim the in-flight marker and call whoami (within `max_whoami_in_flight`).
//!
//! `Router` holds the decision flow only; its parts, each with a small API: `classify` (what a
//! request is and which token it carries), `calls` (calls in flight, watched slots, deadlines,
//! the fast tick), `store` (VM memory, shared slots, the secret, storing answers), `keys`
//! (writing the key and route metadata, edge answers) and `report` (counters, the warning
//! limiter, the clock).

mod calls;
mod classify;
mod keys;
mod report;
mod store;

pub use calls::{FAST_TICK_MS, TICK_MS};

use crate::cache::TokenHash;
use crate::config::{RequestSettings, Settings, WhoamiSettings};
use crate::metrics::Counter;
use crate::port::{ContextId, Host, Verdict};
use crate::profile::Capabilities;
use crate::route::Source;
use crate::slots::{Cached, Claim, Read};
use crate::whoami::{self, MAX_BODY};
use calls::{Calls, Join, Purpose, Req};
use classify::{classify, Found, Headers};
use keys::{KeyWriter, Settle};
use report::Report;
use store::Store;

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

    /// Call from a request's headers callback: its verdict.
    pub fn on_request_headers<H: Host>(&mut self, host: &H, id: ContextId) -> Verdict {
        self.request(host, id, true)
    }

    /// A request from its headers. `first`: its own callback (counted, route metadata
    /// written); else a queued request given a free call slot, read again for its token.
    fn request<H: Host>(&mut self, host: &H, id: ContextId, first: bool) -> Verdict {
        let mut headers = Headers::default();
        let (keys, report) = (&self.keys, &mut self.report);
        match classify(host, &self.requests, &mut headers, keys, report, first) {
            None => Verdict::Continue,
            Some(Found::Fallback(token)) => {
                let hash = self.store.hash(&token, None);
                self.answer(host, &hash, &Settle::Fallback)
            }
            Some(Found::Local(user)) => {
                self.keys.hit(host, &user, Source::Local, &mut self.report);
                Verdict::Continue
            }
            Some(Found::Resolve(token, masquerade)) => {
                self.resolve(host, id, &token, masquerade.as_deref())
            }
        }
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
            self.keys.hit(host, user, Source::Cache, &mut self.report);
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
                self.keys.hit(host, user, Source::Cache, &mut self.report);
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
            let timeout_ms = self.whoami.timeout_ms;
            if self.caps.resumes_other_contexts && self.calls.enqueue(req, timeout_ms) {
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
        if self
            .calls
            .start(host, &self.whoami, req, Purpose::Resolve, deadline, true)
        {
            return Verdict::Pause;
        }
        // The host refused the call outright (unknown cluster, bad upstream): a config problem,
        // so say it loudly, back off, and keep routing.
        self.report.count(host, Counter::WhoamiFailed);
        self.report
            .warn(host, &whoami::refused(&self.whoami.upstream));
        let (store, report) = (&mut self.store, &mut self.report);
        store.store_backoff(host, &req.hash, req.now, report);
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
        let waits = !self.caps.callouts_run_in_background;
        if !self
            .calls
            .start(host, &self.whoami, req, Purpose::Refresh, deadline, waits)
        {
            return Verdict::Continue;
        }
        self.report.count(host, Counter::Refreshes);
        if self.caps.callouts_run_in_background {
            Verdict::Continue
        } else {
            Verdict::Pause
        }
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
        self.report.answer(host, &outcome, refresh);
        let (store, report) = (&mut self.store, &mut self.report);
        store.record(host, &call.hash, &outcome, refresh, now, report);
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
        let (keys, report) = (&self.keys, &mut self.report);
        let resumes = self.caps.resumes_other_contexts;
        self.calls.settle_overdue(host, now, resumes, keys, report);
        self.admit_queued(host);
        let (keys, report) = (&self.keys, &mut self.report);
        self.calls
            .settle_watches(host, now, &mut self.store, keys, report);
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
