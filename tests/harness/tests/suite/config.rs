//! The plugin configuration: each invalid one refused with the field named in the error log; a
//! refused filter never traps and leaves traffic alone.

use proxy_wasm_harness::{Action, HarnessError, Host, HostKind, LogLevel, Profile};
use serde_json::{json, Value};

use crate::common::*;

/// (configuration fields over the profile's base, the field the error must name)
fn invalid_configs(kind: HostKind) -> Vec<(Value, &'static str)> {
    let mut cases = vec![
        (json!({"proxy": "apache"}), "proxy"),
        (json!({"proxy": 1}), "proxy"),
        (json!({"whoami_upstream": ""}), "whoami_upstream"),
        (
            json!({"whoami_upstream": "has space:80"}),
            "whoami_upstream",
        ),
        (json!({"whoami_authority": ""}), "whoami_authority"),
        (json!({"whoami_authority": "a b"}), "whoami_authority"),
        (json!({"whoami_path": "account/whoami"}), "whoami_path"),
        (json!({"whoami_path": "/who ami"}), "whoami_path"),
        (json!({"whoami_timeout_ms": 0}), "whoami_timeout_ms"),
        (json!({"whoami_timeout_ms": 60_001}), "whoami_timeout_ms"),
        (json!({"whoami_timeout_ms": "2000"}), "whoami_timeout_ms"),
        (json!({"whoami_timeout_ms": -1}), "whoami_timeout_ms"),
        (json!({"header_name": "X-User"}), "header_name"),
        (json!({"header_name": ""}), "header_name"),
        (json!({"header_name": "authorization"}), "header_name"),
        (json!({"header_name": "host"}), "header_name"),
        (json!({"sync_paths": []}), "sync_paths"),
        (json!({"sync_paths": ["("]}), "sync_paths[0]"),
        (json!({"sync_paths": "^/sync$"}), "sync_paths"),
        (json!({"cache_capacity": 0}), "cache_capacity"),
        (json!({"cache_capacity": 16_777_217}), "cache_capacity"),
        (json!({"cache_capacity": 1.5}), "cache_capacity"),
        (json!({"cache_ttl_s": 0}), "cache_ttl_s"),
        (json!({"negative_ttl_s": -1}), "negative_ttl_s"),
        (json!({"failure_backoff_s": "10"}), "failure_backoff_s"),
        (
            json!({"reject_invalid_tokens": "yes"}),
            "reject_invalid_tokens",
        ),
        (json!({"shared_data_prefix": ""}), "shared_data_prefix"),
        (json!({"shared_data_prefix": "a/b"}), "shared_data_prefix"),
        (
            json!({"shared_data_prefix": "x".repeat(65)}),
            "shared_data_prefix",
        ),
        (json!({"cache_ttl": 5}), "cache_ttl"),
    ];
    if kind == HostKind::Ngx {
        // ngx_wasm_module dispatches to host:port, not to a cluster name.
        cases.push((
            json!({"whoami_upstream": "synapse_whoami"}),
            "whoami_upstream",
        ));
        cases.push((
            json!({"whoami_upstream": "synapse:http"}),
            "whoami_upstream",
        ));
    }
    cases
}

/// A fresh host and VM configured with `bytes`: whether the filter accepted, and the host.
fn configure_once(kind: HostKind, bytes: &[u8]) -> Result<(bool, Host), HarnessError> {
    let host = Host::new(profile(kind));
    let mut vm = host.vm(&filter()?)?;
    vm.start(b"")?;
    let accepted = vm.configure(bytes)?;
    Ok((accepted, host))
}

fn merged(kind: HostKind, fields: &Value) -> Vec<u8> {
    config(kind, fields.clone())
}

#[test]
fn each_invalid_configuration_is_refused_naming_its_field() -> TestResult {
    for kind in BOTH {
        for (fields, field) in invalid_configs(kind) {
            let host = Host::new(profile(kind));
            let mut vm = host.vm(&filter()?)?;
            assert!(vm.start(b"")?, "{kind:?}");
            let accepted = vm.configure(&merged(kind, &fields))?;
            assert!(!accepted, "{kind:?}: {fields} was accepted");
            let errors = host.logs_at_least(LogLevel::Error);
            let named = format!("`{field}`");
            assert!(
                errors.iter().any(|line| line.message.contains(&named)),
                "{kind:?}: {fields}: no error log naming {named}: {errors:?}"
            );
            // A refused filter leaves traffic alone and does not trap.
            let stream = sync(&mut vm, Some("tok"))?;
            assert_eq!(vm.stream(stream)?.last_action(), Some(Action::Continue));
            assert!(vm.calls().is_empty());
        }
    }
    Ok(())
}

