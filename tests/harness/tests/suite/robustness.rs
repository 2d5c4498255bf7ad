//! No input makes the module trap: seeded random requests, callout answers, failures, clock
//! jumps, disconnects and configurations, bounded in count. Every guest call must succeed, every
//! stream must end up forwarded (or answered at the edge), with at most one routing header that
//! is a fallback key or the user whoami gave for a token that request carried.

use std::collections::HashMap;
use std::time::Duration;

use proxy_wasm_harness::{CallFailure, Host, HostKind, Rng, Vm};
use serde_json::json;

use crate::common::*;

const STEPS: u64 = 400;

/// Binary-safe request headers, in order.
type Headers = Vec<(Vec<u8>, Vec<u8>)>;

fn user_of(token: &[u8]) -> String {
    // FNV-1a: a per-token user whoami always gives for that token.
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for &byte in token {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("@u{hash:016x}:example.org")
}

fn random_bytes(rng: &mut Rng, len: usize, high: bool) -> Vec<u8> {
    (0..len)
        .map(|_| {
            let byte = if high {
                (rng.below(224) + 32) as u8
            } else {
                (rng.below(94) + 33) as u8
            };
            // A proxy never hands a filter CR, LF or NUL inside a header value.
            if byte == 0x7f {
                b'~'
            } else {
                byte
            }
        })
        .collect()
}

fn percent_encode(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| {
            if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn percent_decode(bytes: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' && index + 2 < bytes.len() {
            if let (Some(high), Some(low)) = (hex(bytes[index + 1]), hex(bytes[index + 2])) {
                out.push((high * 16 + low) as u8);
                index += 3;
                continue;
            }
        }
        out.push(bytes[index]);
        index += 1;
    }
    out
}

fn token(rng: &mut Rng, pool: &[Vec<u8>]) -> Vec<u8> {
    let choice = rng.below(6);
    let spread = rng.below(200) as usize;
    match choice {
        0..=2 => rng.pick(pool).clone(),
        3 => random_bytes(rng, 1 + spread % 80, false),
        4 => random_bytes(rng, 1 + spread % 40, true),
        _ => random_bytes(rng, 4000 + spread, false),
    }
}

/// Random request headers, and whether the filter handles the request (a sync path).
fn random_request(rng: &mut Rng, pool: &[Vec<u8>]) -> (Headers, bool) {
    let paths = [
        "/_matrix/client/v3/sync",
        "/_matrix/client/r0/sync",
        "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync",
        "/_matrix/client/v3/rooms/!x:y/initialSync",
        "/_matrix/client/v3/events",
        "/_matrix/client/v3/rooms/!x:y/messages",
        "/",
    ];
    let path_index = rng.below(paths.len() as u64) as usize;
    let mut path = paths[path_index].as_bytes().to_vec();
    let suffix = rng.below(6);
    let mut handled = path_index < 5 && suffix != 5;
    match suffix {
        0 => {}
        1 => {
            path.extend_from_slice(b"?access_token=");
            path.extend_from_slice(percent_encode(&token(rng, pool)).as_bytes());
        }
        2 => {
            path.extend_from_slice(b"?since=s1&access_token=");
            path.extend_from_slice(&token(rng, pool));
            path.extend_from_slice(b"&access_token=second");
        }
        3 => {
            path.push(b'?');
            let len = rng.below(300) as usize;
            path.extend(random_bytes(rng, len, true));
        }
        4 => path.extend_from_slice(b"?access_token=%zz%f&access_token"),
        _ => {
            path.push(b'/');
            let len = rng.below(9000) as usize;
            path.extend(random_bytes(rng, len, false));
        }
    }
    let mut headers: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    if rng.chance(1, 30) {
        handled = false;
    } else {
        headers.push((b":path".to_vec(), path));
    }
    headers.push((b":method".to_vec(), b"GET".to_vec()));
    headers.push((b":authority".to_vec(), b"matrix.example.org".to_vec()));
    let authorizations = rng.below(8);
    for _ in 0..(if authorizations == 7 { 2 } else { 1 }) {
        let value = match authorizations {
            0 => continue,
            1..=3 => [b"Bearer ".to_vec(), token(rng, pool)].concat(),
            4 => [b"bearer ".to_vec(), token(rng, pool)].concat(),
            5 => rng
                .pick(&[
                    &b"Bearer"[..],
                    b"Bearer ",
                    b"Basic dXNlcjpwYXNz",
                    b"Bearer  x y",
                    b"",
                ])
                .to_vec(),
            _ => [
                rng.pick(&[&b"BEARER "[..], b"Bearer\t", b"Token "])
                    .to_vec(),
                token(rng, pool),
            ]
            .concat(),
        };
        let name = rng
            .pick(&[&b"authorization"[..], b"Authorization", b"AUTHORIZATION"])
            .to_vec();
        headers.push((name, value));
    }
    for _ in 0..rng.below(4) {
        let name = rng
            .pick(&[
                &b"x-user-identifier"[..],
                b"X-User-Identifier",
                b"x-USER-identifier",
            ])
            .to_vec();
        let len = rng.below(40) as usize;
        headers.push((name, random_bytes(rng, len, true)));
    }
    for name in [&b"user-agent"[..], b"x-forwarded-for"] {
        if rng.chance(2, 3) {
            let len = rng.below(200) as usize;
            headers.push((name.to_vec(), random_bytes(rng, len, true)));
        }
    }
    for _ in 0..rng.below(12) {
        let name_len = 1 + rng.below(20) as usize;
        let name: Vec<u8> = random_bytes(rng, name_len, false)
            .into_iter()
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    b.to_ascii_lowercase()
                } else {
                    b'-'
                }
            })
            .collect();
        let len = rng.below(100) as usize;
        headers.push((name, random_bytes(rng, len, true)));
    }
    (headers, handled)
}

