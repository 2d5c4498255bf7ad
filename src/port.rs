//! The port: what the decision engine needs from its host. `host.rs` implements it with
//! proxy-wasm calls; the unit tests implement it with a fake. Every method absorbs host errors
//! (a failed read is "absent", a failed write is reported), so no host status can make the
//! filter panic. `HeaderBlock` is the ABI's header-map codec the port hands whole header maps in.

use crate::metrics::Counter;

/// A proxy-wasm context id (a request, or the plugin's root context).
pub type ContextId = u32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetStatus {
    Ok,
    CasMismatch,
    Failed,
}

/// What the request-headers callback returns to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    Pause,
}

/// proxy-wasm log levels the filter uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Info = 2,
    Warn = 3,
    Error = 4,
}

pub trait Host {
    /// Bytes the host returned; the adapter may lend them from a per-callback arena.
    type Bytes: std::ops::Deref<Target = [u8]>;

    /// One request header (or pseudo-header) of the current context.
    fn request_header(&self, name: &str) -> Option<Self::Bytes>;
    /// All request headers, in one host call (only where a header scan is needed).
    fn request_headers(&self) -> HeaderBlock<Self::Bytes>;
    fn set_request_header(&self, name: &str, value: &[u8]);
    fn remove_request_header(&self, name: &str);
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
    fn set_property(&self, path: &[&str], value: &[u8]) -> bool;
    /// The value and CAS of a shared-data key; CAS 0 when the key is absent.
    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, u32);
    fn shared_set(&self, key: &str, value: &[u8], cas: u32) -> SetStatus;
    fn now_ms(&self) -> u64;
    fn random(&self, buf: &mut [u8]) -> bool;
    /// Starts an HTTP callout; its token, or None when the host refused it.
    fn dispatch(&self, upstream: &str, headers: &[(&str, &str)], timeout_ms: u32) -> Option<u32>;
    fn send_response(&self, status: u16, headers: &[(&str, &str)], body: &[u8]);
    /// Makes `context` the one later calls act on; false when it no longer exists.
    fn enter(&self, context: ContextId) -> bool;
    /// Resumes the current context's paused request.
    fn resume(&self);
    fn set_tick_period(&self, ms: u32);
    /// Calls a host's foreign function without arguments; false when it has none by that name.
    fn call_foreign(&self, name: &str) -> bool;
    /// Adds `delta` to a counter of the host (the engine counts in VM memory and flushes).
    fn add_to_counter(&self, counter: Counter, delta: u64);
    fn log(&self, level: Level, message: &str);
}

/// A request's headers as proxy-wasm serializes a header map: a u32 count, a (name length, value
/// length) u32 pair per header, then each name and value followed by a NUL. Read in one host call
/// (each data-returning call costs about a microsecond in Envoy) and parsed with bounds checks,
/// so a surprising host answer yields fewer headers, never a trap.
/// The bytes are the host's own (`Host::Bytes`), so reading a block copies nothing.
#[derive(Debug, Clone, Default)]
pub struct HeaderBlock<B = Vec<u8>>(B);

impl<B: std::ops::Deref<Target = [u8]>> HeaderBlock<B> {
    pub fn from_bytes(bytes: B) -> HeaderBlock<B> {
        HeaderBlock(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Every (name, value) in order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let bytes = &self.0[..];
        let word = move |at: usize| -> Option<usize> {
            let b = bytes.get(at..)?.first_chunk::<4>()?;
            Some(u32::from_le_bytes(*b) as usize)
        };
        let count = word(0).unwrap_or(0);
        let mut data = count.checked_mul(8).and_then(|n| n.checked_add(4));
        (0..count).map_while(move |n| {
            let (klen, vlen) = (word(4 + n * 8)?, word(8 + n * 8)?);
            let start = data?;
            let name = bytes.get(start..start.checked_add(klen)?)?;
            let vstart = start.checked_add(klen)?.checked_add(1)?;
            let value = bytes.get(vstart..vstart.checked_add(vlen)?)?;
            data = vstart.checked_add(vlen)?.checked_add(1);
            Some((name, value))
        })
    }

    /// The distinct spellings of `name` present, in order (for hosts that remove headers by
    /// exact name); no allocation.
    pub fn spellings<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s [u8]> + 's {
        let matches = move |n: &[u8]| n.eq_ignore_ascii_case(name.as_bytes());
        self.iter().enumerate().filter_map(move |(i, (n, _))| {
            let first = || !self.iter().take(i).any(|(m, _)| m == n);
            (matches(n) && first()).then_some(n)
        })
    }
}

impl HeaderBlock<Vec<u8>> {
    /// Serializes `pairs` in the same format (for local responses and for tests).
    pub fn serialize<V: AsRef<[u8]>>(pairs: &[(&str, V)]) -> HeaderBlock {
        let size: usize = pairs
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().len() + 10)
            .sum();
        let mut out = Vec::with_capacity(4 + size);
        out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
        for (k, v) in pairs {
            out.extend_from_slice(&(k.len() as u32).to_le_bytes());
            out.extend_from_slice(&(v.as_ref().len() as u32).to_le_bytes());
        }
        for (k, v) in pairs {
            out.extend_from_slice(k.as_bytes());
            out.push(0);
            out.extend_from_slice(v.as_ref());
            out.push(0);
        }
        HeaderBlock(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_blocks_round_trip_and_survive_garbage() {
        let block = HeaderBlock::serialize(&[
            (":path", &b"/sync"[..]),
            ("Authorization", b"Bearer t"),
            ("x-empty", b""),
            ("AUTHORIZATION", b"second"),
        ]);
        let get = |name: &str| {
            block
                .iter()
                .find(|(n, _)| *n == name.as_bytes())
                .map(|p| p.1)
        };
        assert_eq!(get(":path"), Some(&b"/sync"[..]));
        assert_eq!(get("Authorization"), Some(&b"Bearer t"[..]));
        assert_eq!(get("x-empty"), Some(&b""[..]));
        assert_eq!(get("missing"), None);
        assert_eq!(
            block.spellings("authorization").collect::<Vec<_>>(),
            vec![&b"Authorization"[..], &b"AUTHORIZATION"[..]]
        );
        assert_eq!(block.iter().count(), 4);
        // Truncated at every length, or with a huge count: fewer headers, no panic.
        for cut in 0..block.as_bytes().len() {
            let partial = HeaderBlock::from_bytes(block.as_bytes()[..cut].to_vec());
            assert!(partial.iter().count() <= 4);
        }
        let mut huge = block.as_bytes().to_vec();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(HeaderBlock::from_bytes(huge).iter().count() <= 4);
        assert_eq!(HeaderBlock::<Vec<u8>>::default().iter().count(), 0);
    }
}
