//! nginx-wasm/matrix_sync_router.meta.json's `config_schema` is what Kong validates a filter
//! configuration against before the filter sees it. These tests hold it to the filter's own
//! configuration type, through the compiled filter: the same fields, the same JSON type of each,
//! the same integer bounds, string lengths and list sizes, and defaults that behave exactly like
//! the filter's own.

use std::error::Error;
use std::fmt::Write as _;
use std::time::Duration;

use proxy_wasm_harness::{CallFailure, Host, HostKind, LogLevel, Vm};
use serde_json::{json, Map, Value};

use crate::common::*;

fn schema() -> Value {
    let meta: Value = serde_json::from_str(include_str!(
        "../../../../nginx-wasm/matrix_sync_router.meta.json"
    ))
    .expect("meta.json is JSON");
    meta["config_schema"].clone()
}

fn properties() -> Map<String, Value> {
    schema()["properties"]
        .as_object()
        .expect("config_schema.properties is an object")
        .clone()
}

/// Configures a fresh Envoy-profile VM (cluster `synapse_whoami`, so that every filter default
/// is valid) with `config`: whether it was accepted, and every error line it logged.
fn configure(config: &Value) -> Result<(bool, Vec<String>), Box<dyn Error>> {
    let host = Host::new(profile(HostKind::Envoy));
    let mut vm = host.vm(&filter()?)?;
    vm.start(b"")?;
    let accepted = vm.configure(config.to_string().as_bytes())?;
    let errors = host
        .logs_at_least(LogLevel::Error)
        .into_iter()
        .map(|line| line.message)
        .collect();
    Ok((accepted, errors))
}

fn refused_naming(config: &Value, field: &str) -> Result<(), Box<dyn Error>> {
    refused_with(config, &format!("field `{field}`"))
}

/// Refused, with an error line containing `named`.
fn refused_with(config: &Value, named: &str) -> Result<(), Box<dyn Error>> {
    let (accepted, errors) = configure(config)?;
    if accepted || !errors.iter().any(|line| line.contains(named)) {
        return Err(format!("{config} was not refused naming {named}: {errors:?}").into());
    }
    Ok(())
}

#[test]
fn the_schema_lists_exactly_the_filter_fields() -> TestResult {
    // serde names every field it expected when it meets an unknown one.
    let (accepted, errors) = configure(&json!({"not_a_field": 1}))?;
    assert!(!accepted);
    let line = errors
        .iter()
        .find(|line| line.contains("expected one of"))
        .ok_or(format!("no serde field list in {errors:?}"))?;
    let list = &line[line.find("expected one of").unwrap()..];
    let mut expected: Vec<&str> = list.split('`').skip(1).step_by(2).collect();
    expected.sort_unstable();
    let mut listed: Vec<String> = properties().keys().cloned().collect();
    listed.sort_unstable();
    assert_eq!(listed, expected);
    assert_eq!(schema()["additionalProperties"], json!(false));
    Ok(())
}

/// A value of another JSON type than `ty`.
fn wrong_type(ty: &str) -> Value {
    match ty {
        "string" => json!(1),
        "integer" => json!("1"),
        "boolean" => json!("true"),
        "array" => json!("^/sync$"),
        other => panic!("schema type {other} not covered"),
    }
}

#[test]
fn each_field_has_the_schema_type_and_its_default_is_accepted() -> TestResult {
    for (field, spec) in properties() {
        let ty = spec["type"].as_str().ok_or(format!("{field}: no type"))?;
        let default = spec.get("default").ok_or(format!("{field}: no default"))?;
        let (accepted, errors) = configure(&json!({ field.as_str(): default }))?;
        assert!(accepted, "{field}: default {default} refused: {errors:?}");
        refused_naming(&json!({ field.as_str(): wrong_type(ty) }), &field)?;
        if ty == "integer" {
            // Fractions are not integers for the filter either.
            refused_naming(&json!({ field.as_str(): 1.5 }), &field)?;
        }
    }
    Ok(())
}