fn random_answer(
    rng: &mut Rng,
    vm: &mut Vm,
    token: u32,
    user: &str,
) -> Result<(), proxy_wasm_harness::HarnessError> {
    if rng.chance(1, 6) {
        let failure = *rng.pick(&[
            CallFailure::Connect,
            CallFailure::Timeout,
            CallFailure::Reset,
            CallFailure::Resolver,
        ]);
        return vm.fail_call(token, failure);
    }
    let status = *rng.pick(&[
        200u16, 200, 200, 200, 401, 403, 429, 500, 503, 204, 301, 999,
    ]);
    let body: Vec<u8> = match rng.below(9) {
        0..=3 => whoami_body(user),
        4 => json!({"user_id": format!("{user}x y")})
            .to_string()
            .into_bytes(),
        5 => {
            let len = rng.below(6000) as usize;
            random_bytes(rng, len, true)
        }
        6 => whoami_body(user)[..rng.below(20) as usize].to_vec(),
        7 => format!("{}{}", "{\"a\":".repeat(rng.below(400) as usize), "1").into_bytes(),
        _ => Vec::new(),
    };
    let headers: &[(&str, &str)] = if rng.chance(1, 8) { &[] } else { JSON };
    vm.respond(token, status, headers, &body)
}

/// The tokens a request carries anywhere (raw and percent-decoded).
fn carries(request: &[(Vec<u8>, Vec<u8>)], token: &[u8]) -> bool {
    request.iter().any(|(name, value)| {
        let haystack = if name.as_slice() == b":path" {
            percent_decode(value)
        } else {
            value.clone()
        };
        haystack
            .windows(token.len().max(1))
            .any(|window| window == token)
    })
}

