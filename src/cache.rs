//! The shared-data cache: keyed token hashes, slot keys, and the entry codec.
//!
//! The raw token is never stored: an entry is addressed and identified by a SipHash-2-4-128 of
//! the token keyed with a random secret that all VMs of the process share (`<prefix>/secret`).
//! The fallback key is the start of that hash, unless the operator sets `fallback_key_secret`:
//! then it is a hash keyed with that secret, the same in every process that has it.
//! A fixed number of slots bounds the cache. Each token has two candidate slots (two-choice
//! hashing), so two busy tokens sharing one slot do not evict each other on every request. An
//! entry carries the full 128-bit hash, so a slot collision (or ngx_wasm_module's crc32-only key
//! comparison) is detected, never misread as a hit.

use crate::matrix::{is_user_id, Errcode, Rejection};
use siphasher::sip128::{Hasher128, SipHasher24};
use std::hash::Hasher;

/// Length of the shared secret in shared data.
pub const SECRET_LEN: usize = 16;

/// The key of a token hash. Random per process; shared by all VMs through shared data. It may
/// carry the operator's `fallback_key_secret`, which keys the fallback key instead.
#[derive(Debug, Clone, Copy)]
pub struct Secret {
    key: [u8; SECRET_LEN],
    fallback: Option<[u8; SECRET_LEN]>,
}

/// Two secrets are the same when their cache keys are: the fallback secret comes from the
/// configuration, the same in every VM.
impl PartialEq for Secret {
    fn eq(&self, other: &Secret) -> bool {
        self.key == other.key
    }
}

impl Eq for Secret {}

impl Secret {
    pub fn from_bytes(bytes: &[u8]) -> Option<Secret> {
        bytes.try_into().ok().map(|key| Secret {
            key,
            fallback: None,
        })
    }

    /// The cache key, as kept in shared data (never the fallback secret).
    pub fn as_bytes(&self) -> &[u8] {
        &self.key
    }

    /// This secret with the fallback key keyed by `fallback` (None: by the cache key).
    pub fn with_fallback(self, fallback: Option<[u8; SECRET_LEN]>) -> Secret {
        Secret { fallback, ..self }
    }

    /// `other`'s cache key with this secret's fallback secret.
    pub fn with_key_of(self, other: Secret) -> Secret {
        Secret {
            key: other.key,
            ..self
        }
    }

    pub fn hash(&self, token: &[u8]) -> TokenHash {
        self.hash_as(token, None)
    }

    /// The hash of `token` used as appservice user `masquerade` (`?user_id=`): a different
    /// entry per masqueraded user. `0xff` never occurs in a token, so the parts cannot blur.
    pub fn hash_as(&self, token: &[u8], masquerade: Option<&str>) -> TokenHash {
        let keyed = |key: &[u8; SECRET_LEN]| {
            let mut h = SipHasher24::new_with_key(key);
            h.write(token);
            if let Some(user) = masquerade {
                h.write(&[0xff]);
                h.write(user.as_bytes());
            }
            h.finish128().as_bytes()
        };
        let hash = keyed(&self.key);
        let fallback = match &self.fallback {
            Some(key) => keyed(key),
            None => hash,
        };
        let mut start = [0; 8];
        for (to, from) in start.iter_mut().zip(fallback) {
            *to = from;
        }
        TokenHash(hash, start)
    }
}

/// A keyed 128-bit hash of a token: the only form of a token that leaves the request. With it,
/// the 64 bits its fallback key shows (the hash's first half, or with `fallback_key_secret` the
/// first half of a hash keyed with that secret).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenHash(pub [u8; 16], pub [u8; 8]);

/// The fallback hash-key value: `~` and 16 hex digits. It cannot be mistaken for a user ID (which
/// starts with `@`) and keeps one device's requests together when the user is unknown.
pub type FallbackKey = [u8; 17];

impl TokenHash {
    fn word(&self, half: usize) -> u64 {
        let (lo, hi) = self.0.split_at(8);
        let half = if half == 0 { lo } else { hi };
        half.iter().rev().fold(0, |w, &b| (w << 8) | u64::from(b))
    }

    /// The token's two candidate slots in `0..capacity` (distinct unless capacity is 1).
    pub fn slots(&self, capacity: u32) -> [u32; 2] {
        let cap = u64::from(capacity.max(1));
        let first = (self.word(1) % cap) as u32;
        let mut second = (self.word(0).rotate_left(32) % cap) as u32;
        if second == first && capacity > 1 {
            second = (first + 1) % capacity;
        }
        [first, second]
    }