#[test]
fn configurations_that_are_not_a_json_object_are_refused() -> TestResult {
    for kind in BOTH {
        for bytes in [
            &b"{"[..],
            b"null",
            b"\"envoy\"",
            b"\xff\xfe",
            b"{\"proxy\":}",
        ] {
            let (accepted, host) = configure_once(kind, bytes)?;
            assert!(!accepted, "{kind:?}: {bytes:?}");
            assert!(
                !host.logs_at_least(LogLevel::Error).is_empty(),
                "{kind:?}: {bytes:?} refused silently"
            );
        }
    }
    Ok(())
}

#[test]
fn valid_configurations_are_accepted_including_none_at_all() -> TestResult {
    // Envoy with no configuration uses every default (cluster `synapse_whoami`).
    let host = Host::new(profile(HostKind::Envoy));
    let mut vm = host.vm(&filter()?)?;
    vm.start(b"")?;
    assert!(vm.configure(b"")?);
    assert!(vm.configure(b"{}")?);
    let full = json!({
        "proxy": "envoy", "whoami_upstream": "synapse_whoami", "whoami_authority": "synapse.internal",
        "whoami_path": "/_matrix/client/r0/account/whoami", "whoami_timeout_ms": 60000,
        "header_name": "x-matrix-user", "sync_paths": ["/sync"], "cache_capacity": 16777216,
        "cache_ttl_s": 1, "negative_ttl_s": 0, "failure_backoff_s": 0,
        "reject_invalid_tokens": true, "shared_data_prefix": "msr"
    });
    assert!(vm.configure(full.to_string().as_bytes())?);
    let stream = vm.request(&[
        (":method", "GET"),
        (":path", "/sync"),
        ("authorization", "Bearer t"),
    ])?;
    let call = vm.pending_calls()[0].clone();
    assert_eq!(call.header(":authority"), Some("synapse.internal"));
    assert_eq!(
        call.header(":path"),
        Some("/_matrix/client/r0/account/whoami")
    );
    assert_eq!(call.timeout_ms, 60_000);
    vm.respond(call.token, 200, JSON, &whoami_body("@o:example.org"))?;
    assert_eq!(
        vm.stream(stream)?.header("x-matrix-user").as_deref(),
        Some("@o:example.org")
    );
    Ok(())
}

#[test]
fn ngx_without_the_shm_zone_fails_at_configure() -> TestResult {
    // nginx has no `shm_kv *` and no zone named like the prefix: ngx_wasm_module traps on the
    // first shared-data access, which is the filter creating its secret in on_configure. The
    // operator sees the host's trap, naming the namespace, when nginx loads the filter.
    let host = Host::new(Profile::ngx("matrix-sync-router").without_default_zone());
    let mut vm = host.vm(&filter()?)?;
    vm.start(b"")?;
    match vm.configure(&config(HostKind::Ngx, json!({}))) {
        Err(HarnessError::Trap { message, .. }) => {
            assert!(message.contains("could not resolve namespace"), "{message}");
        }
        other => return Err(format!("expected a host trap, got {other:?}").into()),
    }
    // With the zone declared it works.
    let host = Host::new(profile(HostKind::Ngx).without_default_zone());
    host.start_vm(&filter()?, &config(HostKind::Ngx, json!({})))?;
    Ok(())
}

/// serde's derived `Deserialize` also accepts a struct as a JSON *array* of its fields in
/// declaration order (`["ngx_wasm_module", "127.0.0.1:8008"]`). docs/configuration.md promises
/// one JSON object, so an array is refused, naming `(root)`.
#[test]
fn a_json_array_is_not_a_configuration() -> TestResult {
    for bytes in [&b"[]"[..], br#"["envoy", "synapse_whoami"]"#] {
        let (accepted, _) = configure_once(HostKind::Envoy, bytes)?;
        assert!(!accepted, "{:?} accepted", String::from_utf8_lossy(bytes));
    }
    Ok(())
}

/// Bytes after the configuration object are refused: of two concatenated objects (a templating
/// slip) the second, with its invalid `cache_capacity: 0`, must not be silently dropped.
#[test]
fn bytes_after_the_configuration_object_are_refused() -> TestResult {
    for bytes in [&br#"{"proxy":"envoy"} x"#[..], br#"{}{"cache_capacity":0}"#] {
        let (accepted, _) = configure_once(HostKind::Envoy, bytes)?;
        assert!(!accepted, "{:?} accepted", String::from_utf8_lossy(bytes));
    }
    Ok(())
}
