//! Calls in flight and watched slots: this VM's whoami calls with the requests waiting for each,
//! and the requests waiting for another VM's call, seen through its in-flight marker.
//!
//! The lists and their deadlines are I/O-free; the router makes the host calls, except for
//! `start` (dispatching the call) and the two tick steps (`settle_overdue`, `settle_watches`),
//! which route the requests whose wait ended through the key writer. Time comes in as `now`.

use crate::cache::TokenHash;
use crate::config::WhoamiSettings;
use crate::metrics::Counter;
use crate::port::{ContextId, Host};
use crate::whoami;

use super::keys::{KeyWriter, Settle};
use super::report::Report;
use super::store::Store;

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
/// How long an overdue call is kept for its late answer.
const FORGET_MS: u64 = 60_000;
/// Most requests that may wait for a free call slot (Envoy); beyond that a new token is routed
/// with the fallback key at once. 1024 entries of 40 bytes.
const MAX_QUEUED: usize = 1024;

/// When a call started at `now` with `timeout_ms` is overdue (its marker's expiry too).
pub fn deadline(now: u64, timeout_ms: u32) -> u64 {
    now.saturating_add(u64::from(timeout_ms))
        .saturating_add(MARGIN_MS)
}

/// One request on its way through the engine. It holds the token only as long as the request
/// headers callback runs; everything kept longer holds the keyed hash.
pub struct Req<'a> {
    pub id: ContextId,
    pub token: &'a [u8],
    /// The appservice user it masquerades as (`?user_id=`), part of its cache key.
    pub masquerade: Option<&'a str>,
    pub hash: TokenHash,
    pub now: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The waiters have no key yet.
    Resolve,
    /// The request is routed by the cached user; the answer renews the entry.
    Refresh,
}

/// A whoami call of this VM in flight.
pub struct Call {
    /// The host's id of the call.
    pub token: u32,
    pub hash: TokenHash,
    pub purpose: Purpose,
    /// Requests to resume with the answer (on ngx_wasm_module only the one that made it).
    pub waiters: Vec<ContextId>,
    /// When the host should have answered (timeout plus `MARGIN_MS`).
    pub deadline: u64,
    /// Past its deadline: no longer counted or joined; its Envoy waiters have been routed with
    /// the fallback key. Kept until `FORGET_MS` later so a late answer still updates the cache
    /// and resumes an ngx request (the host answers every call it did not cancel).
    overdue: bool,
}

impl Call {
    pub fn new(
        token: u32,
        hash: TokenHash,
        purpose: Purpose,
        waiters: Vec<ContextId>,
        deadline: u64,
    ) -> Call {
        Call {
            token,
            hash,
            purpose,
            waiters,
            deadline,
            overdue: false,
        }
    }
}

/// Requests waiting for another VM's call, seen through its in-flight marker.
pub struct Watch {
    pub hash: TokenHash,
    pub waiters: Vec<ContextId>,
    /// When to stop waiting (the marker's own expiry).
    pub until: u64,
}

/// What joining this VM's call for a token found.
#[derive(Debug, PartialEq, Eq)]
pub enum Join {
    /// No call of this VM resolves the token.
    NoCall,
    /// The request waits for the call's answer.
    Waiting,
    /// There is a call, but the request cannot wait for it (the host cannot resume it from
    /// another request's answer, or too many wait already).
    CannotWait,
}

/// A request of a new token waiting for a free call slot.
pub struct Queued {
    pub id: ContextId,
    pub hash: TokenHash,
    /// When it stops waiting and takes the fallback key.
    pub until: u64,
}

#[derive(Default)]
pub struct Calls {
    calls: Vec<Call>,
    watches: Vec<Watch>,
    queue: std::collections::VecDeque<Queued>,
    fast_tick: bool,
}

impl Calls {
    /// The calls that count against `max_whoami_in_flight` (not overdue). Ask before starting a
    /// call.
    pub fn in_flight(&self) -> usize {
        self.calls.iter().filter(|c| !c.overdue).count()
    }