#[test]
fn integer_bounds_are_the_filter_bounds() -> TestResult {
    for (field, spec) in properties() {
        if spec["type"] != "integer" {
            continue;
        }
        let min = spec["minimum"]
            .as_i64()
            .ok_or(format!("{field}: no minimum"))?;
        let max = spec["maximum"]
            .as_i64()
            .ok_or(format!("{field}: no maximum"))?;
        for ok in [min, max] {
            let (accepted, errors) = configure(&json!({ field.as_str(): ok }))?;
            assert!(
                accepted,
                "{field}: {ok} is in the schema but refused: {errors:?}"
            );
        }
        for bad in [min - 1, max + 1] {
            refused_naming(&json!({ field.as_str(): bad }), &field)?;
        }
    }
    Ok(())
}

#[test]
fn enums_and_required_fields_are_filter_values() -> TestResult {
    let props = properties();
    for value in props["proxy"]["enum"].as_array().ok_or("proxy: no enum")? {
        // Every listed flavour is one the filter knows (ngx_wasm_module dispatches to host:port).
        let upstream = if value == "envoy" {
            ENVOY_CLUSTER
        } else {
            NGX_UPSTREAM
        };
        let (accepted, errors) = configure(&json!({"proxy": value, "whoami_upstream": upstream}))?;
        assert!(accepted, "proxy {value} refused: {errors:?}");
    }
    refused_naming(&json!({"proxy": "haproxy"}), "proxy")?;
    for field in schema()["required"]
        .as_array()
        .ok_or("config_schema.required missing")?
    {
        assert!(props.contains_key(field.as_str().unwrap_or("")), "{field}");
    }
    Ok(())
}

/// One request through the VM; the line the trace records for it.
fn step(vm: &mut Vm, out: &mut String, path: &str, token: &str) -> Result<u32, Box<dyn Error>> {
    let auth = format!("Bearer {token}");
    let stream = vm.request(&[
        (":method", "GET"),
        (":path", path),
        (":authority", "matrix.example.org"),
        (":scheme", "https"),
        ("authorization", &auth),
    ])?;
    writeln!(out, "{path} {token}: {:?}", vm.stream(stream)?)?;
    Ok(stream)
}

/// The pending whoami callout made for `token` (matched by its Authorization header: Envoy
/// callouts belong to the root context, not to the stream).
fn pending(vm: &Vm, token: &str) -> Result<u32, Box<dyn Error>> {
    let auth = format!("Bearer {token}");
    Ok(vm
        .pending_calls()
        .into_iter()
        .find(|call| call.header("authorization") == Some(auth.as_str()))
        .ok_or(format!("no callout for {token}"))?
        .token)
}

/// A Synapse-made native token (`syt_<base64 "native">_<20 letters>_<CRC-32, base62>`).
const NATIVE_TOKEN: &str = "syt_bmF0aXZl_abcdefghijklmnopqrst_3Nuo7q";
/// A MAS-shaped access token whose checksum is wrong.
const BAD_MAS_TOKEN: &str = "mat_abcdefghijklmnopqrstuvwxyz0123_zzzzzz";

