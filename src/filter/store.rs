//! The cache facade: this VM's memory of recent answers in front of the shared slots, the
//! process's hash secret, and storing whoami's answers for as long as each kind is kept.
//!
//! The router asks it in the order a request needs: `hash`, `remembered` (VM memory, no host
//! call), `read` (shared slots), then `claim_pending` before calling whoami and one of the
//! `store_*` calls with the answer. Time comes in as `now`; a write shared data refuses is
//! counted (`cache_write_failures`).

use crate::cache::{self, Entry, Secret, TokenHash};
use crate::config::CacheSettings;
use crate::matrix::Rejection;
use crate::memory::Memory;
use crate::metrics::Counter;
use crate::port::Host;
use crate::slots::{Cached, Claim, Read, Slots};
use crate::whoami::Outcome;

use super::report::Report;

pub struct Store {
    secret: Secret,
    slots: Slots,
    memory: Memory,
    ttl_ms: u64,
    negative_ttl_ms: u64,
    backoff_ms: u64,
}

impl Store {
    /// Call once, from `on_configure`: fetches the process's secret from shared data or
    /// creates it (an error names the field when shared data cannot hold it).
    pub fn new<H: Host>(host: &H, settings: &CacheSettings) -> Result<Store, String> {
        let slots = Slots::new(&settings.prefix, settings.capacity);
        let secret = slots
            .load_or_create_secret(host)?
            .with_fallback(settings.fallback_secret);
        Ok(Store {
            secret,
            slots,
            memory: Memory::default(),
            ttl_ms: settings.ttl_ms,
            negative_ttl_ms: settings.negative_ttl_ms,
            backoff_ms: settings.backoff_ms,
        })
    }

    /// A VM that made its own secret before another VM's won the race (tests).
    #[cfg(test)]
    pub fn replace_secret(&mut self, secret: Secret) {
        self.secret = secret;
    }

    /// The token's keyed hash (as appservice user `masquerade`): the only form of it that
    /// outlives the request callback.
    pub fn hash(&self, token: &[u8], masquerade: Option<&str>) -> TokenHash {
        self.secret.hash_as(token, masquerade)
    }

    /// The user this VM remembers for the token (the hit path: no host call, no allocation).
    pub fn remembered(&self, hash: &TokenHash, now: u64) -> Option<&str> {
        self.memory.user(hash, now)
    }

    /// Call after a miss in VM memory: what the shared slots know about the token. When they
    /// know nothing and another VM's secret has won meanwhile, the secret is adopted and `hash`
    /// recomputed, so the request looks where that VM would have written.
    pub fn read<H: Host>(
        &mut self,
        host: &H,
        token: &[u8],
        masquerade: Option<&str>,
        hash: &mut TokenHash,
        now: u64,
    ) -> Option<Read> {
        let found = self.slots.read(host, hash, now);
        if found.is_some() {
            return found;
        }
        let newer = self.slots.newer_secret(host, self.secret)?;
        self.secret = newer;
        *hash = newer.hash_as(token, masquerade);
        self.slots.read(host, hash, now)
    }

    /// Call on the fast tick for a watched token: its entry, if any. A user is remembered.
    pub fn poll<H: Host>(&mut self, host: &H, hash: &TokenHash, now: u64) -> Option<Cached> {
        let cached = self.slots.read(host, hash, now)?.cached;
        if let Cached::User {
            user, refresh_at, ..
        } = &cached
        {
            self.memory.remember(hash, *refresh_at, user, now);
        }
        Some(cached)
    }

    /// Call before calling whoami for an unknown token: marks the call in flight until
    /// `until`, unless another VM's entry appeared meanwhile (`Claim::Lost`).
    pub fn claim_pending<H: Host>(&self, host: &H, h: &TokenHash, now: u64, until: u64) -> Claim {
        self.slots.claim_pending(host, h, now, until)
    }

    /// Call for an entry in its refresh window: true when this request won the refresh.
    pub fn claim_refresh<H: Host>(&self, host: &H, read: &Read, until: u64) -> bool {
        self.slots.claim_refresh(host, read, until)
    }

    /// Call for a user entry read from the slots: this VM hits it from memory until its
    /// refresh window.
    pub fn remember(&mut self, hash: &TokenHash, refresh_at: u64, user: &str, now: u64) {
        self.memory.remember(hash, refresh_at, user, now);
    }

    /// Call with whoami's answer for the token (`refresh`: the call renewed a cached entry):
    /// keeps what it says. A failed refresh leaves the entry as it is; its claim lapses and a
    /// later request tries again.
    pub fn record<H: Host>(
        &mut self,
        host: &H,
        hash: &TokenHash,
        outcome: &Outcome,
        refresh: bool,
        now: u64,
        report: &mut Report,
    ) {
        let stored = match outcome {
            Outcome::User(user) => self.store_user(host, hash, user, now),
            // Logged out or locked since a cached answer: rejected from now on.
            Outcome::Denied(rejection) => self.store_denied(host, hash, rejection, now),
            Outcome::Failed(_) => refresh || self.backoff(host, hash, now),
        };
        if !stored {
            report.count(host, Counter::CacheWriteFailures);
        }
    }

    /// Call with whoami's user for the token: kept `cache_ttl_s`, refreshed in its last tenth.
    /// False when shared data refused the write (this VM still remembers it).
    fn store_user<H: Host>(&mut self, host: &H, hash: &TokenHash, user: &str, now: u64) -> bool {
        let expires = now.saturating_add(self.ttl_ms);
        let refresh_at = cache::refresh_at(now, self.ttl_ms);
        let stored = self
            .slots
            .store(host, hash, now, (expires, refresh_at), &Entry::User(user));
        self.memory.remember(hash, refresh_at, user, now);
        stored
    }

    /// Call with whoami's rejection of the token: kept `negative_ttl_s` (with 0, the in-flight
    /// marker is still replaced, by an entry that expires at once); this VM forgets the user.
    fn store_denied<H: Host>(
        &mut self,
        host: &H,
        hash: &TokenHash,
        rejection: &Rejection,
        now: u64,
    ) -> bool {
        self.memory.forget(hash);
        let expires = now.saturating_add(self.negative_ttl_ms);
        let entry = Entry::Denied(*rejection);
        self.slots
            .store(host, hash, now, (expires, expires), &entry)
    }

    /// Call when the host refused a call for the token: nobody calls again for
    /// `failure_backoff_s`.
    pub fn store_backoff<H: Host>(
        &self,
        host: &H,
        hash: &TokenHash,
        now: u64,
        report: &mut Report,
    ) {
        if !self.backoff(host, hash, now) {
            report.count(host, Counter::CacheWriteFailures);
        }
    }

    /// Call when whoami failed for the token, or the host refused the call: nobody calls again
    /// for `failure_backoff_s`. False when shared data refused the write.
    fn backoff<H: Host>(&self, host: &H, hash: &TokenHash, now: u64) -> bool {
        let expires = now.saturating_add(self.backoff_ms);
        self.slots
            .store(host, hash, now, (expires, expires), &Entry::Backoff)
    }
}
