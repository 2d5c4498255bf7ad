//! Request classification, the front half of a request: what it is from its headers — not the
//! filter's (no `:path`, a path too long to be one, not a sync path) or a sync request and what
//! its token means — and the route metadata it gets before any lookup (room key, sync kind, no
//! key). The router acts on the token.
//!
//! Call `classify` for every request whose token the router did not take on trust, from its own
//! callback or after `Host::enter` made a queued request current.

use std::borrow::Cow;

use crate::config::RequestSettings;
use crate::metrics::Counter;
use crate::paths::MAX_PATH_LEN;
use crate::port::Host;
use crate::request::{self, Plan, Token};
use crate::route;

use super::keys::KeyWriter;
use super::report::Report;

/// The request headers `classify` read, held by the caller while the token borrows them, so a
/// hit copies no token.
pub struct Headers<B> {
    path: Option<B>,
    authorization: Option<B>,
}

impl<B> Default for Headers<B> {
    fn default() -> Headers<B> {
        Headers {
            path: None,
            authorization: None,
        }
    }
}

/// What a sync request's token means.
pub enum Found<'a> {
    /// Routed with its fallback key, never resolved: malformed, or one Synapse can only refuse
    /// (`Plan::Fallback`).
    Fallback(Cow<'a, [u8]>),
    /// A native token's user (`Plan::Local`).
    Local(String),
    /// Looked up, and resolved through whoami when unknown, as the user it masquerades as if
    /// any (`Plan::Resolve`).
    Resolve(Cow<'a, [u8]>, Option<Cow<'a, str>>),
}

/// Classifies the current request. `first`: its own callback (counted, sync kind marked); else
/// a queued request read again for its token. None when the router has nothing more to do
/// (continue it): no `:path`, an overlong path (no key of ours), not a sync path (its room key
/// written where configured), or no token (no key).
pub fn classify<'a, H: Host>(
    host: &H,
    settings: &RequestSettings,
    headers: &'a mut Headers<H::Bytes>,
    keys: &KeyWriter,
    report: &mut Report,
    first: bool,
) -> Option<Found<'a>> {
    let Headers {
        path,
        authorization,
    } = headers;
    let (query, authorization) = if settings.path_unneeded {
        // The proxy runs the filter on sync routes only (`trust_route_match`): a request with a
        // Bearer token needs neither its path nor its query.
        *authorization = host.request_header("authorization");
        let authorization: &'a Option<H::Bytes> = authorization;
        if let Token::Valid(token) = request::find_token(authorization.as_deref(), None) {
            if first {
                report.count(host, Counter::Requests);
            }
            return Some(Found::Resolve(token, None));
        }
        let query = sync_path(host, settings, path, keys, report, first)?;
        (query, authorization)
    } else {
        let query = sync_path(host, settings, path, keys, report, first)?;
        *authorization = host.request_header("authorization");
        (query, &*authorization)
    };
    found(
        host,
        settings,
        authorization.as_deref(),
        query,
        keys,
        report,
    )
}

/// Reads `:path` into `path`: the query of a sync path, or None when the request is not one
/// (and got its route metadata here).
fn sync_path<'a, H: Host>(
    host: &H,
    settings: &RequestSettings,
    path: &'a mut Option<H::Bytes>,
    keys: &KeyWriter,
    report: &mut Report,
    first: bool,
) -> Option<Option<&'a [u8]>> {
    *path = host.request_header(":path");
    let path: &'a Option<H::Bytes> = path;
    let (path_only, query) = request::split_path(path.as_deref()?);
    if path_only.len() > MAX_PATH_LEN {
        // Matched against nothing (no sync or room path is that long): no key of ours.
        report.count(host, Counter::OverlongPaths);
        keys.overlong(host);
        return None;
    }
    if !settings.sync_paths.matches(path_only) {
        if keys.room_keys() {
            keys.room_key(host, path_only);
        }
        return None;
    }
    if first {
        report.count(host, Counter::Requests);
        if settings.sync_kind_needed {
            keys.mark_kind(host, route::sync_kind(path_only, query));
        }
    }
    Some(query)
}

/// What the token of a sync request with `authorization` and `query` means; None without one.
fn found<'a, H: Host>(
    host: &H,
    settings: &RequestSettings,
    authorization: Option<&'a [u8]>,
    query: Option<&'a [u8]>,
    keys: &KeyWriter,
    report: &mut Report,
) -> Option<Found<'a>> {
    // A form POST's body may hold the `access_token` Synapse uses instead of the query's.
    let form_body = || request::form_body_possible_in(host);
    let token = match request::find_token_with(authorization, query, form_body) {
        Token::Absent => {
            report.count(host, Counter::NoToken);
            keys.clear(host);
            return None;
        }
        Token::Malformed(token) => return Some(Found::Fallback(token)),
        Token::Valid(token) => token,
    };
    Some(match request::plan(settings, &token, query) {
        Plan::Fallback => Found::Fallback(token),
        Plan::Local(user) => Found::Local(user),
        Plan::Resolve(masquerade) => Found::Resolve(token, masquerade),
    })
}