    /// Index into a per-VM table of `len` (a power of two) entries.
    pub fn local_index(&self, len: usize) -> usize {
        (self.word(1) >> 32) as usize & (len - 1)
    }

    pub fn fallback_key(&self) -> FallbackKey {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [b'~'; 17];
        let digits = self.1.iter().flat_map(|b| [b >> 4, b & 0xf]);
        for (slot, d) in out.iter_mut().skip(1).zip(digits) {
            *slot = HEX.get(usize::from(d)).copied().unwrap_or(b'0');
        }
        out
    }
}

/// Shared-data key of the secret.
pub fn secret_key(prefix: &str) -> String {
    format!("{prefix}/secret")
}

/// Shared-data key of a slot, `<prefix>/<slot>`, built on the stack (the hit path allocates
/// nothing for it). The prefix is at most 64 bytes and a slot at most 8 digits.
#[derive(Clone, Copy)]
pub struct SlotKey {
    buf: [u8; 80],
    len: u8,
}

impl SlotKey {
    pub fn new(prefix: &str, slot: u32) -> SlotKey {
        // Digits of the slot, least significant first.
        let mut digits = [0u8; 10];
        let mut count = 0;
        let mut n = slot;
        for d in digits.iter_mut() {
            *d = b'0' + (n % 10) as u8;
            count += 1;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        let bytes = prefix
            .bytes()
            .take(64)
            .chain(std::iter::once(b'/'))
            .chain(digits.into_iter().take(count).rev());
        let mut key = SlotKey {
            buf: [0; 80],
            len: 0,
        };
        for (slot, b) in key.buf.iter_mut().zip(bytes) {
            *slot = b;
            key.len += 1;
        }
        key
    }

    pub fn as_str(&self) -> &str {
        // Built from a `&str` prefix, `/` and ASCII digits only.
        let bytes = self.buf.get(..usize::from(self.len)).unwrap_or_default();
        std::str::from_utf8(bytes).unwrap_or("")
    }
}

impl std::fmt::Debug for SlotKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a slot says about a token.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// Nothing usable: empty slot, another token's entry, expired, or unreadable.
    Miss,
    /// Synapse said this token belongs to this user. `refresh` is true when the entry is in its
    /// refresh window and no one has claimed the refresh yet: this request should claim it.
    /// Until `refresh_at` the answer may be kept in a VM's own memory.
    User {
        user: &'a str,
        refresh: bool,
        refresh_at: u64,
    },
    /// Synapse rejected the token.
    Denied(Rejection),
    /// whoami recently failed for this token: do not call again yet.
    Backoff,
    /// A VM is asking whoami about this token right now; its answer is due before `until`.
    Pending { until: u64 },
}

/// What is written into a slot.
#[derive(Debug, PartialEq, Eq)]
pub enum Entry<'a> {
    User(&'a str),
    Denied(Rejection),
    Backoff,
    /// The in-flight marker: one VM has called whoami for this token.
    Pending,
}

const VERSION: u8 = 3;
const KIND_USER: u8 = 1;
const KIND_DENIED: u8 = 2;
const KIND_BACKOFF: u8 = 3;
const KIND_PENDING: u8 = 4;
/// version, kind, 16-byte hash, then three times in ms since the epoch (little endian): expiry,
/// start of the refresh window, and until when a refresh is claimed.
const HEADER_LEN: usize = 2 + 16 + 3 * 8;

/// A slot's fixed header, read field by field.
struct Header<'a>(&'a [u8; HEADER_LEN]);

impl Header<'_> {
    fn kind(&self) -> u8 {
        self.0[1]
    }

    fn is_for(&self, hash: &TokenHash) -> bool {
        self.0[2..18] == hash.0
    }

    fn time(&self, at: usize) -> u64 {
        let bytes = self.0.iter().skip(at).take(8);
        bytes.rev().fold(0, |w, &b| (w << 8) | u64::from(b))
    }

    fn expires(&self) -> u64 {
        self.time(18)
    }

    fn refresh_at(&self) -> u64 {
        self.time(26)
    }

    fn claimed_until(&self) -> u64 {
        self.time(34)
    }
}

/// When an entry written at `now_ms` for `ttl_ms` should be refreshed: in the last tenth of its
/// life, so a token in use is renewed by one request before it expires instead of by every
/// request that would miss at once after.
pub fn refresh_at(now_ms: u64, ttl_ms: u64) -> u64 {
    now_ms.saturating_add(ttl_ms - ttl_ms / 10)
}