/// Everything a host could observe while the filter, configured with `config`, serves a scripted
/// run: each sync path family, a room path and a non-sync path, an appservice `?user_id=`, a
/// native and a bad MAS token, two concurrent misses (one rejected, one failing), and the
/// backoff, negative-cache and refresh windows passing.
fn trace(config: &Value) -> Result<String, Box<dyn Error>> {
    let host = Host::with_seed(profile(HostKind::Envoy), 7);
    let mut vm = host.vm(&filter()?)?;
    vm.start(b"")?;
    let mut out = String::new();
    let accepted = vm.configure(config.to_string().as_bytes())?;
    writeln!(out, "accepted: {accepted}")?;
    if accepted {
        step(&mut vm, &mut out, "/_matrix/client/v3/sync", "tok-a")?;
        if let Ok(call) = pending(&vm, "tok-a") {
            vm.respond(call, 200, JSON, &whoami_body("@a:example.org"))?;
        }
        for path in [
            "/_matrix/client/r0/events",
            "/_matrix/client/v3/rooms/!r:example.org/initialSync",
            "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync",
            "/_matrix/client/v3/rooms/!r:example.org/messages",
            "/_matrix/client/v3/account/whoami",
            "/_matrix/client/v3/sync?user_id=%40bridged%3Aexample.org",
        ] {
            step(&mut vm, &mut out, path, "tok-a")?;
        }
        for token in [NATIVE_TOKEN, BAD_MAS_TOKEN] {
            step(&mut vm, &mut out, "/_matrix/client/v3/sync", token)?;
        }
        // Two misses at once: both in flight unless max_whoami_in_flight says otherwise.
        step(&mut vm, &mut out, "/_matrix/client/v3/sync", "tok-b")?;
        step(&mut vm, &mut out, "/_matrix/client/v3/sync", "tok-c")?;
        if let Ok(call) = pending(&vm, "tok-b") {
            let body = br#"{"errcode":"M_UNKNOWN_TOKEN","error":"Unknown access token"}"#;
            vm.respond(call, 401, JSON, body)?;
        }
        if let Ok(call) = pending(&vm, "tok-c") {
            vm.fail_call(call, CallFailure::Timeout)?;
        }
        for (wait_s, token) in [(12, "tok-c"), (0, "tok-b"), (20, "tok-b"), (3_300, "tok-a")] {
            host.advance(Duration::from_secs(wait_s));
            step(&mut vm, &mut out, "/_matrix/client/v3/sync", token)?;
            if let Ok(call) = pending(&vm, token) {
                vm.respond(call, 200, JSON, &whoami_body("@late:example.org"))?;
            }
        }
        // Answer whatever is still pending (e.g. an Envoy background refresh).
        for call in vm.pending_calls() {
            vm.respond(call.token, 200, JSON, &whoami_body("@late:example.org"))?;
        }
        for id in 1..=64 {
            if let Ok(state) = vm.stream(id) {
                writeln!(out, "stream {id}: {state:?}")?;
            }
        }
        writeln!(out, "calls: {:?}", vm.calls())?;
        writeln!(out, "shared: {:?}", host.shared_data())?;
        writeln!(out, "metrics: {:?}", host.metrics())?;
    }
    writeln!(out, "logs: {:?}", host.logs())?;
    Ok(out)
}

/// Per field: a value other than the default, and the fields (set on both sides) without which
/// the field has no effect. Under the Envoy profile, which knows one cluster, a different
/// `whoami_upstream`, `proxy` or ngx-only field shows as failing callouts or a refused config.
fn other_value(field: &str) -> (Value, Value) {
    let none = json!({});
    match field {
        "proxy" => (json!("ngx_wasm_module"), none),
        "whoami_upstream" => (json!("another_cluster"), none),
        "whoami_authority" => (json!("synapse.internal"), none),
        "whoami_path" => (json!("/_matrix/client/r0/account/whoami"), none),
        "whoami_timeout_ms" => (json!(1500), none),
        "header_name" => (json!("x-matrix-user"), none),
        "sync_paths" => (json!(["/_matrix/client/v3/sync"]), none),
        "cache_capacity" => (json!(4096), none),
        "cache_ttl_s" => (json!(1800), none),
        "negative_ttl_s" => (json!(5), none),
        "failure_backoff_s" => (json!(60), none),
        "reject_invalid_tokens" => (json!(true), none),
        "shared_data_prefix" => (json!("other"), none),
        "max_whoami_in_flight" => (json!(1), none),
        "nginx_variable" | "nginx_sync_kind_variable" | "nginx_room_variable" => {
            (json!("msr_key"), none)
        }
        "sync_kind_header" => (json!("x-sync-kind"), none),
        "room_header_name" => (json!("x-room"), none),
        "room_paths" => (
            json!(["/_matrix/client/v3/rooms/*/initialSync"]),
            json!({"room_header_name": "x-room"}),
        ),
        "filter_state" => (json!(true), none),
        "appservice_masquerading" => (json!(false), none),
        "native_token_server_name" => (json!("example.org"), none),
        "refuse_bad_mas_tokens" => (json!(true), none),
        // Effective only with the path-using options off; then a Bearer request to a non-sync
        // path is resolved too.
        "trust_route_match" => (json!(true), json!({"appservice_masquerading": false})),
        "fallback_key_secret" => (json!("00112233445566778899aabbccddeeff"), none),
        other => panic!("field {other} is new: give it a non-default value here"),
    }
}

fn merged(base: &Value, extra: &Value) -> Value {
    let mut out = base.clone();
    if let (Some(out), Some(extra)) = (out.as_object_mut(), extra.as_object()) {
        out.extend(extra.clone());
    }
    out
}

