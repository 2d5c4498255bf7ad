//! The shared-data protocol: where a token's entry lives, how it is read, and how it is written
//! with read-then-CAS, which is right on both hosts (Envoy overwrites on CAS 0; ngx_wasm_module
//! treats CAS 0 on an existing key as a mismatch), plus the process-wide hash secret.

use crate::cache::{self, Entry, Lookup, Secret, SlotKey, TokenHash};
use crate::matrix::Rejection;
use crate::port::{Host, SetStatus};

/// How often a write is retried after a CAS mismatch before it is given up.
const WRITE_ATTEMPTS: usize = 4;

/// A slot entry as read, owned (decoded once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cached {
    User {
        user: Box<str>,
        refresh: bool,
        refresh_at: u64,
    },
    Denied(Rejection),
    Backoff,
    Pending {
        until: u64,
    },
}

/// A usable entry and where it came from (for a refresh claim).
pub struct Read {
    pub cached: Cached,
    key: SlotKey,
    bytes: Vec<u8>,
    cas: u32,
}

/// What claiming the in-flight marker found.
pub enum Claim {
    /// This VM may call whoami; every other VM now sees `Pending`.
    Won,
    /// Someone else got there first.
    Lost(Read),
    /// Shared data refused the write (an ngx zone that is full, say): call anyway.
    Unwritable,
}

pub struct Slots {
    prefix: String,
    capacity: u32,
    secret_key: String,
}

fn owned(lookup: Lookup<'_>) -> Option<Cached> {
    Some(match lookup {
        Lookup::Miss => return None,
        Lookup::User {
            user,
            refresh,
            refresh_at,
        } => Cached::User {
            user: user.into(),
            refresh,
            refresh_at,
        },
        Lookup::Denied(r) => Cached::Denied(r),
        Lookup::Backoff => Cached::Backoff,
        Lookup::Pending { until } => Cached::Pending { until },
    })
}

impl Slots {
    pub fn new(prefix: &str, capacity: u32) -> Slots {
        Slots {
            prefix: prefix.into(),
            capacity,
            secret_key: cache::secret_key(prefix),
        }
    }

    /// The token's candidate slot keys (one when capacity is 1).
    fn keys(&self, hash: &TokenHash) -> ([SlotKey; 2], usize) {
        let keys = hash
            .slots(self.capacity)
            .map(|slot| SlotKey::new(&self.prefix, slot));
        let distinct = if keys[0].as_str() == keys[1].as_str() {
            1
        } else {
            2
        };
        (keys, distinct)
    }

    /// The token's usable entry from the first candidate slot that has one.
    pub fn read<H: Host>(&self, host: &H, hash: &TokenHash, now: u64) -> Option<Read> {
        let (keys, distinct) = self.keys(hash);
        keys.iter().take(distinct).find_map(|key| {
            let (value, cas) = host.shared_get(key.as_str());
            let bytes = value?;
            let cached = owned(cache::lookup(&bytes, hash, now))?;
            Some(Read {
                cached,
                key: *key,
                bytes,
                cas,
            })
        })
    }

    /// Writes an entry into one of the token's slots (`cache::choose_slot`). A user entry is not
    /// written over this token's user entry that is still fresh (another VM was first). False
    /// when shared data refused every attempt.
    pub fn store<H: Host>(
        &self,
        host: &H,
        hash: &TokenHash,
        now: u64,
        (expires, refresh_at): (u64, u64),
        entry: &Entry<'_>,
    ) -> bool {
        let bytes = cache::encode(hash, expires, refresh_at, entry);
        let is_user = matches!(entry, Entry::User(_));
        let (keys, distinct) = self.keys(hash);
        for _ in 0..WRITE_ATTEMPTS {
            let [a, b] = keys.map(|k| host.shared_get(k.as_str()));
            let current = [a.0.as_deref(), b.0.as_deref().filter(|_| distinct == 2)];
            let fresh = |c: &[u8]| cache::holds_fresh_user(c, hash, now);
            if is_user && current.iter().any(|c| c.is_some_and(fresh)) {
                return true;
            }
            let (key, cas) = if cache::choose_slot(current, hash, now) == 0 {
                (&keys[0], a.1)
            } else {
                (&keys[1], b.1)
            };
            match host.shared_set(key.as_str(), &bytes, cas) {
                SetStatus::Ok => return true,
                SetStatus::CasMismatch => continue,
                SetStatus::Failed => break,
            }
        }
        false
    }