/// Encodes an entry for `hash`, valid until `expires_ms`; a user entry asks for a refresh from
/// `refresh_at_ms` on (other kinds are never refreshed).
pub fn encode(hash: &TokenHash, expires_ms: u64, refresh_at_ms: u64, entry: &Entry<'_>) -> Vec<u8> {
    let (kind, extra) = match entry {
        Entry::User(user) => (KIND_USER, user.len()),
        Entry::Denied(_) => (KIND_DENIED, 4),
        Entry::Backoff => (KIND_BACKOFF, 0),
        Entry::Pending => (KIND_PENDING, 0),
    };
    let mut out = Vec::with_capacity(HEADER_LEN + extra);
    out.push(VERSION);
    out.push(kind);
    out.extend_from_slice(&hash.0);
    out.extend_from_slice(&expires_ms.to_le_bytes());
    out.extend_from_slice(&refresh_at_ms.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    match entry {
        Entry::User(user) => out.extend_from_slice(user.as_bytes()),
        Entry::Denied(r) => {
            out.extend_from_slice(&r.status.to_le_bytes());
            out.push(r.errcode.to_byte());
            out.push(u8::from(r.soft_logout));
        }
        Entry::Backoff | Entry::Pending => {}
    }
    out
}

/// The header and payload of an entry of this codec version (None: empty, short or foreign).
fn split(bytes: &[u8]) -> Option<(Header<'_>, &[u8])> {
    let (header, rest) = bytes.split_first_chunk::<HEADER_LEN>()?;
    (header[0] == VERSION).then_some((Header(header), rest))
}

/// The header of this token's entry, if the bytes are one.
fn header_for<'a>(bytes: &'a [u8], hash: &TokenHash) -> Option<(Header<'a>, &'a [u8])> {
    split(bytes).filter(|(header, _)| header.is_for(hash))
}

/// Reads a slot's bytes for `hash` at time `now_ms`. Every field is checked: a slot can hold
/// anything (another filter in the same nginx can write the zone), and a user that is not a
/// Matrix user ID is never trusted, so such an entry reads as a miss and is overwritten.
pub fn lookup<'a>(bytes: &'a [u8], hash: &TokenHash, now_ms: u64) -> Lookup<'a> {
    let Some((header, rest)) = header_for(bytes, hash) else {
        return Lookup::Miss;
    };
    if header.expires() <= now_ms {
        return Lookup::Miss;
    }
    match header.kind() {
        KIND_USER => match std::str::from_utf8(rest) {
            Ok(user) if is_user_id(user) => Lookup::User {
                user,
                refresh: header.refresh_at() <= now_ms && header.claimed_until() <= now_ms,
                refresh_at: header.refresh_at(),
            },
            _ => Lookup::Miss,
        },
        KIND_DENIED => match rest {
            [s0, s1, code, soft] => {
                let status = u16::from_le_bytes([*s0, *s1]);
                if status != 401 && status != 403 {
                    return Lookup::Miss;
                }
                Lookup::Denied(Rejection {
                    status,
                    errcode: Errcode::from_byte(*code),
                    soft_logout: *soft == 1,
                })
            }
            _ => Lookup::Miss,
        },
        KIND_BACKOFF => Lookup::Backoff,
        KIND_PENDING => Lookup::Pending {
            until: header.expires(),
        },
        _ => Lookup::Miss,
    }
}

/// Whether a slot's bytes are an entry of this token, in any state.
pub fn holds_token(bytes: &[u8], hash: &TokenHash) -> bool {
    header_for(bytes, hash).is_some()
}

/// Which of a token's two candidate slots a new entry goes to: the one already holding this
/// token, else an empty, expired or unreadable one, else the one whose entry expires first.
pub fn choose_slot(candidates: [Option<&[u8]>; 2], hash: &TokenHash, now_ms: u64) -> usize {
    let expiry = |c: Option<&[u8]>| c.and_then(split).map_or(0, |(h, _)| h.expires());
    if let Some(i) = candidates
        .iter()
        .position(|c| c.is_some_and(|b| holds_token(b, hash)))
    {
        return i;
    }
    let [a, b] = candidates.map(expiry);
    if a <= now_ms || a <= b {
        0
    } else {
        1
    }
}

/// A copy of a slot's entry with its refresh claimed until `until_ms` (None if unreadable).
pub fn claim(bytes: &[u8], until_ms: u64) -> Option<Vec<u8>> {
    split(bytes)?;
    let mut out = bytes.to_vec();
    out.get_mut(34..42)?
        .copy_from_slice(&until_ms.to_le_bytes());
    Some(out)
}

