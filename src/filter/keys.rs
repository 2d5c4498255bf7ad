//! The key writer: everything the filter writes onto a request for the proxy to route on — the
//! routing key (a header, replacing every client copy, or an nginx variable), the sync kind,
//! the room key, Envoy filter state — and the edge answer for a rejected token.
//!
//! Call it from the request's own callback (or after `Host::enter` made the request current).

use crate::cache::TokenHash;
use crate::config::{KeySettings, KeyTarget};
use crate::matrix::Rejection;
use crate::metrics::Counter;
use crate::port::{ContextId, Host, Verdict};
use crate::profile::Capabilities;
use crate::route::{self, Source, SyncKind};
use crate::slots::Cached;
use crate::whoami::Outcome;

use super::report::Report;

/// The routing key of a request.
pub enum Key<'a> {
    User(&'a str, Source),
    /// `~<16 hex>` of the token's keyed hash: one device's requests stay together.
    Fallback(&'a TokenHash),
}

/// What a whoami answer (or a watched slot) means for the requests that wait for it.
pub enum Settle<'a> {
    User(&'a str),
    Denied(Rejection),
    Fallback,
}

impl<'a> Settle<'a> {
    /// What a watched token's slot means for its waiters; None while another VM's call is
    /// still `pending` (its marker is there and has not lapsed).
    pub fn from_slot(found: Option<&'a Cached>, pending: bool) -> Option<Settle<'a>> {
        Some(match found {
            Some(Cached::User { user, .. }) => Settle::User(user),
            Some(Cached::Denied(rejection)) => Settle::Denied(*rejection),
            Some(Cached::Pending { .. }) if pending => return None,
            _ => Settle::Fallback,
        })
    }
}

impl<'a> From<&'a Outcome> for Settle<'a> {
    fn from(outcome: &'a Outcome) -> Settle<'a> {
        match outcome {
            Outcome::User(user) => Settle::User(user),
            Outcome::Denied(rejection) => Settle::Denied(*rejection),
            Outcome::Failed(_) => Settle::Fallback,
        }
    }
}

pub struct KeyWriter {
    settings: KeySettings,
    caps: Capabilities,
}

impl KeyWriter {
    pub fn new(settings: KeySettings, caps: Capabilities) -> KeyWriter {
        KeyWriter { settings, caps }
    }

    /// Whether room requests get a room key (call `room_key` for every request that is not a
    /// sync request).
    pub fn room_keys(&self) -> bool {
        self.settings.room.any()
    }

    /// Call for a handled request before routing: puts the sync kind where the proxy routes on
    /// it before the route is chosen — a header (then Envoy must match the route again:
    /// `clear_route_cache`), an nginx variable, and Envoy filter state for the access log.
    pub fn mark_kind<H: Host>(&self, host: &H, kind: SyncKind) {
        let value = kind.as_str().as_bytes();
        let outputs = &self.settings.sync_kind;
        if let Some(header) = &outputs.header {
            host.set_request_header(header, value);
            if self.caps.clears_route_cache {
                host.call_foreign("clear_route_cache");
            }
        }
        if let Some(variable) = &outputs.variable {
            host.set_property(&["ngx", variable], value);
        }
        if self.settings.filter_state {
            host.set_property(&["msr_sync_kind"], value);
        }
    }

    /// Call for a request that is not a sync request, when `room_keys`: its room ID from the
    /// path, without any callout. A room request whose path holds no room ID carries none (the
    /// client's copies go).
    pub fn room_key<H: Host>(&self, host: &H, path: &[u8]) {
        let paths = &self.settings.room_paths;
        let room = if self.caps.path_is_decoded {
            route::room_id_in_decoded_path(paths, path)
        } else {
            route::room_id(paths, path)
        };
        let outputs = &self.settings.room;
        let Some(room) = room else {
            if let Some(header) = outputs.header.as_deref().filter(|_| paths.matches(path)) {
                host.remove_request_header(header);
            }
            return;
        };
        if let Some(header) = &outputs.header {
            host.set_request_header(header, &room);
        }
        if let Some(variable) = &outputs.variable {
            host.set_property(&["ngx", variable], &room);
        }
    }

    /// Call for a request whose user is known (VM memory, shared slots, a native token): a hit,
    /// counted, and routed by its user.
    pub fn hit<H: Host>(&self, host: &H, user: &str, source: Source, report: &mut Report) {
        report.count(host, Counter::CacheHits);
        self.route(host, Key::User(user, source), report);
    }

    /// Gives the request its key where the host routes on it: the nginx variable, or the
    /// hash-key header (replacing every client copy). A fallback key is counted; a variable the
    /// host cannot set is warned about.
    pub fn route<H: Host>(&self, host: &H, key: Key<'_>, report: &mut Report) {
        let fallback;
        let (value, source): (&[u8], Source) = match key {
            Key::User(user, source) => (user.as_bytes(), source),
            Key::Fallback(hash) => {
                report.count(host, Counter::Fallbacks);
                fallback = hash.fallback_key();
                (&fallback, Source::Fallback)
            }
        };
        if self.settings.filter_state {
            host.set_property(&["msr_source"], source.as_str().as_bytes());
        }
        match &self.settings.target {
            KeyTarget::NginxVariable(variable) => {
                // nginx hashes on the variable and sets the upstream header from it; the
                // client's headers are left alone so `proxy_set_header` replaces them all.
                if !host.set_property(&["ngx", variable], value) {
                    // ngx_wasm_module cannot tell at start-up (no variables outside a request).
                    report.warn(
                        host,
                        &format!(
                            "field `nginx_variable`: nginx variable `${variable}` cannot be set: \
                             declare it with `set ${variable} \"\";` in the server block"
                        ),
                    );
                }
            }
            KeyTarget::Header(header) => {
                if self.caps.scrub_needs_header_scan {
                    scrub(host, header);
                }
                host.set_request_header(header, value);
            }
        }
    }

    /// Call for a request without a token: it carries no key, and any client copy of the
    /// header goes.
    pub fn clear<H: Host>(&self, host: &H) {
        if self.settings.filter_state {
            host.set_property(&["msr_source"], Source::None.as_str().as_bytes());
        }
        // An nginx variable starts empty and no client can set it.
        if let KeyTarget::Header(header) = &self.settings.target {
            if self.caps.scrub_needs_header_scan {
                scrub(host, header);
            } else {
                host.remove_request_header(header);
            }
        }
    }

    /// Call for a path longer than `MAX_PATH_LEN`: it passes as a non-sync request and carries
    /// no key of the filter's — client copies of the headers the filter owns go, so a client
    /// cannot choose its key by lengthening the path.
    pub fn overlong<H: Host>(&self, host: &H) {
        self.clear(host);
        let (kind, room) = (&self.settings.sync_kind.header, &self.settings.room.header);
        for name in kind.iter().chain(room) {
            host.remove_request_header(name);
        }
    }

    /// Call for a token Synapse rejected: answered at the edge when `reject_invalid_tokens`,
    /// else forwarded with the fallback key so the worker gives Synapse's own error.
    pub fn deny<H: Host>(
        &self,
        host: &H,
        hash: &TokenHash,
        rejection: &Rejection,
        report: &mut Report,
    ) -> Verdict {
        if !self.settings.reject_invalid_tokens {
            self.route(host, Key::Fallback(hash), report);
            return Verdict::Continue;
        }
        report.count(host, Counter::Rejected);
        let body = rejection.body();
        host.send_response(
            rejection.status,
            &[("content-type", "application/json")],
            body.as_bytes(),
        );
        Verdict::Pause
    }
}

impl KeyWriter {
    /// Call with a whoami answer or a watched slot's entry: gives every waiting request its
    /// key (or its edge answer) and resumes it. A request that went away meanwhile is skipped.
    pub fn settle<H: Host>(
        &self,
        host: &H,
        waiters: &[ContextId],
        hash: &TokenHash,
        how: &Settle,
        report: &mut Report,
    ) {
        for &id in waiters {
            if self.enter(host, id) && self.answer(host, hash, how, report) == Verdict::Continue {
                host.resume();
            }
        }
    }

    /// Call with the answer to a refresh: resumes its waiter (ngx_wasm_module), routed by the
    /// cached user before it paused.
    pub fn resume<H: Host>(&self, host: &H, waiters: &[ContextId]) {
        for &id in waiters {
            if self.enter(host, id) {
                host.resume();
            }
        }
    }

    /// Routes the current request as `how` says: its verdict.
    pub fn answer<H: Host>(
        &self,
        host: &H,
        hash: &TokenHash,
        how: &Settle,
        report: &mut Report,
    ) -> Verdict {
        let key = match how {
            Settle::User(user) => Key::User(user, Source::Whoami),
            Settle::Denied(rejection) => return self.deny(host, hash, rejection, report),
            Settle::Fallback => Key::Fallback(hash),
        };
        self.route(host, key, report);
        Verdict::Continue
    }

    /// Makes `id` current. Where contexts cannot be switched (ngx_wasm_module), the only
    /// waiter is the request whose own callback this is.
    fn enter<H: Host>(&self, host: &H, id: ContextId) -> bool {
        !self.caps.resumes_other_contexts || host.enter(id)
    }
}

/// Removes every spelling of the hash-key header the client sent (hosts that keep the client's
/// letter case).
fn scrub<H: Host>(host: &H, name: &str) {
    let headers = host.request_headers();
    for spelling in headers.spellings(name) {
        // Names come from the request; a name that is not UTF-8 cannot be this header.
        if let Ok(spelling) = std::str::from_utf8(spelling) {
            host.remove_request_header(spelling);
        }
    }
}
