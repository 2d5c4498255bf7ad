//! A client that sends two `Authorization` headers. What reaches the filter depends on the host
//! (`Profile::deliver`): Envoy joins them into one value, `Bearer A,Bearer B`; nginx answers 400
//! before any filter runs. Synapse answers such a joined value 401 M_MISSING_TOKEN (it splits
//! the header on spaces and wants exactly `Bearer <token>`), so the filter must not spend a
//! whoami call on it and routes it with the joined value's own fallback key.

use proxy_wasm_harness::{Action, Delivery, HostKind, Vm};
use serde_json::json;

use crate::common::*;

fn client_headers(authorizations: &[&str]) -> Vec<(String, String)> {
    let mut headers = sync_headers(None);
    for value in authorizations {
        headers.push(("Authorization".to_string(), value.to_string()));
    }
    headers
}

/// The filter's answer to what Envoy delivers for `authorizations`: the stream id.
fn through_envoy(vm: &mut Vm, authorizations: &[&str]) -> Result<u32, Box<dyn std::error::Error>> {
    let client = client_headers(authorizations);
    let Delivery::Headers(delivered) = vm.host().profile().deliver(&pairs(&client)) else {
        return Err("Envoy refused the request".into());
    };
    Ok(vm.request(&pairs(&delivered))?)
}

#[test]
fn envoy_joins_repeats_and_the_joined_value_gets_a_fallback_key_without_whoami() -> TestResult {
    let (host, mut vm) = start(HostKind::Envoy, json!({}))?;
    let client = client_headers(&["Bearer tok_a", "Bearer tok_b"]);
    let Delivery::Headers(delivered) = host.profile().deliver(&pairs(&client)) else {
        return Err("Envoy refused the request".into());
    };
    let auth: Vec<&(String, String)> = delivered
        .iter()
        .filter(|(n, _)| n == "authorization")
        .collect();
    assert_eq!(auth.len(), 1, "{delivered:?}");
    assert_eq!(auth[0].1, "Bearer tok_a,Bearer tok_b");

    let joined = through_envoy(&mut vm, &["Bearer tok_a", "Bearer tok_b"])?;
    let state = vm.stream(joined)?;
    assert_eq!(state.last_action(), Some(Action::Continue));
    assert!(vm.pending_calls().is_empty(), "whoami was asked");
    let keys = header_values(&vm, joined)?;
    assert!(keys.len() == 1 && is_fallback_key(&keys[0]), "{keys:?}");
    // The same pair again: the same key (one device stays on one worker); the same token
    // twice is refused by Synapse too, and gets a key of its own.
    let again = through_envoy(&mut vm, &["Bearer tok_a", "Bearer tok_b"])?;
    assert_eq!(header_values(&vm, again)?, keys);
    let twice = through_envoy(&mut vm, &["Bearer tok_a", "Bearer tok_a"])?;
    let twice_keys = header_values(&vm, twice)?;
    assert!(
        is_fallback_key(&twice_keys[0]) && twice_keys != keys,
        "{twice_keys:?}"
    );
    assert!(vm.pending_calls().is_empty(), "whoami was asked");
    assert_eq!(metric(&mut [&mut vm], "fallbacks"), 3);
    // One header with one of the tokens: asked of whoami as usual.
    let single = through_envoy(&mut vm, &["Bearer tok_a"])?;
    assert_eq!(vm.stream(single)?.last_action(), Some(Action::Pause));
    assert_eq!(vm.pending_calls().len(), 1);
    no_anomalies(&vm)?;
    Ok(())
}

#[test]
fn nginx_answers_repeats_400_before_the_filter_runs() -> TestResult {
    let (host, mut vm) = start(HostKind::Ngx, json!({}))?;
    for pair in [
        ["Bearer tok_a", "Bearer tok_b"],
        ["Bearer tok_a", "Bearer tok_a"],
    ] {
        let client = client_headers(&pair);
        assert_eq!(
            host.profile().deliver(&pairs(&client)),
            Delivery::Refused(400)
        );
    }
    // One header is delivered as sent, and handled.
    let client = client_headers(&["Bearer tok_a"]);
    let Delivery::Headers(delivered) = host.profile().deliver(&pairs(&client)) else {
        return Err("nginx refused a single Authorization header".into());
    };
    let stream = vm.request(&pairs(&delivered))?;
    assert_eq!(vm.stream(stream)?.last_action(), Some(Action::Pause));
    assert_eq!(metric(&mut [&mut vm], "requests"), 1);
    no_anomalies(&vm)?;
    Ok(())
}
