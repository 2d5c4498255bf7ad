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
//! always ends at the next `/`). The path's slashes are indexed once per match, so a `*` costs
//! a lookup, not a scan: matching costs one pass over the path plus, per template, comparing
//! its literals (at most `MAX_TEMPLATE_LEN` bytes), whatever a client sends. The number of
//! expanded templates is bounded (`MAX_EXPANDED`), and a path longer than `MAX_PATH_LEN`
//! matches no template at all.

/// Upper bound of templates after expanding every alternation.
pub const MAX_EXPANDED: usize = 64;
/// Upper bound of one template's length.
pub const MAX_TEMPLATE_LEN: usize = 512;
/// Upper bound of one template's segments (slashes); Matrix paths have about ten.
pub const MAX_SEGMENTS: usize = 16;
/// Longest path (without its query) that is matched at all. The longest real sync or room path
/// is far shorter: a room ID is at most 255 bytes (765 percent-encoded), event types and state
/// keys likewise, and transaction IDs are short. A longer path matches nothing.
pub const MAX_PATH_LEN: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    /// Bytes, and how many of them are `/`.
    Literal(Box<[u8]>, usize),
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

    /// Whether `path` (without its query) matches any template (never when it is longer
    /// than `MAX_PATH_LEN`).
    pub fn matches(&self, path: &[u8]) -> bool {
        self.capture(path).is_some()
    }

    /// The segment the first `*` of the first matching template matched (None: no template
    /// matches, or the path is longer than `MAX_PATH_LEN`; Some(None): one matches without a
    /// `*`).
    pub fn capture<'p>(&self, path: &'p [u8]) -> Option<Option<&'p [u8]>> {
        if path.len() > MAX_PATH_LEN {
            return None;
        }
        let mut slashes = Slashes::new(path);
        self.templates
            .iter()
            .find_map(|t| capture(t, path, &mut slashes))
    }
}

/// Most slashes indexed: a template has at most `MAX_SEGMENTS` slashes, so no `*` of it ends
/// past the path's slash number `MAX_SEGMENTS` (from 0).
const MAX_SLASHES: usize = MAX_SEGMENTS + 1;

/// Offsets of a path's first `MAX_SLASHES` slashes (the path is at most `MAX_PATH_LEN` bytes, so
/// they fit in u16), found as templates need them: each byte of the path is scanned at most once
/// for all templates, and not at all when no template gets as far as a `*`.
struct Slashes<'p> {
    path: &'p [u8],
    at: [u16; MAX_SLASHES],
    len: usize,
    /// Where the scan for the next slash resumes.
    scanned: usize,
}

impl<'p> Slashes<'p> {
    fn new(path: &'p [u8]) -> Slashes<'p> {
        Slashes {
            path,
            at: [0; MAX_SLASHES],
            len: 0,
            scanned: 0,
        }
    }

    /// Offset of the `n`th slash (from 0), or the path's length when it has only `n`; None when
    /// past the index (scan instead).
    fn nth(&mut self, n: usize) -> Option<usize> {
        while self.len <= n {
            let rest = self.path.get(self.scanned..).unwrap_or_default();
            let Some(i) = rest.iter().position(|&b| b == b'/') else {
                self.scanned = self.path.len();
                return (self.len == n).then_some(self.path.len());
            };
            let offset = self.scanned + i;
            *self.at.get_mut(self.len)? = u16::try_from(offset).ok()?;
            self.len += 1;
            self.scanned = offset + 1;
        }
        self.at.get(n).map(|&at| usize::from(at))
    }
}

/// Whether `text` starts with `prefix`, compared eight bytes at a time: in wasm a byte-wise
/// `memcmp` is most of the cost of long literals.
fn starts_with(text: &[u8], prefix: &[u8]) -> bool {
    let Some(head) = text.get(..prefix.len()) else {
        return false;
    };
    // Slices of one length under 8: equal folds mean equal bytes.
    let tail = |c: &[u8]| c.iter().fold(0u64, |w, &b| (w << 8) | u64::from(b));
    if prefix.len() < 8 {
        return tail(head) == tail(prefix);
    }
    let (a, b) = (head.chunks_exact(8), prefix.chunks_exact(8));
    let word = |c: &[u8]| <[u8; 8]>::try_from(c).map(u64::from_ne_bytes).unwrap_or(0);
    tail(a.remainder()) == tail(b.remainder()) && a.zip(b).all(|(x, y)| word(x) == word(y))
}

fn capture<'p>(
    template: &[Piece],
    path: &'p [u8],
    slashes: &mut Slashes<'_>,
) -> Option<Option<&'p [u8]>> {
    let mut at = 0;
    // Slashes in path[..at]: the next one, if any, ends the segment that starts at `at`.
    let mut seen = 0;
    let mut first = None;
    for piece in template {
        let rest = path.get(at..)?;
        match piece {
            Piece::Literal(lit, lit_slashes) => {
                if !starts_with(rest, lit) {
                    return None;
                }
                at += lit.len();
                seen += lit_slashes;
            }
            Piece::Segment => {
                let len = match slashes.nth(seen) {
                    Some(end) => end.checked_sub(at)?,
                    None => rest.iter().position(|&b| b == b'/').unwrap_or(rest.len()),
                };
                if len == 0 {
                    return None;
                }
                first = first.or(rest.get(..len));
                at += len;
            }
            Piece::Rest => {
                return (rest.is_empty() || rest.starts_with(b"/")).then_some(first);
            }
        }
    }
    (at == path.len()).then_some(first)
}

