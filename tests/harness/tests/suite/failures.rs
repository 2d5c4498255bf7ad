//! Everything whoami can answer besides a user: host failure forms, bad bodies, bad statuses.
//! The filter never fails a request: it resumes with the fallback key and backs off.

use proxy_wasm_harness::{CallFailure, HostKind, LogLevel, Vm};
use serde_json::json;

use crate::common::*;

/// Sends a sync request with `token`, lets `answer` settle the callout, and checks that the
/// request resumed with a fallback key; returns that key.
fn fails_open(
    vm: &mut Vm,
    token: &str,
    answer: impl FnOnce(&mut Vm, u32) -> Result<(), proxy_wasm_harness::HarnessError>,
) -> Result<String, Box<dyn std::error::Error>> {
    let stream = sync(vm, Some(token))?;
    let call = only_call(vm, stream)?;
    answer(vm, call)?;
    let state = vm.stream(stream)?;
    if !state.resumed() || state.local_response.is_some() {
        return Err(format!("{token}: not resumed: {state:?}").into());
    }
    let values = header_values(vm, stream)?;
    match values.as_slice() {
        [key] if is_fallback_key(key) => Ok(key.clone()),
        other => Err(format!("{token}: expected one fallback key, got {other:?}").into()),
    }
}

#[test]
fn host_failure_forms_of_each_profile_fail_open() -> TestResult {
    let failures = [
        CallFailure::Connect,
        CallFailure::Timeout,
        CallFailure::Reset,
        CallFailure::Resolver,
    ];
    for kind in BOTH {
        let (_host, mut vm) = start(kind, json!({}))?;
        for (index, failure) in failures.into_iter().enumerate() {
            let token = format!("tok_failure_{index}");
            fails_open(&mut vm, &token, |vm, call| vm.fail_call(call, failure))?;
        }
        assert_eq!(metric(&mut [&mut vm], "whoami_failed"), 4, "{kind:?}");
        assert_eq!(metric(&mut [&mut vm], "fallbacks"), 4, "{kind:?}");
        assert_eq!(metric(&mut [&mut vm], "whoami_ok"), 0, "{kind:?}");
        // Each failure is backed off: no new callout for those tokens.
        for index in 0..4 {
            let stream = sync(&mut vm, Some(&format!("tok_failure_{index}")))?;
            assert!(vm.stream(stream)?.forwarded(), "{kind:?}");
        }
        assert_eq!(vm.calls().len(), 4, "{kind:?}");
        no_anomalies(&vm)?;
    }
    Ok(())
}

#[test]
fn envoy_synthesized_503_and_504_are_failures_not_denials() -> TestResult {
    // An unreachable Synapse must not be mistaken for "token rejected": with
    // reject_invalid_tokens a denial would answer the client 401.
    let (_host, mut vm) = start(HostKind::Envoy, json!({"reject_invalid_tokens": true}))?;
    fails_open(&mut vm, "tok_a", |vm, call| {
        vm.fail_call(call, CallFailure::Connect)
    })?;
    fails_open(&mut vm, "tok_b", |vm, call| {
        vm.fail_call(call, CallFailure::Timeout)
    })?;
    assert_eq!(metric(&mut [&mut vm], "rejected"), 0);
    assert_eq!(metric(&mut [&mut vm], "whoami_denied"), 0);
    Ok(())
}

