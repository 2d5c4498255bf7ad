//! The port: what the decision engine needs from its host. `host.rs` implements it with
//! proxy-wasm calls; the unit tests implement it with a fake. Every method absorbs host errors
//! (a failed read is "absent", a failed write is reported), so no host status can make the
//! filter panic.

use crate::metrics::Counter;
use crate::request::HeaderBlock;

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
    fn request_headers(&self) -> HeaderBlock;
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
