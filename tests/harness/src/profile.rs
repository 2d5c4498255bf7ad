//! Host profiles: the behaviours in which Envoy and ngx_wasm_module differ.

use std::collections::{BTreeMap, BTreeSet};

/// Which host is played.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostKind {
    /// Envoy 1.40 (one VM per worker thread, V8).
    Envoy,
    /// nginx + Kong's ngx_wasm_module 0.6 (also Kong's filter chains).
    Ngx,
}

/// What an ngx_wasm_module `shm_kv` zone does when it is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Eviction {
    /// Drop the least recently used entry (nginx's default SLRU, modelled as plain LRU).
    Lru,
    /// `eviction=none`: a write that needs room fails, which traps the guest.
    None,
}

/// One ngx_wasm_module `shm_kv` zone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Zone {
    /// How many keys fit (`None`: unbounded). Real zones are sized in bytes; a key count keeps
    /// tests readable and deterministic.
    pub capacity: Option<usize>,
    /// What happens when a new key does not fit.
    pub eviction: Eviction,
}

/// What a host does with a client's request headers before any filter runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// The filter sees these headers, in order.
    Headers(Vec<(String, String)>),
    /// The host answers with this status itself; no filter runs.
    Refused(u32),
}

/// The host being played, with the knobs tests may turn.
#[derive(Clone, Debug)]
pub struct Profile {
    /// Envoy or ngx_wasm_module.
    pub kind: HostKind,
    /// Filter / plugin name: the `plugin_name` property, and in ngx_wasm_module the metric
    /// prefix `pw:<name>:`.
    pub plugin_name: String,
    /// Envoy: the cluster names `dispatch_http_call` accepts (others are `BadArgument`).
    pub clusters: BTreeSet<String>,
    /// ngx_wasm_module: `shm_kv` zones by name (`*` is the default zone).
    pub zones: BTreeMap<String, Zone>,
    /// ngx_wasm_module compares shared-data keys by CRC-32 only. Fewer bits (e.g. 8) make such
    /// collisions frequent, to test that a filter detects them. 32 is the real host.
    pub key_hash_bits: u32,
    /// ngx_wasm_module: nginx variables (`ngx.NAME` properties) that may be written.
    pub writable_ngx_vars: BTreeSet<String>,
    /// Foreign functions `proxy_call_foreign_function` knows (Envoy: `clear_route_cache`).
    pub foreign_functions: BTreeSet<String>,
    /// Envoy's answer to `proxy_get_log_level` (0 trace .. 5 critical).
    pub log_level: u32,
    /// Host-wide properties visible to every context, by dotted path.
    pub properties: BTreeMap<String, Vec<u8>>,
}

impl Profile {
    /// Envoy: names lower-cased, cluster names for callouts (none known until added with
    /// [`Profile::with_cluster`]), synthesized 503/504 on callout failure, shared data that never
    /// evicts and where `cas = 0` overwrites, `set_effective_context` honoured.
    pub fn envoy() -> Profile {
        let mut properties = BTreeMap::new();
        properties.insert("source.address".into(), b"127.0.0.1:40000".to_vec());
        properties.insert("source.port".into(), 40000i64.to_le_bytes().to_vec());
        properties.insert("plugin_name".into(), b"filter".to_vec());
        Profile {
            kind: HostKind::Envoy,
            plugin_name: "filter".into(),
            clusters: BTreeSet::new(),
            zones: BTreeMap::new(),
            key_hash_bits: 32,
            writable_ngx_vars: BTreeSet::new(),
            foreign_functions: ["clear_route_cache".to_string()].into_iter().collect(),
            log_level: 2,
            properties,
        }
    }