#[test]
fn bad_answers_fail_open() -> TestResult {
    let oversized = format!(
        r#"{{"user_id":"@big:example.org","pad":"{}"}}"#,
        "x".repeat(5000)
    );
    let cases: Vec<(u16, Vec<u8>)> = vec![
        (200, b"{\"user_id\":".to_vec()),
        (200, b"not json at all".to_vec()),
        (200, b"{\"user_id\":42}".to_vec()),
        (200, b"{}".to_vec()),
        (200, Vec::new()),
        (200, vec![0xff, 0xfe, 0x00, 0x7b]),
        (200, oversized.into_bytes()),
        (200, br#"{"user_id":"alice"}"#.to_vec()),
        (200, br#"{"user_id":"@alice:exa mple.org"}"#.to_vec()),
        (
            200,
            br#"{"user_id":"@alice:example.org\r\nx-evil: 1"}"#.to_vec(),
        ),
        (
            200,
            format!(r#"{{"user_id":"@{}:example.org"}}"#, "a".repeat(300)).into_bytes(),
        ),
        (200, "[".repeat(10_000).into_bytes()),
        (
            429,
            br#"{"errcode":"M_LIMIT_EXCEEDED","retry_after_ms":2000}"#.to_vec(),
        ),
        (500, b"Internal Server Error".to_vec()),
        (502, Vec::new()),
        (404, br#"{"errcode":"M_UNRECOGNIZED"}"#.to_vec()),
        (302, Vec::new()),
        (100, Vec::new()),
    ];
    for kind in BOTH {
        let (host, mut vm) = start(kind, json!({}))?;
        for (index, (status, body)) in cases.iter().enumerate() {
            let token = format!("tok_bad_{index}");
            fails_open(&mut vm, &token, |vm, call| {
                vm.respond(call, *status, JSON, body)
            })
            .map_err(|error| format!("{kind:?} status {status} case {index}: {error}"))?;
        }
        assert_eq!(
            metric(&mut [&mut vm], "whoami_failed"),
            cases.len() as i64,
            "{kind:?}"
        );
        assert_eq!(metric(&mut [&mut vm], "whoami_ok"), 0);
        assert_eq!(metric(&mut [&mut vm], "whoami_denied"), 0);
        // Failures are logged, rate-limited: not one line per request.
        let warnings = host.logs_at_least(LogLevel::Warn).len();
        assert!(
            warnings >= 1 && warnings < cases.len(),
            "{kind:?}: {warnings} warnings"
        );
        no_anomalies(&vm)?;
    }
    Ok(())
}

#[test]
fn a_body_of_exactly_4096_bytes_is_read_and_one_more_is_refused() -> TestResult {
    let body_of = |len: usize| {
        let head = r#"{"user_id":"@hank:example.org","pad":""#;
        let tail = r#""}"#;
        let pad = "p".repeat(len - head.len() - tail.len());
        format!("{head}{pad}{tail}").into_bytes()
    };
    for kind in BOTH {
        let (_host, mut vm) = start(kind, json!({}))?;
        let stream = sync(&mut vm, Some("tok_4096"))?;
        let call = only_call(&vm, stream)?;
        vm.respond(call, 200, JSON, &body_of(4096))?;
        assert_eq!(
            header_values(&vm, stream)?,
            ["@hank:example.org"],
            "{kind:?}"
        );
        fails_open(&mut vm, "tok_4097", |vm, call| {
            vm.respond(call, 200, JSON, &body_of(4097))
        })?;
    }
    Ok(())
}

#[test]
fn the_fallback_key_is_stable_per_token_across_vms_and_differs_between_tokens() -> TestResult {
    for kind in BOTH {
        let (host, mut vm) = start(kind, json!({}))?;
        let first = fails_open(&mut vm, "tok_k1", |vm, call| {
            vm.fail_call(call, CallFailure::Timeout)
        })?;
        let other = fails_open(&mut vm, "tok_k2", |vm, call| {
            vm.fail_call(call, CallFailure::Timeout)
        })?;
        assert_ne!(first, other, "{kind:?}");
        let mut second_vm = host.start_vm(&filter()?, &config(kind, json!({})))?;
        let stream = sync(&mut second_vm, Some("tok_k1"))?;
        assert_eq!(header_values(&second_vm, stream)?, [first], "{kind:?}");
    }
    Ok(())
}

#[test]
fn malformed_tokens_are_routed_by_fallback_and_never_sent_to_whoami() -> TestResult {
    let long = format!("Bearer {}", "t".repeat(4097));
    let malformed = [
        "Bearer tok en",
        "Bearer tok\tx",
        long.as_str(),
        "Bearer tök",
    ];
    for kind in BOTH {
        let (_host, mut vm) = start(kind, json!({}))?;
        for authorization in malformed {
            let mut headers = sync_headers(None);
            headers.push(("authorization".into(), authorization.into()));
            let stream = vm.request(&pairs(&headers))?;
            let values = header_values(&vm, stream)?;
            assert!(
                values.len() == 1 && is_fallback_key(&values[0]),
                "{kind:?} {authorization:?}: {values:?}"
            );
        }
        assert!(vm.calls().is_empty(), "{kind:?}: {:?}", vm.calls());
    }
    Ok(())
}

/// ngx_wasm_module passes the number of the whoami response's *real* headers to
/// `on_http_call_response` (`:status` is a special key, not counted). An upstream answering `200`
/// with a body but no header lines (HTTP/1.0 style) gives `num_headers = 0`; the filter reads
/// `:status` instead of trusting `num_headers`, so the answer is still a user.
#[test]
fn ngx_a_whoami_answer_without_header_lines_is_still_an_answer() -> TestResult {
    let (_host, mut vm) = start(HostKind::Ngx, json!({}))?;
    let stream = sync(&mut vm, Some("tok_bare"))?;
    let call = only_call(&vm, stream)?;
    vm.respond(call, 200, &[], &whoami_body("@ivy:example.org"))?;
    assert_eq!(header_values(&vm, stream)?, ["@ivy:example.org"]);
    Ok(())
}

#[test]
fn whoami_timing_out_after_whoami_timeout_ms_fails_open() -> TestResult {
    for kind in BOTH {
        let (host, mut vm) = start(kind, json!({"whoami_timeout_ms": 1500}))?;
        let stream = sync(&mut vm, Some("tok_slow"))?;
        host.advance(std::time::Duration::from_millis(1499));
        assert!(vm.expire_calls()?.is_empty(), "{kind:?}: not due yet");
        assert!(vm.stream(stream)?.paused);
        host.advance(std::time::Duration::from_millis(1));
        assert_eq!(vm.expire_calls()?.len(), 1, "{kind:?}");
        let values = header_values(&vm, stream)?;
        assert!(vm.stream(stream)?.resumed(), "{kind:?}");
        assert!(
            values.len() == 1 && is_fallback_key(&values[0]),
            "{kind:?}: {values:?}"
        );
    }
    Ok(())
}