    /// Writes the in-flight marker (valid until `until`) unless another VM's entry for this
    /// token appeared meanwhile.
    pub fn claim_pending<H: Host>(
        &self,
        host: &H,
        hash: &TokenHash,
        now: u64,
        until: u64,
    ) -> Claim {
        let bytes = cache::encode(hash, until, until, &Entry::Pending);
        let (keys, distinct) = self.keys(hash);
        for _ in 0..WRITE_ATTEMPTS {
            let [a, b] = keys.map(|k| host.shared_get(k.as_str()));
            let current = [a.0.as_deref(), b.0.as_deref().filter(|_| distinct == 2)];
            for (i, c) in current.iter().enumerate() {
                if let Some(cached) = c.and_then(|c| owned(cache::lookup(c, hash, now))) {
                    let (key, got) = if i == 0 { (keys[0], &a) } else { (keys[1], &b) };
                    return Claim::Lost(Read {
                        cached,
                        key,
                        bytes: got.0.clone().unwrap_or_default(),
                        cas: got.1,
                    });
                }
            }
            let (key, cas) = if cache::choose_slot(current, hash, now) == 0 {
                (&keys[0], a.1)
            } else {
                (&keys[1], b.1)
            };
            match host.shared_set(key.as_str(), &bytes, cas) {
                SetStatus::Ok => return Claim::Won,
                SetStatus::CasMismatch => continue,
                SetStatus::Failed => return Claim::Unwritable,
            }
        }
        Claim::Unwritable
    }

    /// Claims the refresh of a user entry until `until` with a CAS write on the slot it was
    /// read from; true when this request won (every other one just hits).
    pub fn claim_refresh<H: Host>(&self, host: &H, read: &Read, until: u64) -> bool {
        cache::claim(&read.bytes, until).is_some_and(|claimed| {
            host.shared_set(read.key.as_str(), &claimed, read.cas) == SetStatus::Ok
        })
    }

    /// Reads the process's secret, creating it when absent. Fails when shared data cannot hold
    /// it (for ngx_wasm_module: the `shm_kv` zone is missing).
    pub fn load_or_create_secret<H: Host>(&self, host: &H) -> Result<Secret, String> {
        let key = &self.secret_key;
        let unusable = || {
            format!(
                "field `shared_data_prefix`: shared data key `{key}` cannot be stored \
                 (for ngx_wasm_module, declare the shm_kv zone named like the prefix)"
            )
        };
        for _ in 0..WRITE_ATTEMPTS {
            let (value, cas) = host.shared_get(key);
            if let Some(secret) = value.as_deref().and_then(Secret::from_bytes) {
                return Ok(secret);
            }
            let mut fresh = [0u8; cache::SECRET_LEN];
            if !host.random(&mut fresh) {
                return Err("no random source to key the token hash".into());
            }
            match host.shared_set(key, &fresh, cas) {
                // Read back on the next turn: a racing VM may have written its own.
                SetStatus::Ok | SetStatus::CasMismatch => continue,
                SetStatus::Failed => return Err(unusable()),
            }
        }
        Err(unusable())
    }

    /// The shared secret when it differs from `mine` (another VM won the race to create it, or
    /// it was evicted and re-created). An evicted secret is put back so the VMs converge.
    pub fn newer_secret<H: Host>(&self, host: &H, mine: Secret) -> Option<Secret> {
        let (value, cas) = host.shared_get(&self.secret_key);
        match value.as_deref().and_then(Secret::from_bytes) {
            Some(shared) if shared != mine => Some(mine.with_key_of(shared)),
            Some(_) => None,
            None => {
                let _ = host.shared_set(&self.secret_key, mine.as_bytes(), cas);
                None
            }
        }
    }
}
