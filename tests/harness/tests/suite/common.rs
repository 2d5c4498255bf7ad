//! Shared set-up for the suite over the compiled matrix-sync-router filter.

use std::error::Error;
use std::path::PathBuf;
use std::sync::OnceLock;

use proxy_wasm_harness::{Action, Eviction, Filter, HarnessError, Host, HostKind, Profile, Vm};
use serde_json::{json, Value};

pub type TestResult = Result<(), Box<dyn Error>>;

pub const WHOAMI_PATH: &str = "/_matrix/client/v3/account/whoami";
pub const HEADER: &str = "x-user-identifier";
pub const SYNC_PATH: &str = "/_matrix/client/v3/sync";
/// Headers of a JSON answer from Synapse (ngx_wasm_module counts only real headers).
pub const JSON: &[(&str, &str)] = &[("content-type", "application/json"), ("server", "Synapse")];
pub const ENVOY_CLUSTER: &str = "synapse_whoami";
pub const NGX_UPSTREAM: &str = "127.0.0.1:8008";

/// Both host profiles, for tests that hold under either.
pub const BOTH: [HostKind; 2] = [HostKind::Envoy, HostKind::Ngx];

pub fn wasm_path() -> PathBuf {
    match std::env::var_os("MSR_WASM") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../target/wasm32-wasip1/release/matrix_sync_router.wasm"),
    }
}

/// The release filter, compiled once per test binary (`just build` makes it; `MSR_WASM`
/// overrides the path).
pub fn filter() -> Result<Filter, HarnessError> {
    static FILTER: OnceLock<Result<Filter, HarnessError>> = OnceLock::new();
    FILTER
        .get_or_init(|| {
            let path = wasm_path();
            Filter::from_file(&path)
                .map_err(|error| HarnessError::Load(format!("{error} (run `just build` first)")))
        })
        .clone()
}

/// The profile of a host in front of Synapse: Envoy with the whoami cluster, or nginx with the
/// `msr` shm_kv zone.
pub fn profile(kind: HostKind) -> Profile {
    match kind {
        HostKind::Envoy => Profile::envoy()
            .with_cluster(ENVOY_CLUSTER)
            .with_plugin_name("matrix-sync-router"),
        HostKind::Ngx => Profile::ngx("matrix-sync-router").with_zone("msr", None, Eviction::Lru),
    }
}

/// The plugin configuration for `kind`, with `extra` fields merged over the base.
pub fn config(kind: HostKind, extra: Value) -> Vec<u8> {
    let mut base = match kind {
        HostKind::Envoy => json!({"proxy": "envoy", "whoami_upstream": ENVOY_CLUSTER}),
        HostKind::Ngx => json!({"proxy": "ngx_wasm_module", "whoami_upstream": NGX_UPSTREAM}),
    };
    if let (Some(base), Value::Object(extra)) = (base.as_object_mut(), extra) {
        base.extend(extra);
    }
    base.to_string().into_bytes()
}

/// A host of `kind` and one started, configured VM.
pub fn start(kind: HostKind, extra: Value) -> Result<(Host, Vm), HarnessError> {
    let host = Host::new(profile(kind));
    let vm = host.start_vm(&filter()?, &config(kind, extra))?;
    Ok((host, vm))
}

/// Headers of a `/sync` request with `Authorization: Bearer <token>`.
pub fn sync_headers(token: Option<&str>) -> Vec<(String, String)> {
    let mut headers = vec![
        (":method".to_string(), "GET".to_string()),
        (":path".to_string(), format!("{SYNC_PATH}?timeout=30000")),
        (":authority".to_string(), "matrix.example.org".to_string()),
        (":scheme".to_string(), "https".to_string()),
        ("user-agent".to_string(), "Element/1.11 (test)".to_string()),
    ];
    if let Some(token) = token {
        headers.push(("authorization".to_string(), format!("Bearer {token}")));
    }
    headers
}

pub fn pairs(headers: &[(String, String)]) -> Vec<(&str, &str)> {
    headers
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect()
}

/// Sends a sync request with `token`; its stream id.
pub fn sync(vm: &mut Vm, token: Option<&str>) -> Result<u32, HarnessError> {
    vm.request(&pairs(&sync_headers(token)))
}

pub fn whoami_body(user: &str) -> Vec<u8> {
    json!({"user_id": user, "is_guest": false, "device_id": "DEVICE"})
        .to_string()
        .into_bytes()
}

/// The single pending whoami callout of `stream`.
pub fn only_call(vm: &Vm, stream: u32) -> Result<u32, Box<dyn Error>> {
    let calls: Vec<_> = vm
        .pending_calls()
        .into_iter()
        .filter(|call| call.context == stream)
        .collect();
    if calls.len() != 1 {
        return Err(
            format!("expected one pending callout of stream {stream}, got {calls:?}").into(),
        );
    }
    Ok(calls[0].token)
}

/// Sends a sync request that misses, answers whoami with `user`, and checks the header.
pub fn resolve(vm: &mut Vm, token: &str, user: &str) -> Result<u32, Box<dyn Error>> {
    let stream = sync(vm, Some(token))?;
    if vm.stream(stream)?.last_action() != Some(Action::Pause) {
        return Err(format!("request with token {token} was not paused for whoami").into());
    }
    let call = only_call(vm, stream)?;
    vm.respond(call, 200, JSON, &whoami_body(user))?;
    let state = vm.stream(stream)?;
    if !state.resumed() || state.header(HEADER).as_deref() != Some(user) {
        return Err(format!("after whoami: {state:?}").into());
    }
    Ok(stream)
}

/// Every value of the routing header on a stream.
pub fn header_values(vm: &Vm, stream: u32) -> Result<Vec<String>, HarnessError> {
    Ok(vm.stream(stream)?.request_headers.get_all(HEADER))
}

/// True for the fallback key: `~` and 16 lower-case hex digits.
pub fn is_fallback_key(value: &str) -> bool {
    value.len() == 17
        && value.starts_with('~')
        && value[1..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A metric of the filter (the profile's prefix is added by the host), after a tick of every
/// VM given: the filter counts in VM memory and flushes on its tick.
pub fn metric(vms: &mut [&mut Vm], name: &str) -> i64 {
    for vm in vms.iter_mut() {
        if vm.tick().is_err() {
            return -2;
        }
    }
    vms.first()
        .and_then(|vm| vm.host().metric(&format!("matrix_sync_router_{name}")))
        .unwrap_or(-1)
}

/// Fails when the host noticed ABI misuse.
pub fn no_anomalies(vm: &Vm) -> TestResult {
    if vm.anomalies().is_empty() {
        Ok(())
    } else {
        Err(format!("host noticed: {:?}", vm.anomalies()).into())
    }
}
