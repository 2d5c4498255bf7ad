//! The process-wide shared-data store, with each host's semantics.

use std::collections::{BTreeMap, HashMap};

use crate::profile::{Eviction, HostKind, Profile, Zone};
use crate::util::{crc32, text};

/// One stored key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedEntry {
    /// The key as the last writer spelled it (ngx_wasm_module identifies keys by CRC-32, so a
    /// colliding key overwrites this entry and its spelling).
    pub key: String,
    /// The stored value.
    pub value: Vec<u8>,
    /// The CAS the host hands out for this entry.
    pub cas: u32,
}

/// Counters a test can assert on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SharedStats {
    /// Guest `get_shared_data` calls.
    pub gets: u64,
    /// Guest `set_shared_data` calls (writes and deletes), including refused ones.
    pub sets: u64,
    /// Guest writes refused with `CasMismatch`.
    pub cas_mismatches: u64,
    /// Entries dropped to make room (ngx_wasm_module zones only).
    pub evictions: u64,
    /// The most keys ever held at once.
    pub max_keys: usize,
}

#[derive(Clone, Debug)]
struct Stored {
    entry: SharedEntry,
    used: u64,
}

#[derive(Clone, Debug)]
struct ZoneStore {
    config: Zone,
    entries: HashMap<u32, Stored>,
    lru: BTreeMap<u64, u32>,
}

/// The shared-data store of one host process (shared by every VM of it).
#[derive(Clone, Debug)]
pub struct SharedData {
    kind: HostKind,
    envoy: HashMap<Vec<u8>, Stored>,
    next_cas: u32,
    zones: BTreeMap<String, ZoneStore>,
    key_bits: u32,
    tick: u64,
    stats: SharedStats,
}

/// What a guest write asked for; handed to interference hooks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetAttempt {
    /// Index of the VM that writes.
    pub vm: usize,
    /// The key (lossy text).
    pub key: String,
    /// The value (`None`: a delete, i.e. a null value pointer).
    pub value: Option<Vec<u8>>,
    /// The CAS passed (0 = none).
    pub cas: u32,
}

impl SharedData {
    /// An empty store for a profile.
    pub fn new(profile: &Profile) -> SharedData {
        let zones = profile
            .zones
            .iter()
            .map(|(name, config)| {
                (
                    name.clone(),
                    ZoneStore {
                        config: *config,
                        entries: HashMap::new(),
                        lru: BTreeMap::new(),
                    },
                )
            })
            .collect();
        SharedData {
            kind: profile.kind,
            envoy: HashMap::new(),
            next_cas: 0,
            zones,
            key_bits: profile.key_hash_bits,
            tick: 0,
            stats: SharedStats::default(),
        }
    }

    fn key_id(&self, key: &[u8]) -> u32 {
        let crc = crc32(key);
        if self.key_bits >= 32 {
            crc
        } else {
            crc & ((1u32 << self.key_bits) - 1)
        }
    }

    /// ngx_wasm_module: `zone/key` goes to `zone` if it exists, everything else to `*`.
    fn zone_name(&self, key: &[u8]) -> Option<String> {
        if let Some(slash) = key.iter().position(|&byte| byte == b'/') {
            let zone = text(&key[..slash]);
            if slash > 0 && self.zones.contains_key(&zone) {
                return Some(zone);
            }
        }
        self.zones.contains_key("*").then(|| "*".to_string())
    }

    fn next_envoy_cas(&mut self) -> u32 {
        self.next_cas = self.next_cas.wrapping_add(1);
        if self.next_cas == 0 {
            self.next_cas = 1;
        }
        self.next_cas
    }

