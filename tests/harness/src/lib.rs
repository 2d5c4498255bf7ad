//! A proxy-wasm test harness: it loads a compiled filter (`wasm32-wasip1`) into wasmtime and plays
//! the host, as Envoy or as nginx + ngx_wasm_module would, so tests drive the real `.wasm` through
//! the proxy-wasm ABI 0.2.1 and observe everything the host would see.
//!
//! ```no_run
//! use proxy_wasm_harness::{Action, Filter, Host, Profile};
//!
//! # fn main() -> Result<(), proxy_wasm_harness::HarnessError> {
//! let filter = Filter::from_file("target/wasm32-wasip1/release/my_filter.wasm")?;
//! let host = Host::new(Profile::envoy().with_cluster("auth"));
//! let mut vm = host.start_vm(&filter, br#"{"upstream": "auth"}"#)?;
//! let stream = vm.request(&[(":method", "GET"), (":path", "/"), (":authority", "x")])?;
//! assert_eq!(vm.stream(stream)?.last_action(), Some(Action::Pause));
//! let call = vm.pending_calls()[0].token;
//! vm.respond(call, 200, &[], b"ok")?;
//! assert!(vm.stream(stream)?.resumed());
//! # Ok(())
//! # }
//! ```
//!
//! Every guest entry returns a `Result`: a trap (panic, `unreachable`, fuel exhausted, a host
//! call the profile's host would trap on) is a [`HarnessError::Trap`] carrying the guest's stderr,
//! and the VM refuses further calls, as a real host would.

mod abi;
pub mod headers;
mod host;
pub mod profile;
pub mod shared;
pub mod util;
mod vm;
pub mod wasi;

pub use headers::{HeaderMap, NameCase};
pub use host::{Filter, Host, LogLine, Metric, MetricKind};
pub use profile::{Delivery, Eviction, HostKind, Profile, Zone};
pub use shared::{SetAttempt, SharedData, SharedEntry, SharedStats};
pub use util::Rng;
pub use vm::{CallFailure, CallOutcome, CallRecord, Callback, LocalResponse, StreamState, Vm};

use std::fmt;

/// What a callback returned to the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// 0: continue processing.
    Continue,
    /// 1: stop iteration until the filter resumes.
    Pause,
    /// Anything else the guest returned.
    Other(u32),
}

impl Action {
    pub(crate) fn from_raw(raw: u32) -> Action {
        match raw {
            0 => Action::Continue,
            1 => Action::Pause,
            other => Action::Other(other),
        }
    }
}

/// proxy-wasm log levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LogLevel {
    /// 0
    Trace,
    /// 1
    Debug,
    /// 2
    Info,
    /// 3
    Warn,
    /// 4
    Error,
    /// 5
    Critical,
}

impl LogLevel {
    pub(crate) fn from_raw(raw: u32) -> Option<LogLevel> {
        Some(match raw {
            0 => LogLevel::Trace,
            1 => LogLevel::Debug,
            2 => LogLevel::Info,
            3 => LogLevel::Warn,
            4 => LogLevel::Error,
            5 => LogLevel::Critical,
            _ => return None,
        })
    }
}

/// Everything that can go wrong while driving a guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HarnessError {
    /// The module could not be loaded: unreadable, invalid, an import the harness does not
    /// provide, or an export the host needs is missing.
    Load(String),
    /// The guest trapped (or called `proc_exit`) during `callback`.
    Trap {
        /// Index of the VM.
        vm: usize,
        /// The guest export that was running.
        callback: String,
        /// The trap, with the guest's stderr (a Rust panic message lands there).
        message: String,
    },
    /// The VM trapped earlier and takes no more calls.
    VmFailed {
        /// Index of the VM.
        vm: usize,
        /// The trap that failed it.
        cause: String,
    },
    /// `on_vm_start` or `on_configure` returned false, as a host refusing the filter would
    /// report it; carries the log lines of that call.
    Rejected {
        /// Index of the VM.
        vm: usize,
        /// Which step refused.
        callback: String,
        /// The guest's log lines during the step.
        logs: Vec<String>,
    },
    /// The test asked for something that does not exist (unknown stream or call token, ...).
    Usage(String),
}

impl fmt::Display for HarnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HarnessError::Load(message) => write!(f, "cannot load the module: {message}"),
            HarnessError::Trap {
                vm,
                callback,
                message,
            } => write!(f, "VM {vm} trapped in {callback}: {message}"),
            HarnessError::VmFailed { vm, cause } => {
                write!(f, "VM {vm} failed earlier and takes no calls: {cause}")
            }
            HarnessError::Rejected { vm, callback, logs } => write!(
                f,
                "VM {vm}: {callback} returned false; logs: {}",
                logs.join(" | ")
            ),
            HarnessError::Usage(message) => write!(f, "harness misuse: {message}"),
        }
    }
}

impl std::error::Error for HarnessError {}

impl HarnessError {
    /// True for a guest trap (including a trap that failed the VM earlier).
    pub fn is_trap(&self) -> bool {
        matches!(
            self,
            HarnessError::Trap { .. } | HarnessError::VmFailed { .. }
        )
    }
}
