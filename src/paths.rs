//! Sync-path templates: the pattern language of `sync_paths` and its matcher.
//!
//! A template is a path that starts with `/`. Within it:
//! - `*` as a whole segment matches exactly one non-empty segment (any bytes but `/`);
//! - `**` as the last segment matches whatever follows, including nothing (`/a/**` matches `/a`,
//!   `/a/b` and `/a/b/c`);
//! - `{a|b|c}` matches one of the literal alternatives, which may contain `/`
//!   (`{api/v1|r0|v3}`); alternations are expanded when the configuration is read;
//! - everything else matches itself, byte for byte; the template covers the whole path.
//!
//! Matching one expanded template is a single left-to-right pass with no backtracking (a `*`
//! always ends at the next `/`), so the cost is linear in the path's length whatever a client
//! sends, and the number of expanded templates is bounded (`MAX_EXPANDED`).

/// Upper bound of templates after expanding every alternation.
pub const MAX_EXPANDED: usize = 64;
/// Upper bound of one template's length.
pub const MAX_TEMPLATE_LEN: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(Box<[u8]>),
    /// One whole segment.
    Segment,
    /// Nothing more, or `/` and anything.
    Rest,
}

/// The compiled `sync_paths`: every template with its alternations expanded.
#[derive(Debug, Clone, Default)]
pub struct PathSet {
    templates: Vec<Vec<Piece>>,
}

impl PathSet {
    /// Compiles the templates; the error says what is wrong with which one (by index).
    pub fn compile<S: AsRef<str>>(templates: &[S]) -> Result<PathSet, (usize, String)> {
        let mut set = PathSet::default();
        for (i, t) in templates.iter().enumerate() {
            for expanded in expand(t.as_ref()).map_err(|e| (i, e))? {
                if set.templates.len() == MAX_EXPANDED {
                    return Err((
                        i,
                        format!("more than {MAX_EXPANDED} paths after expanding alternations"),
                    ));
                }
                set.templates.push(pieces(&expanded));
            }
        }
        Ok(set)
    }

    /// Whether `path` (without its query) matches any template.
    pub fn matches(&self, path: &[u8]) -> bool {
        self.templates.iter().any(|t| capture(t, path).is_some())
    }

    /// The segment the first `*` of the first matching template matched (None: no template
    /// matches; Some(None): one matches without a `*`).
    pub fn capture<'p>(&self, path: &'p [u8]) -> Option<Option<&'p [u8]>> {
        self.templates.iter().find_map(|t| capture(t, path))
    }
}

fn capture<'p>(template: &[Piece], path: &'p [u8]) -> Option<Option<&'p [u8]>> {
    let mut rest = path;
    let mut first = None;
    for piece in template {
        match piece {
            Piece::Literal(lit) => rest = rest.strip_prefix(&lit[..])?,
            Piece::Segment => {
                let end = rest.iter().position(|&b| b == b'/').unwrap_or(rest.len());
                if end == 0 {
                    return None;
                }
                let (segment, after) = rest.split_at(end);
                first = first.or(Some(segment));
                rest = after;
            }
            Piece::Rest => {
                return (rest.is_empty() || rest.starts_with(b"/")).then_some(first);
            }
        }
    }
    rest.is_empty().then_some(first)
}

/// Splits an expanded template into literals and whole-segment wildcards.
fn pieces(template: &str) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut literal = String::new();
    for (i, segment) in template.split('/').enumerate() {
        if i > 0 {
            literal.push('/');
        }
        if segment == "*" || segment == "**" {
            if segment == "**" {
                literal.pop(); // the `/` before it belongs to what `**` matches
            }
            if !literal.is_empty() {
                out.push(Piece::Literal(
                    std::mem::take(&mut literal).into_bytes().into(),
                ));
            }
            out.push(if segment == "*" {
                Piece::Segment
            } else {
                Piece::Rest
            });
        } else {
            literal.push_str(segment);
        }
    }
    if !literal.is_empty() {
        out.push(Piece::Literal(literal.into_bytes().into()));
    }
    out
}

