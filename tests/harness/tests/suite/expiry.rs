//! Time: the cache TTL, the negative cache and the failure back-off, with the fake clock.

use std::time::Duration;

use proxy_wasm_harness::{Action, Host, HostKind, Vm};
use serde_json::json;

use crate::common::*;

/// A request with `token`: true when it was answered from the cache (no callout).
fn served_from_cache(vm: &mut Vm, token: &str) -> Result<(bool, u32), Box<dyn std::error::Error>> {
    let stream = sync(vm, Some(token))?;
    let state = vm.stream(stream)?;
    Ok((state.last_action() == Some(Action::Continue), stream))
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[test]
fn a_user_is_trusted_for_cache_ttl_s_then_asked_again() -> TestResult {
    for kind in BOTH {
        let (host, mut vm) = start(kind, json!({"cache_ttl_s": 60}))?;
        resolve(&mut vm, "tok_ttl", "@erin:example.org")?;
        // (The last 6 s are the refresh window, covered by the refresh tests below.)
        host.advance(secs(53));
        let (hit, stream) = served_from_cache(&mut vm, "tok_ttl")?;
        assert!(hit, "{kind:?}: still fresh at 53 s");
        assert_eq!(header_values(&vm, stream)?, ["@erin:example.org"]);
        host.advance(secs(7));
        let (hit, stream) = served_from_cache(&mut vm, "tok_ttl")?;
        assert!(!hit, "{kind:?}: expired at 60 s");
        let call = only_call(&vm, stream)?;
        vm.respond(call, 200, JSON, &whoami_body("@erin:example.org"))?;
        assert_eq!(header_values(&vm, stream)?, ["@erin:example.org"]);
        assert_eq!(metric(&mut [&mut vm], "whoami_ok"), 2);
        no_anomalies(&vm)?;
    }
    Ok(())
}

#[test]
fn a_rejected_token_is_remembered_for_negative_ttl_s() -> TestResult {
    for kind in BOTH {
        let (host, mut vm) = start(kind, json!({"negative_ttl_s": 30}))?;
        let stream = sync(&mut vm, Some("tok_revoked"))?;
        let call = only_call(&vm, stream)?;
        vm.respond(call, 401, JSON, br#"{"errcode":"M_UNKNOWN_TOKEN"}"#)?;
        let fallback = header_values(&vm, stream)?;
        assert!(fallback.len() == 1 && is_fallback_key(&fallback[0]));
        host.advance(secs(29));
        let (hit, again) = served_from_cache(&mut vm, "tok_revoked")?;
        assert!(hit, "{kind:?}: negative entry fresh at 29 s");
        assert_eq!(header_values(&vm, again)?, fallback, "same fallback key");
        assert_eq!(metric(&mut [&mut vm], "negative_hits"), 1);
        host.advance(secs(1));
        let (hit, _) = served_from_cache(&mut vm, "tok_revoked")?;
        assert!(!hit, "{kind:?}: asked again after 30 s");
        assert_eq!(metric(&mut [&mut vm], "whoami_denied"), 1);
    }
    Ok(())
}

#[test]
fn negative_ttl_zero_asks_every_time() -> TestResult {
    for kind in BOTH {
        let (_host, mut vm) = start(kind, json!({"negative_ttl_s": 0}))?;
        for _ in 0..3 {
            let stream = sync(&mut vm, Some("tok_revoked"))?;
            let call = only_call(&vm, stream)?;
            vm.respond(call, 401, JSON, br#"{"errcode":"M_UNKNOWN_TOKEN"}"#)?;
            assert!(vm.stream(stream)?.forwarded(), "{kind:?}");
        }
        assert_eq!(vm.calls().len(), 3, "{kind:?}");
    }
    Ok(())
}

#[test]
fn after_a_failure_no_callout_is_made_for_failure_backoff_s() -> TestResult {
    for kind in BOTH {
        let (host, mut vm) = start(kind, json!({"failure_backoff_s": 10}))?;
        let stream = sync(&mut vm, Some("tok_flaky"))?;
        let call = only_call(&vm, stream)?;
        vm.respond(call, 503, JSON, br#"{"errcode":"M_UNKNOWN"}"#)?;
        let fallback = header_values(&vm, stream)?;
        assert!(
            fallback.len() == 1 && is_fallback_key(&fallback[0]),
            "{kind:?}"
        );
        assert!(vm.stream(stream)?.resumed());
        host.advance(secs(9));
        let (hit, again) = served_from_cache(&mut vm, "tok_flaky")?;
        assert!(hit, "{kind:?}: backing off at 9 s");
        assert_eq!(header_values(&vm, again)?, fallback);
        assert_eq!(metric(&mut [&mut vm], "backoff_hits"), 1);
        host.advance(secs(1));
        let (hit, stream) = served_from_cache(&mut vm, "tok_flaky")?;
        assert!(!hit, "{kind:?}: retried after 10 s");
        let call = only_call(&vm, stream)?;
        vm.respond(call, 200, JSON, &whoami_body("@frank:example.org"))?;
        assert_eq!(header_values(&vm, stream)?, ["@frank:example.org"]);
        // The success replaced the back-off entry.
        let (hit, stream) = served_from_cache(&mut vm, "tok_flaky")?;
        assert!(hit);
        assert_eq!(header_values(&vm, stream)?, ["@frank:example.org"]);
    }
    Ok(())
}

#[test]
fn failure_backoff_zero_retries_at_once() -> TestResult {
    for kind in BOTH {
        let (_host, mut vm) = start(kind, json!({"failure_backoff_s": 0}))?;
        for _ in 0..3 {
            let stream = sync(&mut vm, Some("tok_flaky"))?;
            let call = only_call(&vm, stream)?;
            vm.respond(call, 500, JSON, b"{}")?;
        }
        assert_eq!(vm.calls().len(), 3, "{kind:?}");
    }
    Ok(())
}

#[test]
fn a_clock_that_jumps_keeps_routing_right() -> TestResult {
    for kind in BOTH {
        let (host, mut vm) = start(kind, json!({"cache_ttl_s": 60}))?;
        resolve(&mut vm, "tok_clock", "@gina:example.org")?;
        let now = host.now();
        // Back an hour: the entry (valid until now + 60 s) still answers, correctly.
        host.set_time(now - secs(3600));
        let (hit, stream) = served_from_cache(&mut vm, "tok_clock")?;
        assert!(hit, "{kind:?}");
        assert_eq!(header_values(&vm, stream)?, ["@gina:example.org"]);
        // Forward two hours: expired, asked again.
        host.set_time(now + secs(7200));
        let (hit, stream) = served_from_cache(&mut vm, "tok_clock")?;
        assert!(!hit, "{kind:?}");
        let call = only_call(&vm, stream)?;
        vm.respond(call, 200, JSON, &whoami_body("@gina:example.org"))?;
        assert_eq!(header_values(&vm, stream)?, ["@gina:example.org"]);
    }
    Ok(())
}

/// In the last tenth of its TTL an entry in use is refreshed by one request, of any VM; the
/// answer extends the entry, so a token in steady use never expires into a burst of misses (one
/// whoami call per connection at once). Envoy lets that request go on at once; ngx_wasm_module
/// suspends a request with a call in flight, so there it waits (already routed by the cached
/// user) and is resumed on the answer.
#[test]
fn an_entry_in_use_is_refreshed_ahead_by_one_request_of_any_vm() -> TestResult {
    for kind in BOTH {
        let host = Host::new(profile(kind));
        let cfg = config(kind, json!({"cache_ttl_s": 60}));
        let mut vm1 = host.start_vm(&filter()?, &cfg)?;
        let mut vm2 = host.start_vm(&filter()?, &cfg)?;
        resolve(&mut vm1, "tok_hot", "@hana:example.org")?;
        host.advance(secs(54));
        let first = sync(&mut vm1, Some("tok_hot"))?;
        let waits = kind == HostKind::Ngx;
        let expected = if waits {
            Action::Pause
        } else {
            Action::Continue
        };
        assert_eq!(vm1.stream(first)?.last_action(), Some(expected), "{kind:?}");
        assert_eq!(header_values(&vm1, first)?, ["@hana:example.org"]);
        let refresh = only_call(&vm1, first)?;
        for vm in [&mut vm1, &mut vm2] {
            let (hit, stream) = served_from_cache(vm, "tok_hot")?;
            assert!(hit, "{kind:?}: a refresh is in flight, the others just hit");
            assert_eq!(header_values(vm, stream)?, ["@hana:example.org"]);
        }
        assert_eq!(
            vm1.calls().len() + vm2.calls().len(),
            2,
            "{kind:?}: first miss + one refresh"
        );
        vm1.respond(refresh, 200, JSON, &whoami_body("@hana:example.org"))?;
        assert_eq!(
            vm1.stream(first)?.resumed(),
            waits,
            "{kind:?}: resumed exactly when it waited"
        );
        no_anomalies(&vm1)?;
        host.advance(secs(30)); // past the first entry's expiry at 60 s
        let (hit, stream) = served_from_cache(&mut vm2, "tok_hot")?;
        assert!(hit, "{kind:?}: the refreshed entry still answers");
        assert_eq!(header_values(&vm2, stream)?, ["@hana:example.org"]);
        assert_eq!(metric(&mut [&mut vm1, &mut vm2], "refreshes"), 1);
        assert_eq!(metric(&mut [&mut vm1, &mut vm2], "whoami_ok"), 2);
    }
    Ok(())
}

/// A refresh whose request ended first is canceled by the host; its claim (whoami timeout + 1 s)
/// lapses and a later request refreshes instead.
#[test]
fn a_refresh_canceled_with_its_request_is_taken_over_after_the_claim() -> TestResult {
    for kind in BOTH {
        let (host, mut vm) = start(kind, json!({"cache_ttl_s": 60, "whoami_timeout_ms": 1000}))?;
        resolve(&mut vm, "tok_short", "@ida:example.org")?;
        host.advance(secs(54));
        let first = sync(&mut vm, Some("tok_short"))?;
        let refresh = only_call(&vm, first)?;
        vm.end_stream(first)?;
        if kind == HostKind::Envoy {
            // Envoy's callouts belong to the root context: the refresh goes on without its
            // request. Fail it, so the claim has to lapse as on ngx.
            vm.fail_call(refresh, proxy_wasm_harness::CallFailure::Reset)?;
        }
        assert!(vm.pending_calls().is_empty(), "{kind:?}");
        host.advance(secs(1));
        let (hit, _) = served_from_cache(&mut vm, "tok_short")?;
        assert!(
            hit && vm.pending_calls().is_empty(),
            "{kind:?}: still claimed"
        );
        host.advance(secs(1));
        // The claim lapsed: this request refreshes, routed by the cached user meanwhile.
        let stream = sync(&mut vm, Some("tok_short"))?;
        assert_eq!(
            header_values(&vm, stream)?,
            ["@ida:example.org"],
            "{kind:?}"
        );
        let call = only_call(&vm, stream)?;
        vm.respond(call, 200, JSON, &whoami_body("@ida:example.org"))?;
        assert_eq!(metric(&mut [&mut vm], "refreshes"), 2);
        no_anomalies(&vm)?;
    }
    Ok(())
}