    fn touch(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// The guest's `get_shared_data`: `Ok(None)` is NotFound; `Err` is a host trap.
    pub fn guest_get(&mut self, key: &[u8]) -> Result<Option<(Vec<u8>, u32)>, String> {
        self.stats.gets += 1;
        match self.kind {
            HostKind::Envoy => Ok(self
                .envoy
                .get(key)
                .map(|stored| (stored.entry.value.clone(), stored.entry.cas))),
            HostKind::Ngx => {
                let zone_name = self.zone_name(key).ok_or_else(|| {
                    "failed getting value from shm (could not resolve namespace)".to_string()
                })?;
                let id = self.key_id(key);
                let now = self.touch();
                let Some(zone) = self.zones.get_mut(&zone_name) else {
                    return Err("failed getting value from shm (no zone)".into());
                };
                let Some(stored) = zone.entries.get_mut(&id) else {
                    return Ok(None);
                };
                zone.lru.remove(&stored.used);
                stored.used = now;
                zone.lru.insert(now, id);
                Ok(Some((stored.entry.value.clone(), stored.entry.cas)))
            }
        }
    }

    /// The guest's `set_shared_data`: `Ok(true)` written, `Ok(false)` CAS mismatch, `Err` trap.
    pub fn guest_set(
        &mut self,
        key: &[u8],
        value: Option<&[u8]>,
        cas: u32,
    ) -> Result<bool, String> {
        self.stats.sets += 1;
        let written = match self.kind {
            HostKind::Envoy => {
                // Envoy: a null value is an empty value; cas 0 always overwrites.
                let value = value.unwrap_or_default().to_vec();
                let current = self.envoy.get(key).map(|stored| stored.entry.cas);
                if cas != 0 && current.is_some_and(|current| current != cas) {
                    false
                } else {
                    let new_cas = self.next_envoy_cas();
                    self.envoy.insert(
                        key.to_vec(),
                        Stored {
                            entry: SharedEntry {
                                key: text(key),
                                value,
                                cas: new_cas,
                            },
                            used: 0,
                        },
                    );
                    true
                }
            }
            HostKind::Ngx => self.ngx_set(key, value, cas)?,
        };
        if !written {
            self.stats.cas_mismatches += 1;
        }
        let keys = self.len();
        if keys > self.stats.max_keys {
            self.stats.max_keys = keys;
        }
        Ok(written)
    }

    fn ngx_set(&mut self, key: &[u8], value: Option<&[u8]>, cas: u32) -> Result<bool, String> {
        let zone_name = self.zone_name(key).ok_or_else(|| {
            "failed setting value to shm (could not resolve namespace)".to_string()
        })?;
        let id = self.key_id(key);
        let now = self.touch();
        let mut evicted = 0;
        let Some(zone) = self.zones.get_mut(&zone_name) else {
            return Err("failed setting value to shm (no zone)".into());
        };
        let current = zone.entries.get(&id).map(|stored| stored.entry.cas);
        if cas != current.unwrap_or(0) {
            return Ok(false);
        }
        let Some(value) = value else {
            // Null value pointer: delete (a delete of a missing key is "not written").
            return Ok(match zone.entries.remove(&id) {
                Some(stored) => {
                    zone.lru.remove(&stored.used);
                    true
                }
                None => false,
            });
        };
        if let Some(stored) = zone.entries.get_mut(&id) {
            zone.lru.remove(&stored.used);
            stored.used = now;
            stored.entry.key = text(key);
            stored.entry.value = value.to_vec();
            stored.entry.cas = stored.entry.cas.wrapping_add(1);
            zone.lru.insert(now, id);
            return Ok(true);
        }
        if let Some(capacity) = zone.config.capacity {
            while zone.entries.len() >= capacity {
                match zone.config.eviction {
                    Eviction::None => {
                        return Err("failed setting value to shm (could not write to slab)".into())
                    }
                    Eviction::Lru => {
                        let Some((&oldest, &victim)) = zone.lru.iter().next() else {
                            return Err(
                                "failed setting value to shm (could not write to slab)".into()
                            );
                        };
                        zone.lru.remove(&oldest);
                        zone.entries.remove(&victim);
                        evicted += 1;
                    }
                }
            }
        }
        zone.entries.insert(
            id,
            Stored {
                entry: SharedEntry {
                    key: text(key),
                    value: value.to_vec(),
                    cas: 1,
                },
                used: now,
            },
        );
        zone.lru.insert(now, id);
        self.stats.evictions += evicted;
        Ok(true)
    }

    /// Every entry, sorted by key (ngx_wasm_module: over every zone).
    pub fn entries(&self) -> Vec<SharedEntry> {
        let mut all: Vec<SharedEntry> = match self.kind {
            HostKind::Envoy => self.envoy.values().map(|s| s.entry.clone()).collect(),
            HostKind::Ngx => self
                .zones
                .values()
                .flat_map(|zone| zone.entries.values().map(|s| s.entry.clone()))
                .collect(),
        };
        all.sort_by(|a, b| a.key.cmp(&b.key));
        all
    }

    /// Number of keys held.
    pub fn len(&self) -> usize {
        match self.kind {
            HostKind::Envoy => self.envoy.len(),
            HostKind::Ngx => self.zones.values().map(|zone| zone.entries.len()).sum(),
        }
    }

    /// True when no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The entry a guest `get` of `key` would see (without touching LRU order or counters).
    pub fn peek(&self, key: &str) -> Option<SharedEntry> {
        match self.kind {
            HostKind::Envoy => self.envoy.get(key.as_bytes()).map(|s| s.entry.clone()),
            HostKind::Ngx => {
                let zone = self.zones.get(&self.zone_name(key.as_bytes())?)?;
                zone.entries
                    .get(&self.key_id(key.as_bytes()))
                    .map(|s| s.entry.clone())
            }
        }
    }

    /// Writes as another process would (ignores CAS, bumps it). Fails only where a guest write
    /// would trap (ngx_wasm_module: no zone for the key, or a full zone without eviction).
    pub fn put(&mut self, key: &str, value: &[u8]) -> Result<(), String> {
        let cas = self.peek(key).map_or(0, |entry| entry.cas);
        let sets = self.stats.sets;
        let result = match self.kind {
            HostKind::Envoy => self.guest_set(key.as_bytes(), Some(value), 0).map(|_| ()),
            HostKind::Ngx => self.ngx_set(key.as_bytes(), Some(value), cas).map(|_| ()),
        };
        self.stats.sets = sets;
        result
    }

    /// Drops a key as another process would.
    pub fn delete(&mut self, key: &str) {
        match self.kind {
            HostKind::Envoy => {
                self.envoy.remove(key.as_bytes());
            }
            HostKind::Ngx => {
                let id = self.key_id(key.as_bytes());
                if let Some(zone_name) = self.zone_name(key.as_bytes()) {
                    if let Some(zone) = self.zones.get_mut(&zone_name) {
                        if let Some(stored) = zone.entries.remove(&id) {
                            zone.lru.remove(&stored.used);
                        }
                    }
                }
            }
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> SharedStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envoy_cas_zero_overwrites_and_stale_cas_is_refused() {
        let mut store = SharedData::new(&Profile::envoy());
        assert_eq!(store.guest_set(b"k", Some(b"1"), 0), Ok(true));
        assert_eq!(store.guest_set(b"k", Some(b"2"), 0), Ok(true));
        let (value, cas) = store.guest_get(b"k").ok().flatten().unwrap_or_default();
        assert_eq!(value, b"2");
        assert_eq!(store.guest_set(b"k", Some(b"3"), cas + 7), Ok(false));
        assert_eq!(store.guest_set(b"k", Some(b"3"), cas), Ok(true));
        // A null value is an empty value in Envoy, not a delete.
        assert_eq!(store.guest_set(b"k", None, 0), Ok(true));
        assert_eq!(store.peek("k").map(|e| e.value), Some(Vec::new()));
    }

    #[test]
    fn ngx_cas_zero_on_existing_key_is_a_mismatch_and_null_deletes() {
        let mut store = SharedData::new(&Profile::ngx("f"));
        assert_eq!(store.guest_set(b"k", Some(b"1"), 0), Ok(true));
        assert_eq!(store.guest_set(b"k", Some(b"2"), 0), Ok(false));
        assert_eq!(store.guest_set(b"missing", Some(b"2"), 5), Ok(false));
        let cas = store.peek("k").map_or(0, |e| e.cas);
        assert_eq!(store.guest_set(b"k", Some(b"2"), cas), Ok(true));
        let cas = store.peek("k").map_or(0, |e| e.cas);
        assert_eq!(store.guest_set(b"k", None, cas), Ok(true));
        assert!(store.is_empty());
        assert_eq!(store.guest_set(b"k", None, 0), Ok(false));
    }

    #[test]
    fn ngx_keys_collide_by_hash_and_zones_evict_lru() {
        let profile =
            Profile::ngx("f")
                .with_key_hash_bits(1)
                .with_zone("z", Some(2), Eviction::Lru);
        let mut store = SharedData::new(&profile);
        // With one bit of identity there are two distinct keys per zone at most.
        let mut ids = HashMap::new();
        for index in 0..8 {
            let key = format!("z/{index}");
            ids.entry(store.key_id(key.as_bytes())).or_insert(key);
        }
        assert_eq!(ids.len(), 2);
        let keys: Vec<String> = ids.into_values().collect();
        assert_eq!(store.guest_set(keys[0].as_bytes(), Some(b"a"), 0), Ok(true));
        // Any other key with the same hash bit reads the first key's value.
        let colliding = (0..64)
            .map(|index| format!("z/x{index}"))
            .find(|key| store.key_id(key.as_bytes()) == store.key_id(keys[0].as_bytes()))
            .unwrap_or_default();
        assert_eq!(
            store.guest_get(colliding.as_bytes()),
            Ok(Some((b"a".to_vec(), 1)))
        );
        let capped = Profile::ngx("f").with_zone("z", Some(2), Eviction::Lru);
        let mut store = SharedData::new(&capped);
        for key in ["z/a", "z/b"] {
            assert_eq!(store.guest_set(key.as_bytes(), Some(b"v"), 0), Ok(true));
        }
        // Touch z/a so that z/b is the least recently used.
        assert!(store.guest_get(b"z/a").ok().flatten().is_some());
        assert_eq!(store.guest_set(b"z/c", Some(b"v"), 0), Ok(true));
        assert_eq!(store.len(), 2);
        assert!(store.peek("z/b").is_none());
        assert_eq!(store.stats().evictions, 1);
        let full = Profile::ngx("f").with_zone("z", Some(1), Eviction::None);
        let mut store = SharedData::new(&full);
        assert_eq!(store.guest_set(b"z/a", Some(b"v"), 0), Ok(true));
        assert!(store.guest_set(b"z/b", Some(b"v"), 0).is_err());
        let no_default = Profile::ngx("f").without_default_zone();
        let mut store = SharedData::new(&no_default);
        assert!(store.guest_get(b"k").is_err());
    }
}