/// Checks one template and expands its alternations into plain templates.
fn expand(template: &str) -> Result<Vec<String>, String> {
    if !template.starts_with('/') {
        return Err(if template.starts_with('^') {
            "is a regular expression; sync_paths takes path templates such as \
             `/_matrix/client/{r0|v3}/sync` (see the README)"
                .into()
        } else {
            "must start with `/`".into()
        });
    }
    if template.len() > MAX_TEMPLATE_LEN {
        return Err(format!("is longer than {MAX_TEMPLATE_LEN} bytes"));
    }
    if let Some(b) = template
        .bytes()
        .find(|b| !(0x21..=0x7e).contains(b) || matches!(b, b'?' | b'#' | b'\\'))
    {
        return Err(format!(
            "contains byte 0x{b:02x}, which a path template cannot hold"
        ));
    }
    let mut done = vec![String::new()];
    let mut rest = template;
    while !rest.is_empty() {
        let (plain, after) = match rest.find(['{', '}']) {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        for d in &mut done {
            d.push_str(plain);
        }
        rest = after;
        let Some(inner) = rest.strip_prefix('{') else {
            if rest.starts_with('}') {
                return Err("has a `}` without its `{`".into());
            }
            continue;
        };
        let Some(close) = inner.find('}') else {
            return Err("has a `{` without its `}`".into());
        };
        let (group, after) = inner.split_at(close);
        if group.contains('{') {
            return Err("nests alternations, which templates do not allow".into());
        }
        let alternatives: Vec<&str> = group.split('|').collect();
        if alternatives.iter().any(|a| a.is_empty() || a.contains('*')) {
            return Err("has an empty alternative or a `*` inside `{...}`".into());
        }
        if done.len().saturating_mul(alternatives.len()) > MAX_EXPANDED {
            return Err(format!("expands to more than {MAX_EXPANDED} paths"));
        }
        done = done
            .iter()
            .flat_map(|d| alternatives.iter().map(move |a| format!("{d}{a}")))
            .collect();
        rest = after.get(1..).unwrap_or_default();
    }
    for d in &done {
        for segment in d.split('/').skip(1) {
            if segment.is_empty() && !d.ends_with('/') {
                return Err("has an empty segment (`//`)".into());
            }
            if segment == "**" && !d.ends_with("/**") {
                return Err("uses `**` before the end; `**` must be the last segment".into());
            }
            if segment.contains('*') && segment != "*" && segment != "**" {
                return Err("uses `*` inside a segment; `*` must be a whole segment".into());
            }
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(templates: &[&str]) -> PathSet {
        PathSet::compile(templates).unwrap()
    }

    #[test]
    fn literals_wildcards_and_alternations() {
        let s = set(&["/_matrix/client/{api/v1|r0|v3}/rooms/*/initialSync"]);
        assert!(s.matches(b"/_matrix/client/v3/rooms/!a:x/initialSync"));
        assert!(s.matches(b"/_matrix/client/api/v1/rooms/%21a%3Ax/initialSync"));
        assert!(!s.matches(b"/_matrix/client/v3/rooms//initialSync"));
        assert!(!s.matches(b"/_matrix/client/v3/rooms/a/b/initialSync"));
        assert!(!s.matches(b"/_matrix/client/v4/rooms/a/initialSync"));
        assert!(!s.matches(b"/_matrix/client/v3/rooms/a/initialSyncX"));
        assert!(!s.matches(b"/x/_matrix/client/v3/rooms/a/initialSync"));
        let s = set(&["/a/*"]);
        assert!(s.matches(b"/a/b"));
        assert!(!s.matches(b"/a/"));
        assert!(!s.matches(b"/a/b/c"));
    }

    #[test]
    fn rest_and_captures() {
        let s = set(&["/r/{v3|r0}/rooms/*/{messages|send}/**", "/x"]);
        assert_eq!(
            s.capture(b"/r/v3/rooms/!a:b/messages"),
            Some(Some(&b"!a:b"[..]))
        );
        assert_eq!(
            s.capture(b"/r/r0/rooms/%21a%3Ab/send/m.room.message/txn1"),
            Some(Some(&b"%21a%3Ab"[..]))
        );
        assert_eq!(s.capture(b"/r/v3/rooms/!a:b/messagesX"), None);
        assert_eq!(s.capture(b"/r/v3/rooms//messages"), None);
        assert_eq!(s.capture(b"/x"), Some(None));
        assert!(PathSet::compile(&["/a/**/b"]).is_err());
        assert!(set(&["/**"]).matches(b"/anything/at/all"));
    }

    #[test]
    fn bad_templates_are_refused_with_a_reason() {
        for (bad, why) in [
            ("^/_matrix/client/v3/sync$", "regular expression"),
            ("sync", "start with"),
            ("/a/{b|c", "without its `}`"),
            ("/a/b}", "without its `{`"),
            ("/a/{b|}", "empty alternative"),
            ("/a/{b|{c}}", "nests"),
            ("/a/x*", "whole segment"),
            ("/a//b", "empty segment"),
            ("/a b", "cannot hold"),
            ("/a?b", "cannot hold"),
        ] {
            let (i, message) = PathSet::compile(&["/ok", bad]).unwrap_err();
            assert_eq!(i, 1);
            assert!(message.contains(why), "{bad}: {message}");
        }
        let many = "/{a|b|c|d}/{a|b|c|d}/{a|b|c|d}/{a|b|c|d}";
        assert!(PathSet::compile(&[many])
            .unwrap_err()
            .1
            .contains("more than"));
        assert!(PathSet::compile(&["/{a|b|c|d}/{a|b|c|d}/{a|b|c|d}"]).is_ok());
    }

    #[test]
    fn cost_is_linear_for_hostile_paths() {
        let s = set(&["/_matrix/client/*/sync", "/{a|b}/*/*/*/*/*/*/*/z"]);
        let long = format!("/_matrix/client/{}/sync", "x".repeat(60 * 1024));
        assert!(s.matches(long.as_bytes()));
        let slashes = "/a".repeat(30 * 1024);
        let start = std::time::Instant::now();
        for _ in 0..100 {
            assert!(!s.matches(slashes.as_bytes()));
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
    }
}