fn check_stream(
    vm: &Vm,
    stream: u32,
    (request, handled): &(Headers, bool),
    users: &HashMap<String, Vec<u8>>,
) -> TestResult {
    let state = vm.stream(stream)?;
    if state.paused {
        let text: Vec<(String, String)> = request
            .iter()
            .map(|(k, v)| {
                (
                    String::from_utf8_lossy(k).into(),
                    String::from_utf8_lossy(v).into(),
                )
            })
            .collect();
        return Err(format!(
            "stream {stream} still paused: {text:?}; actions {:?}; calls {:?}",
            state.actions,
            vm.calls()
                .iter()
                .map(|c| (c.token, c.context, c.owner, c.outcome))
                .collect::<Vec<_>>()
        )
        .into());
    }
    if state.local_response.is_some() {
        // Answered at the edge (reject_invalid_tokens): nothing is routed.
        return Ok(());
    }
    let values = state.request_headers.get_all(HEADER);
    if !handled {
        // Not a sync request: the filter leaves the client's headers alone.
        let sent: Vec<String> = request
            .iter()
            .filter(|(name, _)| name.eq_ignore_ascii_case(HEADER.as_bytes()))
            .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
            .collect();
        if values != sent {
            return Err(
                format!("stream {stream} (not handled) changed {sent:?} to {values:?}").into(),
            );
        }
        return Ok(());
    }
    match values.as_slice() {
        [] => {}
        [value] if is_fallback_key(value) => {}
        [value] => match users.get(value) {
            Some(token) if carries(request, token) => {}
            _ => return Err(format!("stream {stream} routed as {value:?} for {request:?}").into()),
        },
        more => {
            return Err(format!(
                "stream {stream} has {} routing headers: {more:?}",
                more.len()
            )
            .into())
        }
    }
    Ok(())
}

fn run(kind: HostKind, seed: u64, extra: serde_json::Value) -> TestResult {
    let host = Host::with_seed(profile(kind), seed);
    let mut vms = vec![
        host.start_vm(&filter()?, &config(kind, extra.clone()))?,
        host.start_vm(&filter()?, &config(kind, extra))?,
    ];
    let mut rng = Rng::new(seed);
    let pool: Vec<Vec<u8>> = (0..12)
        .map(|i| format!("syt_pool_{i}_{seed}").into_bytes())
        .collect();
    let mut users: HashMap<String, Vec<u8>> = HashMap::new();
    let mut requests: Vec<(usize, u32, (Headers, bool))> = Vec::new();
    for _ in 0..STEPS {
        let which = rng.below(2) as usize;
        let vm = &mut vms[which];
        match rng.below(10) {
            0..=4 => {
                let request = random_request(&mut rng, &pool);
                let stream = vm.create_stream()?;
                vm.request_headers_bytes(stream, &request.0, rng.chance(3, 4))?;
                if rng.chance(1, 10) {
                    vm.request_body(stream, b"{}", true)?;
                }
                requests.push((which, stream, request));
            }
            5..=7 => {
                let pending = vm.pending_calls();
                if !pending.is_empty() {
                    let call = rng.pick(&pending).clone();
                    let token = call
                        .header("authorization")
                        .and_then(|value| value.strip_prefix("Bearer "))
                        .ok_or_else(|| format!("callout without a Bearer token: {call:?}"))?
                        .as_bytes()
                        .to_vec();
                    let user = user_of(&token);
                    users.insert(user.clone(), token);
                    random_answer(&mut rng, vm, call.token, &user)?;
                }
            }
            8 => host.advance(Duration::from_millis(rng.below(90_000))),
            _ => {
                if !requests.is_empty() {
                    let (owner, stream, _) =
                        requests.swap_remove(rng.below(requests.len() as u64) as usize);
                    vms[owner].end_stream(stream)?;
                }
            }
        }
    }
    // Answer everything still waiting, then check every stream that is still open.
    for vm in vms.iter_mut() {
        for call in vm.pending_calls() {
            let token = call
                .header("authorization")
                .unwrap_or_default()
                .trim_start_matches("Bearer ")
                .as_bytes()
                .to_vec();
            let user = user_of(&token);
            users.insert(user.clone(), token);
            vm.respond(call.token, 200, JSON, &whoami_body(&user))?;
        }
    }
    // A host keeps ticking: requests waiting for another VM's answer read it on the next tick.
    host.advance(Duration::from_secs(1));
    for vm in vms.iter_mut() {
        vm.tick()?;
    }
    for (owner, stream, request) in &requests {
        check_stream(&vms[*owner], *stream, request, &users)
            .map_err(|error| format!("{kind:?} seed {seed}: {error}"))?;
    }
    for vm in &vms {
        no_anomalies(vm)?;
    }
    Ok(())
}

