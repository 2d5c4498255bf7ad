//! The filter's counters: one table that yields the enum, the stable names and `ALL`, and a tally
//! kept in VM memory so the hit path makes no metric host call. The tally is flushed to the host
//! on every tick (once a second), so a scrape is exact to within a second.

macro_rules! counters {
    ($($variant:ident => $name:literal,)*) => {
        /// The filter's counters. Names are stable: operators alert on them.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Counter { $($variant,)* }

        impl Counter {
            pub const ALL: [Counter; [$($name),*].len()] = [$(Counter::$variant,)*];

            pub fn name(self) -> &'static str {
                match self { $(Counter::$variant => $name,)* }
            }
        }
    };
}

counters! {
    Requests => "matrix_sync_router_requests",
    NoToken => "matrix_sync_router_no_token",
    CacheHits => "matrix_sync_router_cache_hits",
    CacheMisses => "matrix_sync_router_cache_misses",
    NegativeHits => "matrix_sync_router_negative_hits",
    BackoffHits => "matrix_sync_router_backoff_hits",
    WhoamiOk => "matrix_sync_router_whoami_ok",
    WhoamiDenied => "matrix_sync_router_whoami_denied",
    WhoamiFailed => "matrix_sync_router_whoami_failed",
    Fallbacks => "matrix_sync_router_fallbacks",
    Rejected => "matrix_sync_router_rejected",
    CacheWriteFailures => "matrix_sync_router_cache_write_failures",
    Refreshes => "matrix_sync_router_refreshes",
    Coalesced => "matrix_sync_router_coalesced",
    Shed => "matrix_sync_router_shed",
    OverlongPaths => "matrix_sync_router_overlong_paths",
    Queued => "matrix_sync_router_queued",
}

/// Counts not yet added to the host's counters.
#[derive(Default)]
pub struct Tally {
    counts: [u64; Counter::ALL.len()],
    unflushed: u32,
}

/// Counts above this are flushed without waiting for a tick (a host that never ticks still
/// sees its counters move).
const FLUSH_EVERY: u32 = 4096;

impl Tally {
    /// Counts one; true when it is time to flush without waiting for the tick.
    pub fn add(&mut self, counter: Counter) -> bool {
        if let Some(c) = self.counts.get_mut(counter as usize) {
            *c = c.wrapping_add(1);
        }
        self.unflushed = self.unflushed.wrapping_add(1);
        self.unflushed >= FLUSH_EVERY
    }

    /// Takes every non-zero count, resetting it.
    pub fn take(&mut self) -> impl Iterator<Item = (Counter, u64)> + '_ {
        self.unflushed = 0;
        Counter::ALL
            .into_iter()
            .zip(self.counts.iter_mut())
            .filter_map(|(counter, c)| Some((counter, std::mem::take(c))).filter(|(_, n)| *n > 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_prefixed() {
        let mut names: Vec<_> = Counter::ALL.iter().map(|c| c.name()).collect();
        assert!(names.iter().all(|n| n.starts_with("matrix_sync_router_")));
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Counter::ALL.len());
        assert_eq!(Counter::ALL[Counter::Shed as usize], Counter::Shed);
    }

    #[test]
    fn tally_adds_up_and_resets() {
        let mut t = Tally::default();
        for _ in 0..3 {
            t.add(Counter::CacheHits);
        }
        t.add(Counter::Requests);
        let taken: Vec<_> = t.take().collect();
        assert_eq!(taken, vec![(Counter::Requests, 1), (Counter::CacheHits, 3)]);
        assert_eq!(t.take().count(), 0);
        let due = (0..FLUSH_EVERY).map(|_| t.add(Counter::Requests)).last();
        assert_eq!(due, Some(true));
    }
}