    /// ngx_wasm_module with one unbounded default zone `*`, filter name `name` (metric prefix
    /// `pw:<name>:`). Header names keep their case, callouts go to `host:port`, failures arrive
    /// with no headers and a `:dispatch_status`, `cas = 0` on an existing key is a CAS mismatch,
    /// shared-data keys are identified by CRC-32, host calls it does not implement trap.
    pub fn ngx(name: &str) -> Profile {
        let mut zones = BTreeMap::new();
        zones.insert(
            "*".to_string(),
            Zone {
                capacity: None,
                eviction: Eviction::Lru,
            },
        );
        let mut properties = BTreeMap::new();
        properties.insert("source.address".into(), b"127.0.0.1".to_vec());
        properties.insert("source.port".into(), b"40000".to_vec());
        properties.insert("plugin_name".into(), name.as_bytes().to_vec());
        Profile {
            kind: HostKind::Ngx,
            plugin_name: name.into(),
            clusters: BTreeSet::new(),
            zones,
            key_hash_bits: 32,
            writable_ngx_vars: BTreeSet::new(),
            foreign_functions: BTreeSet::new(),
            log_level: 2,
            properties,
        }
    }

    /// Declares an nginx variable the filter may write through `ngx.<name>` (nginx.conf's
    /// `set $<name> "";`); writing any other one traps, as ngx_wasm_module does.
    pub fn with_ngx_var(mut self, name: &str) -> Profile {
        self.writable_ngx_vars.insert(name.into());
        self
    }

    /// Sets the plugin name (and in ngx_wasm_module the metric prefix).
    pub fn with_plugin_name(mut self, name: &str) -> Profile {
        self.plugin_name = name.into();
        self.properties
            .insert("plugin_name".into(), name.as_bytes().to_vec());
        self
    }

    /// Envoy: a cluster that `dispatch_http_call` accepts.
    pub fn with_cluster(mut self, name: &str) -> Profile {
        self.clusters.insert(name.into());
        self
    }

    /// ngx_wasm_module: a `shm_kv` zone (`"*"` replaces the default one).
    pub fn with_zone(mut self, name: &str, capacity: Option<usize>, eviction: Eviction) -> Profile {
        self.zones.insert(name.into(), Zone { capacity, eviction });
        self
    }

    /// ngx_wasm_module: no default zone `*` (keys outside a named zone then trap, as in nginx).
    pub fn without_default_zone(mut self) -> Profile {
        self.zones.remove("*");
        self
    }

    /// ngx_wasm_module: compare keys by only the low `bits` bits of their CRC-32.
    pub fn with_key_hash_bits(mut self, bits: u32) -> Profile {
        self.key_hash_bits = bits.clamp(1, 32);
        self
    }

    /// A host-wide property (e.g. `source.address`).
    pub fn with_property(mut self, path: &str, value: &[u8]) -> Profile {
        self.properties.insert(path.into(), value.to_vec());
        self
    }

    /// The request headers a filter gets when a client sends `client`, for the repeated
    /// headers whose handling matters to the filter. Envoy 1.40 joins repeated `Authorization`
    /// headers into one value separated by `,` (`Bearer A,Bearer B`; checked on the real host by
    /// tests/e2e). nginx 1.27 answers 400 ("client sent duplicate header line") to a second
    /// `Authorization` or `Host` line before any filter runs (its unique request headers; the
    /// Authorization case checked on a real nginx + ngx_wasm_module build). Other headers are
    /// delivered as sent.
    pub fn deliver(&self, client: &[(&str, &str)]) -> Delivery {
        let count = |name: &str| {
            client
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                .count()
        };
        match self.kind {
            HostKind::Ngx => {
                if count("authorization") > 1 || count("host") > 1 {
                    return Delivery::Refused(400);
                }
                Delivery::Headers(
                    client
                        .iter()
                        .map(|(n, v)| (n.to_string(), v.to_string()))
                        .collect(),
                )
            }
            HostKind::Envoy => {
                let mut out: Vec<(String, String)> = Vec::new();
                for (name, value) in client {
                    let name = name.to_ascii_lowercase();
                    match out.iter_mut().find(|(n, _)| *n == name) {
                        Some((_, joined)) if name == "authorization" => {
                            joined.push(',');
                            joined.push_str(value);
                        }
                        _ => out.push((name, value.to_string())),
                    }
                }
                Delivery::Headers(out)
            }
        }
    }

    /// Metric name as the host shows it (ngx_wasm_module prefixes `pw:<filter>:`).
    pub fn metric_name(&self, name: &str) -> String {
        match self.kind {
            HostKind::Envoy => name.to_string(),
            HostKind::Ngx => format!("pw:{}:{}", self.plugin_name, name),
        }
    }
}