/// Whether a slot holds this token's valid user entry that is not yet due for a refresh, so a
/// write can be skipped (another VM resolved or refreshed the same token first).
pub fn holds_fresh_user(bytes: &[u8], hash: &TokenHash, now_ms: u64) -> bool {
    matches!(
        lookup(bytes, hash, now_ms),
        Lookup::User { refresh_at, .. } if now_ms < refresh_at
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: Secret = Secret {
        key: [7; 16],
        fallback: None,
    };

    #[test]
    fn hash_is_keyed_and_stable() {
        let a = SECRET.hash(b"syt_token");
        assert_eq!(a, SECRET.hash(b"syt_token"));
        assert_ne!(a, SECRET.hash(b"syt_tokeN"));
        assert_ne!(a, Secret::from_bytes(&[8; 16]).unwrap().hash(b"syt_token"));
    }

    #[test]
    fn slots_stay_in_range_spread_and_differ() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..2000 {
            let [a, b] = SECRET.hash(format!("tok{i}").as_bytes()).slots(16);
            assert!(a < 16 && b < 16 && a != b);
            seen.insert(a);
            seen.insert(b);
        }
        assert_eq!(seen.len(), 16);
        assert_eq!(SECRET.hash(b"x").slots(1), [0, 0]);
        assert!(SECRET.hash(b"x").local_index(1024) < 1024);
    }

    #[test]
    fn a_new_entry_takes_its_own_then_a_free_then_the_oldest_slot() {
        let me = SECRET.hash(b"me");
        let other = SECRET.hash(b"other");
        let mine = encode(&me, 50, 40, &Entry::User("@me:x"));
        let soon = encode(&other, 100, 90, &Entry::User("@o:x"));
        let late = encode(&other, 200, 180, &Entry::User("@o:x"));
        assert_eq!(choose_slot([Some(&late), Some(&mine)], &me, 10), 1);
        assert_eq!(choose_slot([None, None], &me, 10), 0);
        assert_eq!(choose_slot([Some(&late), None], &me, 10), 1);
        assert_eq!(choose_slot([Some(&late), Some(b"junk")], &me, 10), 1);
        assert_eq!(choose_slot([Some(&late), Some(&soon)], &me, 10), 1);
        assert_eq!(choose_slot([Some(&soon), Some(&late)], &me, 10), 0);
        // Expired counts as free.
        assert_eq!(choose_slot([Some(&soon), Some(&late)], &me, 150), 0);
    }

    #[test]
    fn rejections_keep_only_status_and_code() {
        let h = SECRET.hash(b"t");
        let r = Rejection {
            status: 401,
            errcode: Errcode::UserLocked,
            soft_logout: true,
        };
        let e = encode(&h, 100, 100, &Entry::Denied(r));
        assert_eq!(e.len(), HEADER_LEN + 4);
        assert_eq!(lookup(&e, &h, 0), Lookup::Denied(r));
        let mut bad_status = e.clone();
        bad_status[HEADER_LEN] = 200;
        assert_eq!(lookup(&bad_status, &h, 0), Lookup::Miss);
    }

    #[test]
    fn users_that_are_not_matrix_ids_are_never_trusted() {
        let h = SECRET.hash(b"t");
        for bad in ["", "alice", "@a:x\r\nX-Evil: 1", "@a:x\0", "@:x"] {
            let e = encode(&h, 100, 90, &Entry::User(bad));
            assert_eq!(lookup(&e, &h, 0), Lookup::Miss, "{bad:?}");
            assert!(!holds_fresh_user(&e, &h, 0));
            // The bad entry is this token's, so the next answer overwrites it.
            assert_eq!(choose_slot([None, Some(&e)], &h, 0), 1);
        }
    }

    #[test]
    fn pending_markers() {
        let h = SECRET.hash(b"t");
        let p = encode(&h, 500, 500, &Entry::Pending);
        assert_eq!(lookup(&p, &h, 10), Lookup::Pending { until: 500 });
        assert_eq!(lookup(&p, &h, 500), Lookup::Miss);
        assert!(!holds_fresh_user(&p, &h, 10));
    }

    #[test]
    fn a_fallback_secret_keys_the_fallback_key_only() {
        let token = b"mat_unknown";
        let shared = |key: u8, fallback: u8| {
            Secret {
                key: [key; 16],
                fallback: None,
            }
            .with_fallback(Some([fallback; 16]))
            .hash(token)
        };
        // Two processes (cache keys 1 and 2) with one fallback secret: one fallback key, but
        // their cache hashes (shared-data slots and entries) stay their own.
        let (a, b) = (shared(1, 5), shared(2, 5));
        assert_eq!(a.fallback_key(), b.fallback_key());
        assert_ne!(a.0, b.0);
        assert_ne!(a.slots(1 << 20), b.slots(1 << 20));
        // Another fallback secret, another key; none at all, per process as before.
        assert_ne!(shared(1, 6).fallback_key(), a.fallback_key());
        let own = |key: u8| Secret::from_bytes(&[key; 16]).unwrap().hash(token);
        assert_ne!(own(1).fallback_key(), own(2).fallback_key());
        assert_eq!(own(1).0, a.0);
        // A secret read back from shared data keeps this VM's fallback secret.
        let mine = Secret::from_bytes(&[1; 16])
            .unwrap()
            .with_fallback(Some([5; 16]));
        let adopted = mine.with_key_of(Secret::from_bytes(&[2; 16]).unwrap());
        assert_eq!(adopted.hash(token), b);
        assert_eq!(adopted.as_bytes(), &[2; 16]);
    }

    #[test]
    fn fallback_key_is_hex_of_the_hash_not_the_token() {
        let token = b"syt_YWxpY2U_abcdefghijklmnop_0a1b2c";
        let key = SECRET.hash(token).fallback_key();
        let text = std::str::from_utf8(&key).unwrap();
        assert!(text.starts_with('~'));
        assert!(text[1..].bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(text.len(), 17);
        // No 4-byte window of the token shows up in the key.
        for w in token.windows(4) {
            assert!(!text.as_bytes().windows(4).any(|k| k == w));
        }
    }

    fn user(u: &str, refresh: bool) -> Lookup<'_> {
        Lookup::User {
            user: u,
            refresh,
            refresh_at: 900,
        }
    }

    #[test]
    fn entries_round_trip() {
        let h = SECRET.hash(b"t");
        let alice = encode(&h, 1000, 900, &Entry::User("@alice:example.org"));
        assert_eq!(lookup(&alice, &h, 899), user("@alice:example.org", false));
        let r = Rejection {
            status: 401,
            errcode: Errcode::UnknownToken,
            soft_logout: false,
        };
        let denied = encode(&h, 1000, 1000, &Entry::Denied(r));
        assert_eq!(lookup(&denied, &h, 0), Lookup::Denied(r));
        let backoff = encode(&h, 1000, 1000, &Entry::Backoff);
        assert_eq!(lookup(&backoff, &h, 0), Lookup::Backoff);
    }

    #[test]
    fn refresh_window_and_claims() {
        assert_eq!(refresh_at(1000, 3_600_000), 1000 + 3_240_000);
        let h = SECRET.hash(b"t");
        let alice = encode(&h, 1000, 900, &Entry::User("@a:x"));
        assert_eq!(lookup(&alice, &h, 900), user("@a:x", true));
        assert!(holds_fresh_user(&alice, &h, 899));
        assert!(!holds_fresh_user(&alice, &h, 900));
        // Claimed: still a hit, no longer asking for a refresh, until the claim lapses.
        let claimed = claim(&alice, 950).unwrap();
        assert_eq!(lookup(&claimed, &h, 920), user("@a:x", false));
        assert_eq!(lookup(&claimed, &h, 950), user("@a:x", true));
        assert_eq!(lookup(&claimed, &h, 1000), Lookup::Miss);
        assert_eq!(claim(b"short", 1), None);
    }

    #[test]
    fn expired_foreign_and_garbage_entries_miss() {
        let h = SECRET.hash(b"t");
        let other = SECRET.hash(b"u");
        let alice = encode(&h, 1000, 900, &Entry::User("@alice:example.org"));
        assert_eq!(lookup(&alice, &h, 1000), Lookup::Miss);
        assert_eq!(lookup(&alice, &other, 0), Lookup::Miss);
        assert!(!holds_fresh_user(&alice, &other, 0));
        assert_eq!(lookup(b"", &h, 0), Lookup::Miss);
        assert_eq!(lookup(&alice[..HEADER_LEN - 1], &h, 0), Lookup::Miss);
        assert_eq!(lookup(&alice[..HEADER_LEN], &h, 0), Lookup::Miss);
        let mut bad_kind = alice.clone();
        bad_kind[1] = 9;
        assert_eq!(lookup(&bad_kind, &h, 0), Lookup::Miss);
        let mut old_version = alice;
        old_version[0] = 2;
        assert_eq!(lookup(&old_version, &h, 0), Lookup::Miss);
    }

    #[test]
    fn keys() {
        assert_eq!(secret_key("msr"), "msr/secret");
        assert_eq!(SlotKey::new("msr", 42).as_str(), "msr/42");
        assert_eq!(SlotKey::new("msr", 0).as_str(), "msr/0");
        let long = "p".repeat(64);
        assert_eq!(
            SlotKey::new(&long, 16_777_215).as_str(),
            format!("{long}/16777215")
        );
    }
}