#[test]
fn schema_defaults_behave_exactly_like_the_filter_defaults() -> TestResult {
    let defaults = Value::Object(
        properties()
            .into_iter()
            .map(|(field, spec)| (field, spec["default"].clone()))
            .collect(),
    );
    let fields: Vec<String> = properties().keys().cloned().collect();
    let mut contexts = vec![json!({})];
    for field in &fields {
        let (_, context) = other_value(field);
        if !contexts.contains(&context) {
            contexts.push(context);
        }
    }
    for context in &contexts {
        let implicit = trace(context)?;
        assert!(
            implicit.starts_with("accepted: true"),
            "{context}: {implicit}"
        );
        let explicit = trace(&merged(&defaults, context))?;
        assert!(
            explicit == implicit,
            "with {context}, the schema's defaults behave differently from the filter's own:\n--- filter defaults\n{implicit}\n--- schema defaults\n{explicit}"
        );
    }
    // The run observes every field: changing any one of them changes the trace.
    for field in &fields {
        let (value, context) = other_value(field);
        let changed = trace(&merged(&context, &json!({ field.as_str(): value })))?;
        assert!(
            changed != trace(&context)?,
            "{field} = {value} left the trace unchanged"
        );
    }
    Ok(())
}

/// A value of exactly `len` bytes that the filter would accept for `field` if it were short
/// enough: the shape each field's grammar asks for.
fn string_of_len(field: &str, len: usize) -> String {
    let fill = |n: usize| "a".repeat(n);
    match field {
        "whoami_path" => format!("/{}", fill(len.saturating_sub(1))),
        "header_name" | "sync_kind_header" | "room_header_name" => {
            format!("x-{}", fill(len.saturating_sub(2)))
        }
        // A host name and the longest port: `host:port` is what makes the longest server name.
        "native_token_server_name" => format!("{}:65535", fill(len.saturating_sub(6))),
        _ => fill(len),
    }
}

/// Fields that only ngx_wasm_module accepts are tried with it.
fn base_for(field: &str) -> Value {
    if field.starts_with("nginx_") {
        json!({"proxy": "ngx_wasm_module", "whoami_upstream": NGX_UPSTREAM})
    } else {
        json!({})
    }
}

/// Every string has a length bound and every list a size bound in the schema, and they are the
/// filter's: the longest value is accepted, one byte (or item) more is refused naming the field.
/// (docs/configuration.md's bounds column is held to these by tests/docs.rs.)
#[test]
fn string_and_list_bounds_are_the_filter_bounds() -> TestResult {
    for (field, spec) in properties() {
        let base = base_for(&field);
        match spec["type"].as_str() {
            Some("string") if spec.get("enum").is_none() => {
                let max = spec["maxLength"]
                    .as_u64()
                    .ok_or(format!("{field}: no maxLength"))? as usize;
                let longest = merged(
                    &base,
                    &json!({ field.as_str(): string_of_len(&field, max) }),
                );
                let (accepted, errors) = configure(&longest)?;
                assert!(
                    accepted,
                    "{field}: {max} bytes are in the schema but refused: {errors:?}"
                );
                let over = string_of_len(&field, max + 1);
                refused_naming(&merged(&base, &json!({ field.as_str(): over })), &field)?;
            }
            Some("array") => {
                let max_items = spec["maxItems"]
                    .as_u64()
                    .ok_or(format!("{field}: no maxItems"))?
                    as usize;
                let max_len = spec["items"]["maxLength"]
                    .as_u64()
                    .ok_or(format!("{field}: items have no maxLength"))?
                    as usize;
                let longest = format!("/{}", "a".repeat(max_len - 1));
                let full = json!({ field.as_str(): vec![longest.clone(); max_items] });
                let (accepted, errors) = configure(&full)?;
                assert!(
                    accepted,
                    "{field}: {max_items} items of {max_len} bytes are in the schema but refused: {errors:?}"
                );
                let too_many = json!({ field.as_str(): vec!["/a"; max_items + 1] });
                refused_naming(&too_many, &field)?;
                let too_long = json!({ field.as_str(): [format!("{longest}a")] });
                // The item is named: `field `sync_paths[0]``.
                refused_with(&too_long, &format!("field `{field}["))?;
            }
            _ => {}
        }
    }
    Ok(())
}
