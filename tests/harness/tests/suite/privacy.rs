//! No token value ever leaves the filter except in the whoami callout's Authorization header:
//! not in log lines, metric names, shared-data keys or values, other headers, local responses,
//! or the guest's stdout/stderr.

use proxy_wasm_harness::{CallFailure, Host, Vm};
use serde_json::json;

use crate::common::*;

/// Every token below contains this; finding it anywhere it must not be is a leak.
const MARK: &str = "PRIVACYMARK";

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

fn exercise(vm: &mut Vm, label: &str) -> TestResult {
    let answers: Vec<(u16, Vec<u8>)> = vec![
        (200, whoami_body("@ok:example.org")),
        (401, br#"{"errcode":"M_UNKNOWN_TOKEN"}"#.to_vec()),
        (403, br#"{"errcode":"M_USER_LOCKED"}"#.to_vec()),
        (429, b"{}".to_vec()),
        (200, b"{\"user_id\":".to_vec()),
        (
            200,
            format!(r#"{{"user_id":"not a user {MARK}"}}"#).into_bytes(),
        ),
        (200, vec![b'x'; 5000]),
    ];
    for (index, (status, body)) in answers.iter().enumerate() {
        let token = format!("syt_{MARK}_{index}_{label}");
        let stream = sync(vm, Some(&token))?;
        let call = only_call(vm, stream)?;
        vm.respond(call, *status, JSON, body)?;
        // And once more, served from the cache.
        sync(vm, Some(&token))?;
    }
    for (index, failure) in [
        CallFailure::Connect,
        CallFailure::Timeout,
        CallFailure::Reset,
    ]
    .into_iter()
    .enumerate()
    {
        let stream = sync(vm, Some(&format!("syt_{MARK}_fail{index}_{label}")))?;
        let call = only_call(vm, stream)?;
        vm.fail_call(call, failure)?;
    }
    // From the query string, malformed, and a client leaving mid-callout.
    vm.request(&[
        (":method", "GET"),
        (
            ":path",
            &format!("{SYNC_PATH}?access_token=syt_{MARK}_query_{label}"),
        ),
    ])?;
    for call in vm.pending_calls() {
        vm.respond(call.token, 200, JSON, &whoami_body("@q:example.org"))?;
    }
    vm.request(&[
        (":method", "GET"),
        (":path", SYNC_PATH),
        ("authorization", &format!("Bearer syt {MARK} spaced")),
    ])?;
    let gone = sync(vm, Some(&format!("syt_{MARK}_gone_{label}")))?;
    vm.end_stream(gone)?;
    Ok(())
}

fn assert_no_leak(host: &Host, vms: &[&Vm]) -> TestResult {
    for line in host.logs() {
        assert!(
            !line.message.contains(MARK),
            "log line leaks a token: {line:?}"
        );
    }
    for metric in host.metrics() {
        assert!(
            !metric.name.contains(MARK),
            "metric name leaks a token: {metric:?}"
        );
    }
    for entry in host.shared_data() {
        assert!(
            !entry.key.contains(MARK) && !contains(&entry.value, MARK),
            "shared data leaks a token: {entry:?}"
        );
    }
    for vm in vms {
        assert!(!vm.stdout().contains(MARK) && !vm.stderr().contains(MARK));
        for call in vm.calls() {
            for (name, value) in &call.headers {
                if name != "authorization" {
                    assert!(
                        !value.contains(MARK),
                        "callout header {name} leaks: {value}"
                    );
                }
            }
            assert!(!contains(&call.body, MARK), "callout body leaks");
        }
        for stream in 2..200 {
            let Ok(state) = vm.stream(stream) else {
                continue;
            };
            for (name, value) in state.request_headers.pairs() {
                // The client's own credentials stay where the client put them.
                if name.eq_ignore_ascii_case(b"authorization") || name.as_slice() == b":path" {
                    continue;
                }
                assert!(
                    !contains(value, MARK),
                    "request header {} leaks a token",
                    String::from_utf8_lossy(name)
                );
            }
            if let Some(response) = &state.local_response {
                assert!(!contains(&response.body, MARK), "local response body leaks");
                for (name, value) in &response.headers {
                    assert!(!value.contains(MARK), "local response header {name} leaks");
                }
            }
        }
    }
    Ok(())
}

#[test]
fn no_token_appears_anywhere_but_the_whoami_authorization() -> TestResult {
    for kind in BOTH {
        for reject in [false, true] {
            let (host, mut vm) = start(kind, json!({"reject_invalid_tokens": reject}))?;
            let mut second = host.start_vm(
                &filter()?,
                &config(kind, json!({"reject_invalid_tokens": reject})),
            )?;
            exercise(&mut vm, "a")?;
            exercise(&mut second, "b")?;
            assert!(vm.calls().len() > 5, "{kind:?}: the scenario made callouts");
            assert_no_leak(&host, &[&vm, &second])
                .map_err(|error| format!("{kind:?} reject={reject}: {error}"))?;
        }
    }
    Ok(())
}
