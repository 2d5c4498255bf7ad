//! Route metadata: what kind of sync a request is, which room a room request is about, and
//! where the routing key came from — for proxies that route on more than the user.

use crate::paths::PathSet;
use crate::request::query_param;
use percent_encoding::percent_decode;

/// The kind of a handled request. Initial syncs are heavy (the whole account state), so
/// deployments may send them to a pool of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncKind {
    /// `/sync` without `since` or with `full_state=true`, `/initialSync`,
    /// `rooms/{id}/initialSync`, `/events` without `from`.
    Initial,
    /// `/sync` with `since`, `/events` with `from`.
    Incremental,
    /// Sliding sync: the unstable MSC3575 path, and MSC4186's `/_matrix/client/v4/sync`.
    Sliding,
    /// Any other path an operator added to `sync_paths`.
    Other,
}

impl SyncKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncKind::Initial => "initial",
            SyncKind::Incremental => "incremental",
            SyncKind::Sliding => "sliding",
            SyncKind::Other => "other",
        }
    }
}

/// Classifies a handled request by its path (without the query) and query.
pub fn sync_kind(path: &[u8], query: Option<&[u8]>) -> SyncKind {
    let has = |name: &[u8]| query.and_then(|q| query_param(q, name));
    if path.ends_with(b"/org.matrix.simplified_msc3575/sync") || path == b"/_matrix/client/v4/sync"
    {
        SyncKind::Sliding
    } else if path.ends_with(b"/initialSync") {
        SyncKind::Initial
    } else if path.ends_with(b"/events") {
        if has(b"from").is_some() {
            SyncKind::Incremental
        } else {
            SyncKind::Initial
        }
    } else if path.ends_with(b"/sync") {
        let full_state = has(b"full_state").is_some_and(|v| v.as_ref() == b"true");
        if has(b"since").is_none() || full_state {
            SyncKind::Initial
        } else {
            SyncKind::Incremental
        }
    } else {
        SyncKind::Other
    }
}

/// The room a request is about, when its path (as the client sent it) is one of `room_paths`
/// (the first `*` is the room ID): percent-decoded, and only if it looks like a room ID (`!`
/// then 1-254 visible ASCII bytes), so a client cannot smuggle anything else into the header.
pub fn room_id(room_paths: &PathSet, path: &[u8]) -> Option<Vec<u8>> {
    let raw = room_paths.capture(path)??;
    checked_room_id(percent_decode(raw).collect())
}

/// The same for a path the host has already percent-decoded (ngx_wasm_module's `:path` is
/// nginx's decoded URI): the room ID is taken as it stands, so a `%` that nginx decoded from
/// `%25` stays a `%`, as in the room ID Synapse reads from the request.
pub fn room_id_in_decoded_path(room_paths: &PathSet, path: &[u8]) -> Option<Vec<u8>> {
    checked_room_id(room_paths.capture(path)??.to_vec())
}

fn checked_room_id(id: Vec<u8>) -> Option<Vec<u8>> {
    let ok = id.first() == Some(&b'!')
        && (2..=255).contains(&id.len())
        && id.iter().all(|b| (0x21..=0x7e).contains(b));
    ok.then_some(id)
}

/// Where a request's routing key came from (Envoy filter state, debug headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// This VM's memory or shared data.
    Cache,
    /// A whoami answer for this request (or the call it waited for).
    Whoami,
    /// Decoded from a native Synapse token.
    Local,
    /// The fallback key: unknown, rejected or failed.
    Fallback,
    /// No token: no key.
    None,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Cache => "cache",
            Source::Whoami => "whoami",
            Source::Local => "local",
            Source::Fallback => "fallback",
            Source::None => "none",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(path_and_query: &str) -> SyncKind {
        let (p, q) = crate::request::split_path(path_and_query.as_bytes());
        sync_kind(p, q)
    }

    #[test]
    fn kinds() {
        use SyncKind::*;
        for (path, expected) in [
            ("/_matrix/client/v3/sync", Initial),
            ("/_matrix/client/v3/sync?timeout=30000", Initial),
            ("/_matrix/client/v3/sync?since=s1_2", Incremental),
            ("/_matrix/client/r0/sync?since=s1&full_state=true", Initial),
            (
                "/_matrix/client/r0/sync?since=s1&full_state=false",
                Incremental,
            ),
            ("/_matrix/client/v3/sync?%73ince=s1", Incremental),
            ("/_matrix/client/v3/sync?timeout=1;since=s1", Incremental),
            ("/_matrix/client/v3/sync?since", Initial),
            ("/_matrix/client/v3/events", Initial),
            ("/_matrix/client/v3/events?from=s9", Incremental),
            ("/_matrix/client/v3/initialSync", Initial),
            ("/_matrix/client/v3/rooms/!r:x/initialSync", Initial),
            (
                "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync?pos=1",
                Sliding,
            ),
            ("/_matrix/client/v4/sync", Sliding),
            ("/custom/path", Other),
        ] {
            assert_eq!(kind(path), expected, "{path}");
        }
    }

    #[test]
    fn params_are_read_as_synapse_reads_them() {
        let q = b"a=1&access%5Ftoken=A&access_token=B;x=%2B+y&flag";
        assert_eq!(query_param(q, b"access_token").as_deref(), Some(&b"A"[..]));
        assert_eq!(query_param(q, b"x").as_deref(), Some(&b"+ y"[..]));
        assert_eq!(query_param(q, b"flag"), None);
        assert_eq!(query_param(q, b"missing"), None);
    }

    #[test]
    fn room_ids_come_only_from_room_paths_and_look_like_room_ids() {
        let paths =
            PathSet::compile(&["/_matrix/client/{r0|v3}/rooms/*/{messages|send}/**"]).unwrap();
        let text = |id: Option<Vec<u8>>| id.map(|v| String::from_utf8(v).unwrap());
        // (path, its room ID as a client sent it, and in a path the host already decoded)
        for (path, sent, decoded) in [
            (
                "/rooms/%21abc%3Aexample.org/messages",
                Some("!abc:example.org"),
                None,
            ),
            (
                "/rooms/!abc:x/send/m.room.message/t1",
                Some("!abc:x"),
                Some("!abc:x"),
            ),
            (
                "/rooms/!hashonly/messages",
                Some("!hashonly"),
                Some("!hashonly"),
            ),
            ("/rooms/%23alias%3Ax/messages", None, None),
            ("/rooms/#alias:x/messages", None, None),
            ("/rooms/!a%0D%0AX:1/messages", None, Some("!a%0D%0AX:1")),
            ("/rooms/!a b:x/messages", None, None),
            ("/rooms/!caf\u{e9}:x/messages", None, None),
            ("/rooms/!/messages", None, None),
            // nginx hands `/rooms/%21ab%2541:x/...` over as `/rooms/!ab%41:x/...`: Synapse's
            // room `!ab%41:x` either way.
            ("/rooms/%21ab%2541:x/messages", Some("!ab%41:x"), None),
            ("/rooms/!ab%41:x/messages", Some("!abA:x"), Some("!ab%41:x")),
            ("/sync", None, None),
        ] {
            let path = format!("/_matrix/client/v3{path}");
            let path = path.as_bytes();
            assert_eq!(text(room_id(&paths, path)).as_deref(), sent, "{path:?}");
            assert_eq!(
                text(room_id_in_decoded_path(&paths, path)).as_deref(),
                decoded,
                "{path:?}"
            );
        }
    }
}
