//! What the engine tells the operator: counters tallied in VM memory and flushed to the host,
//! warnings limited to one per `WARN_INTERVAL_MS`, and the clock the hit path reads without a
//! host call.

use crate::metrics::{Counter, Tally};
use crate::port::{Host, Level};
use crate::whoami::Outcome;

/// Minimum time between two warnings about whoami failures from one VM.
const WARN_INTERVAL_MS: u64 = 10_000;
/// The hit path reads the clock from the last tick, and from the host every this many hits, so
/// a host that never ticks still ages its entries.
const CLOCK_EVERY: u32 = 256;

#[derive(Default)]
pub struct Report {
    tally: Tally,
    last_warn_ms: u64,
    suppressed_warnings: u32,
    clock: u64,
    clock_uses: u32,
}

impl Report {
    /// Counts one; the tally goes to the host now when it has grown large, else on the tick.
    pub fn count<H: Host>(&mut self, host: &H, counter: Counter) {
        if self.tally.add(counter) {
            self.flush(host);
        }
    }

    /// Call on every tick: adds the tally to the host's counters.
    pub fn flush<H: Host>(&mut self, host: &H) {
        for (counter, n) in self.tally.take() {
            host.add_to_counter(counter, n);
        }
    }

    /// Call with each whoami answer (`refresh`: the call renewed a cached entry): counts its
    /// outcome, and warns about a failure.
    pub fn answer<H: Host>(&mut self, host: &H, outcome: &Outcome, refresh: bool) {
        self.count(host, outcome.counter());
        if let Outcome::Failed(failure) = outcome {
            self.warn(host, &failure.describe(refresh));
        }
    }

    /// Logs a warning, unless one was logged less than `WARN_INTERVAL_MS` ago (then it is
    /// counted, and the next one logged says how many were suppressed).
    pub fn warn<H: Host>(&mut self, host: &H, message: &str) {
        let now = self.clock;
        if now.saturating_sub(self.last_warn_ms) < WARN_INTERVAL_MS && self.last_warn_ms != 0 {
            self.suppressed_warnings = self.suppressed_warnings.saturating_add(1);
            return;
        }
        let suppressed = std::mem::take(&mut self.suppressed_warnings);
        self.last_warn_ms = now.max(1);
        if suppressed > 0 {
            host.log(
                Level::Warn,
                &format!("{message} ({suppressed} similar warnings suppressed)"),
            );
        } else {
            host.log(Level::Warn, message);
        }
    }

    /// The time of the last tick (read from the host every `CLOCK_EVERY` uses): the hit path
    /// needs no clock call, and entries age by at most a tick late.
    pub fn coarse_now<H: Host>(&mut self, host: &H) -> u64 {
        self.clock_uses = self.clock_uses.wrapping_add(1);
        if self.clock_uses.is_multiple_of(CLOCK_EVERY) {
            return self.exact_now(host);
        }
        self.clock
    }

    /// The host's clock, remembered for `coarse_now` and for the warning limiter.
    pub fn exact_now<H: Host>(&mut self, host: &H) -> u64 {
        self.clock = host.now_ms();
        self.clock
    }
}