#[test]
fn random_traffic_never_traps_and_never_misroutes() -> TestResult {
    let configs = [
        json!({}),
        json!({"reject_invalid_tokens": true, "cache_capacity": 7, "negative_ttl_s": 0}),
        json!({"failure_backoff_s": 0, "cache_capacity": 1, "cache_ttl_s": 1}),
    ];
    for kind in BOTH {
        for (index, extra) in configs.iter().enumerate() {
            run(kind, 1000 + index as u64, extra.clone())?;
        }
    }
    Ok(())
}

/// Every configuration field, from nginx-wasm/matrix_sync_router.meta.json's schema (which
/// kong_schema.rs holds to the filter's own field list), so a new field is fuzzed too; and the
/// values the schema names for each (default, bounds, one past them, enum members).
fn schema_fields_and_values() -> (Vec<String>, Vec<serde_json::Value>) {
    let meta: serde_json::Value = serde_json::from_str(include_str!(
        "../../../../nginx-wasm/matrix_sync_router.meta.json"
    ))
    .expect("meta.json is JSON");
    let properties = meta["config_schema"]["properties"]
        .as_object()
        .expect("config_schema.properties is an object")
        .clone();
    let mut values = Vec::new();
    for property in properties.values() {
        for key in ["default", "minimum", "maximum"] {
            values.extend(property.get(key).cloned());
        }
        if let Some(max) = property.get("maximum").and_then(|m| m.as_u64()) {
            values.push(json!(max + 1));
        }
        values.extend(property["enum"].as_array().into_iter().flatten().cloned());
    }
    let mut fields: Vec<String> = properties.keys().cloned().collect();
    fields.push("unknown".into());
    (fields, values)
}

#[test]
fn random_configurations_never_trap() -> TestResult {
    let (fields, mut values) = schema_fields_and_values();
    assert!(fields.len() > 20, "{fields:?}");
    values.extend([
        json!(null),
        json!(true),
        json!(0),
        json!(-1),
        json!(4_294_967_296u64),
        json!(1.5),
        json!(""),
        json!("x".repeat(10_000)),
        json!([]),
        json!(["(a+)+$", "[", "\\"]),
        json!({"a": 1}),
        json!("a{1000}{1000}"),
        json!("\u{0}"),
        json!("msr_var"),
        json!("x-header"),
        json!("example.org"),
        json!(16_777_216),
        json!(60_000),
    ]);
    for kind in BOTH {
        let mut rng = Rng::new(kind as u64 + 77);
        let host = Host::new(profile(kind));
        let mut vm = host.vm(&filter()?)?;
        vm.start(b"")?;
        for _ in 0..200 {
            let mut object = serde_json::Map::new();
            for _ in 0..rng.below(6) {
                object.insert(rng.pick(&fields).to_string(), rng.pick(&values).clone());
            }
            let mut bytes = serde_json::Value::Object(object).to_string().into_bytes();
            if rng.chance(1, 5) {
                let cut = rng.below(bytes.len() as u64 + 1) as usize;
                bytes.truncate(cut);
                let len = rng.below(20) as usize;
                bytes.extend(random_bytes(&mut rng, len, true));
            }
            vm.configure(&bytes).map_err(|error| {
                format!(
                    "{kind:?} config {}: {error}",
                    String::from_utf8_lossy(&bytes)
                )
            })?;
            let stream = sync(&mut vm, Some("tok"))?;
            for call in vm.pending_calls() {
                vm.respond(call.token, 200, JSON, &whoami_body("@p:example.org"))?;
            }
            vm.end_stream(stream)?;
        }
    }
    Ok(())
}