fn literal_piece(literal: String) -> Piece {
    let slashes = literal.bytes().filter(|&b| b == b'/').count();
    Piece::Literal(literal.into_bytes().into(), slashes)
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
                out.push(literal_piece(std::mem::take(&mut literal)));
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
        out.push(literal_piece(literal));
    }
    out
}

/// Checks one template and expands its alternations into plain templates.
fn expand(template: &str) -> Result<Vec<String>, String> {
    if !template.starts_with('/') {
        return Err(if template.starts_with('^') {
            "is a regular expression; sync_paths takes path templates such as \
             `/_matrix/client/{r0|v3}/sync` (see docs/configuration.md)"
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
        if d.bytes().filter(|&b| b == b'/').count() > MAX_SEGMENTS {
            return Err(format!("has more than {MAX_SEGMENTS} segments"));
        }
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
            ("/a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/q", "segments"),
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
    fn paths_over_the_limit_match_nothing() {
        let s = set(&["/_matrix/client/*/sync", "/**"]);
        let longest = format!("/_matrix/client/{}/sync", "x".repeat(MAX_PATH_LEN - 21));
        assert_eq!(longest.len(), MAX_PATH_LEN);
        assert!(s.matches(longest.as_bytes()));
        let over = format!("/_matrix/client/{}/sync", "x".repeat(MAX_PATH_LEN - 20));
        assert!(!s.matches(over.as_bytes()));
        assert_eq!(s.capture(over.as_bytes()), None);
    }

    #[test]
    fn cost_is_linear_for_hostile_paths() {
        let s = set(&["/_matrix/client/*/sync", "/{a|b}/*/*/*/*/*/*/*/z"]);
        let long = format!("/_matrix/client/{}/sync", "x".repeat(4000));
        assert!(s.matches(long.as_bytes()));
        let slashes = "/a".repeat(30 * 1024);
        let start = std::time::Instant::now();
        for _ in 0..100 {
            assert!(!s.matches(slashes.as_bytes()));
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
    }

    /// The matcher before the slash index: each `*` scans to the next `/`.
    fn naive<'p>(template: &[Piece], path: &'p [u8]) -> Option<Option<&'p [u8]>> {
        let mut rest = path;
        let mut first = None;
        for piece in template {
            match piece {
                Piece::Literal(lit, _) => rest = rest.strip_prefix(&lit[..])?,
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

    #[test]
    fn the_indexed_matcher_agrees_with_the_naive_one() {
        // A small alphabet makes matches, near misses and long literals (word-wise compares)
        // frequent; templates and paths are drawn from the same pieces.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = |n: u64| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) % n
        };
        let words = [
            "a",
            "ab",
            "abcdefghij",
            "abcdefghijk",
            "b",
            "_matrix",
            "sync",
        ];
        let (mut matched, mut captured) = (0, 0);
        for _ in 0..20_000 {
            let mut template = String::new();
            for i in 0..=next(5) {
                template.push('/');
                match next(6) {
                    0 => template.push('*'),
                    1 if i > 0 => {
                        template.push_str("**");
                        break;
                    }
                    _ => template.push_str(words[next(words.len() as u64) as usize]),
                }
            }
            let mut path = String::new();
            for _ in 0..next(7) {
                path.push('/');
                for _ in 0..next(3) {
                    path.push_str(words[next(words.len() as u64) as usize]);
                }
            }
            let Ok(set) = PathSet::compile(&[template.as_str()]) else {
                continue;
            };
            let expected = naive(&set.templates[0], path.as_bytes());
            assert_eq!(set.capture(path.as_bytes()), expected, "{template} {path}");
            matched += usize::from(expected.is_some());
            captured += usize::from(matches!(expected, Some(Some(_))));
        }
        // The draw exercises matches and captures, not only misses.
        assert!(matched > 300 && captured > 150, "{matched} {captured}");
    }
}