    /// Call when a request misses VM memory: attaches it to this VM's call resolving the same
    /// token, if any. `can_wait`: the host can resume it from that call's answer.
    pub fn join(&mut self, hash: &TokenHash, id: ContextId, can_wait: bool) -> Join {
        let call = self
            .calls
            .iter_mut()
            .find(|c| c.hash == *hash && c.purpose == Purpose::Resolve && !c.overdue);
        match call {
            None => Join::NoCall,
            Some(call) if can_wait && call.waiters.len() < MAX_WAITERS => {
                call.waiters.push(id);
                Join::Waiting
            }
            Some(_) => Join::CannotWait,
        }
    }

    /// Call to resolve or refresh `req`'s token (its claim won, a call slot free): calls whoami
    /// and tracks the call, `req` waiting for its answer when `waits`; false when the host
    /// refused it.
    pub fn start<H: Host>(
        &mut self,
        host: &H,
        whoami: &WhoamiSettings,
        req: &Req<'_>,
        purpose: Purpose,
        deadline: u64,
        waits: bool,
    ) -> bool {
        let Some(token) = whoami::dispatch(host, whoami, req.token, req.masquerade) else {
            return false;
        };
        let waiters = if waits { vec![req.id] } else { Vec::new() };
        self.track(Call::new(token, req.hash, purpose, waiters, deadline));
        true
    }

    fn track(&mut self, call: Call) {
        self.calls.push(call);
    }

    /// Call when an answer arrives: the call it answers, forgotten here.
    pub fn take(&mut self, token: u32) -> Option<Call> {
        let i = self.calls.iter().position(|c| c.token == token)?;
        Some(self.calls.swap_remove(i))
    }

    /// Calls past their deadline (the host should have answered with a timeout) stop counting;
    /// their waiters are returned when `take_waiters` (the host can resume them now) to be
    /// routed with the fallback key. Calls `FORGET_MS` past their deadline are forgotten.
    fn expire(&mut self, now: u64, take_waiters: bool) -> Vec<(TokenHash, Vec<ContextId>)> {
        let mut late = Vec::new();
        for c in self
            .calls
            .iter_mut()
            .filter(|c| !c.overdue && c.deadline <= now)
        {
            c.overdue = true;
            if take_waiters {
                late.push((c.hash, std::mem::take(&mut c.waiters)));
            }
        }
        self.calls
            .retain(|c| now < c.deadline.saturating_add(FORGET_MS));
        late
    }

    /// Call when a request finds another VM's in-flight marker valid until `until`: it waits
    /// for that call's answer, read from the slot on the fast tick. False when too many wait.
    pub fn watch(&mut self, hash: &TokenHash, id: ContextId, until: u64) -> bool {
        let count = self.watches.len();
        match self.watches.iter_mut().find(|w| w.hash == *hash) {
            Some(w) if w.waiters.len() < MAX_WAITERS => w.waiters.push(id),
            Some(_) => return false,
            None if count < MAX_WATCHED => self.watches.push(Watch {
                hash: *hash,
                waiters: vec![id],
                until,
            }),
            None => return false,
        }
        true
    }

    /// Call when a request of a new token finds every call slot taken, on a host that can
    /// resume it later: it waits, oldest first, for up to `timeout_ms` (as long as a call may
    /// take). False when the queue is full.
    pub fn enqueue(&mut self, req: &Req<'_>, timeout_ms: u32) -> bool {
        if self.queue.len() >= MAX_QUEUED {
            return false;
        }
        self.queue.push_back(Queued {
            id: req.id,
            hash: req.hash,
            until: req.now.saturating_add(u64::from(timeout_ms)),
        });
        true
    }

    /// Call when a call slot may have freed (an answer, an overdue call): the oldest waiting
    /// request, while fewer than `max_in_flight` calls count.
    pub fn next_queued(&mut self, max_in_flight: usize) -> Option<Queued> {
        if self.in_flight() >= max_in_flight {
            return None;
        }
        self.queue.pop_front()
    }

    /// The waiting requests whose time is up, to route with the fallback key.
    fn expire_queue(&mut self, now: u64) -> Vec<Queued> {
        let (late, waiting): (Vec<Queued>, Vec<Queued>) = std::mem::take(&mut self.queue)
            .into_iter()
            .partition(|q| q.until <= now);
        self.queue = waiting.into();
        late
    }

    /// Call on every tick, first: calls past their deadline (the host should have answered with
    /// a timeout) stop counting, and their waiters go on with the fallback key where the host
    /// can resume them (`can_resume`); so do requests that waited for a call slot as long as a
    /// call may take. Then give the freed call slots to the queue (`next_queued`).
    pub fn settle_overdue<H: Host>(
        &mut self,
        host: &H,
        now: u64,
        can_resume: bool,
        keys: &KeyWriter,
        report: &mut Report,
    ) {
        for (hash, waiters) in self.expire(now, can_resume) {
            report.count(host, Counter::WhoamiFailed);
            keys.settle(host, &waiters, &hash, &Settle::Fallback, report);
        }
        for queued in self.expire_queue(now) {
            report.count(host, Counter::Shed);
            keys.settle(host, &[queued.id], &queued.hash, &Settle::Fallback, report);
        }
    }

    /// Call on every tick, after the queue had its call slots: reads each watched token's slot;
    /// its waiters go on once it holds an answer or its marker lapsed, else it stays watched.
    pub fn settle_watches<H: Host>(
        &mut self,
        host: &H,
        now: u64,
        store: &mut Store,
        keys: &KeyWriter,
        report: &mut Report,
    ) {
        for watch in std::mem::take(&mut self.watches) {
            let found = store.poll(host, &watch.hash, now);
            let Some(settle) = Settle::from_slot(found.as_ref(), now < watch.until) else {
                self.watches.push(watch);
                continue;
            };
            keys.settle(host, &watch.waiters, &watch.hash, &settle, report);
        }
    }

    /// Call after `watch`, `enqueue` and a tick: the tick period to set, when it changed (fast
    /// while any request watches a slot or waits for a call slot).
    pub fn tick_change(&mut self) -> Option<u32> {
        let fast = !self.watches.is_empty() || !self.queue.is_empty();
        if fast == self.fast_tick {
            return None;
        }
        self.fast_tick = fast;
        Some(if fast { FAST_TICK_MS } else { TICK_MS })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(n: u8) -> TokenHash {
        TokenHash([n; 16], [n; 8])
    }

    #[test]
    fn joins_only_a_resolving_call_that_is_not_overdue() {
        let mut calls = Calls::default();
        assert_eq!(calls.join(&hash(1), 7, true), Join::NoCall);
        calls.track(Call::new(1, hash(1), Purpose::Resolve, vec![7], 100));
        calls.track(Call::new(2, hash(2), Purpose::Refresh, vec![], 100));
        assert_eq!(calls.join(&hash(1), 8, true), Join::Waiting);
        assert_eq!(calls.join(&hash(1), 9, false), Join::CannotWait);
        assert_eq!(calls.join(&hash(2), 9, true), Join::NoCall);
        assert_eq!(calls.in_flight(), 2);
        // Overdue: its waiters are handed back once, it stops counting, and nobody joins it.
        let late = calls.expire(100, true);
        assert_eq!(late, vec![(hash(1), vec![7, 8]), (hash(2), vec![])]);
        assert_eq!(calls.in_flight(), 0);
        assert_eq!(calls.join(&hash(1), 10, true), Join::NoCall);
        assert!(calls.expire(200, true).is_empty());
        // Still answerable until FORGET_MS after its deadline.
        assert!(calls.take(1).is_some_and(|c| c.waiters.is_empty()));
        assert!(calls.expire(100 + FORGET_MS, true).is_empty());
        assert!(calls.take(2).is_none());
    }

    #[test]
    fn watching_is_bounded_and_sets_the_fast_tick() {
        let mut calls = Calls::default();
        assert_eq!(calls.tick_change(), None);
        assert!(calls.watch(&hash(1), 1, 50));
        assert_eq!(calls.tick_change(), Some(FAST_TICK_MS));
        assert_eq!(calls.tick_change(), None);
        for id in 2..=MAX_WAITERS as u32 {
            assert!(calls.watch(&hash(1), id, 50));
        }
        assert!(!calls.watch(&hash(1), 0, 50));
        let watched = std::mem::take(&mut calls.watches);
        assert_eq!(watched.len(), 1);
        assert_eq!(calls.tick_change(), Some(TICK_MS));
        for n in 0..MAX_WATCHED {
            assert!(calls.watch(&hash(n as u8), 1, 50));
        }
        let mut other = hash(0);
        other.0[0] = 1;
        assert!(!calls.watch(&other, 1, 50));
    }
}
