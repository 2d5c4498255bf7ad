//! The foundation's behaviour at the ABI level: pause on a miss, the exact callout, resume with
//! the header, cache hits, header scrubbing, tokens from the query, the edge answer.

use proxy_wasm_harness::{Action, CallOutcome, HostKind, LogLevel};
use serde_json::json;

use crate::common::*;

#[test]
fn non_sync_requests_pass_untouched() -> TestResult {
    for kind in BOTH {
        let (_host, mut vm) = start(kind, json!({}))?;
        let headers = [
            (":method", "GET"),
            (
                ":path",
                "/_matrix/client/v3/rooms/!r:x/messages?access_token=abc",
            ),
            (":authority", "matrix.example.org"),
            ("authorization", "Bearer syt_dXNlcg_abcdef_123"),
            ("X-User-Identifier", "client-choice"),
        ];
        let stream = vm.request(&headers)?;
        let state = vm.stream(stream)?;
        assert_eq!(state.last_action(), Some(Action::Continue), "{kind:?}");
        let before: Vec<(String, String)> = headers
            .iter()
            .map(|(n, v)| {
                let name = match kind {
                    HostKind::Envoy => n.to_ascii_lowercase(),
                    HostKind::Ngx => n.to_string(),
                };
                (name, v.to_string())
            })
            .collect();
        assert_eq!(state.request_headers.to_text_pairs(), before, "{kind:?}");
        assert!(vm.calls().is_empty(), "{kind:?}");
        assert_eq!(metric(&mut [&mut vm], "requests"), 0, "{kind:?}");
        no_anomalies(&vm)?;
    }
    Ok(())
}

#[test]
fn a_miss_pauses_and_calls_whoami_with_exactly_what_synapse_needs() -> TestResult {
    for kind in BOTH {
        let (host, mut vm) = start(kind, json!({}))?;
        let mut headers = sync_headers(Some("syt_YWxpY2U_token1_0aB1cD"));
        headers.push(("x-forwarded-for".into(), "198.51.100.7".into()));
        headers.push(("x-forwarded-proto".into(), "https".into()));
        let stream = vm.request(&pairs(&headers))?;
        assert_eq!(
            vm.stream(stream)?.last_action(),
            Some(Action::Pause),
            "{kind:?}"
        );
        assert!(vm.stream(stream)?.paused);
        let calls = vm.pending_calls();
        assert_eq!(calls.len(), 1, "{kind:?}");
        let call = &calls[0];
        let upstream = match kind {
            HostKind::Envoy => ENVOY_CLUSTER,
            HostKind::Ngx => NGX_UPSTREAM,
        };
        assert_eq!(call.upstream, upstream);
        assert_eq!(call.timeout_ms, 2000);
        assert!(call.body.is_empty() && call.trailers.is_empty());
        let names: Vec<&str> = call.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                ":method",
                ":path",
                ":authority",
                "authorization",
                "user-agent",
                "x-forwarded-for",
                "x-forwarded-proto"
            ],
            "{kind:?}: exactly these headers, nothing else of the client's"
        );
        assert_eq!(call.header(":method"), Some("GET"));
        assert_eq!(call.header(":path"), Some(WHOAMI_PATH));
        assert_eq!(call.header(":authority"), Some("localhost"));
        assert_eq!(
            call.header("authorization"),
            Some("Bearer syt_YWxpY2U_token1_0aB1cD")
        );
        assert_eq!(call.header("user-agent"), Some("Element/1.11 (test)"));
        // Without it Synapse warns about every forwarded request.
        assert_eq!(call.header("x-forwarded-proto"), Some("https"));
        // Envoy's source.address carries a port, nginx's $remote_addr does not: the client IP is
        // appended once either way.
        assert_eq!(
            call.header("x-forwarded-for"),
            Some("198.51.100.7, 127.0.0.1"),
            "{kind:?}"
        );
        assert_eq!(metric(&mut [&mut vm], "requests"), 1);
        assert_eq!(metric(&mut [&mut vm], "cache_misses"), 1);
        // The names the operator sees: bare in Envoy, `pw:<filter>:` in ngx_wasm_module.
        let prefix = match kind {
            HostKind::Envoy => "matrix_sync_router_",
            HostKind::Ngx => "pw:matrix-sync-router:matrix_sync_router_",
        };
        let names: Vec<String> = host.metrics().into_iter().map(|m| m.name).collect();
        assert_eq!(names.len(), 17, "{kind:?}: {names:?}");
        assert!(
            names.iter().all(|name| name.starts_with(prefix)),
            "{kind:?}: {names:?}"
        );
        no_anomalies(&vm)?;
    }
    Ok(())
}

#[test]
fn whoami_answer_resumes_with_the_user_and_later_requests_hit_the_cache() -> TestResult {
    for kind in BOTH {
        let (_host, mut vm) = start(kind, json!({}))?;
        let first = resolve(&mut vm, "syt_YWxpY2U_tok_1", "@alice:example.org")?;
        assert_eq!(vm.stream(first)?.resumes, 1, "{kind:?}");
        assert_eq!(metric(&mut [&mut vm], "whoami_ok"), 1);
        vm.end_stream(first)?;
        let second = sync(&mut vm, Some("syt_YWxpY2U_tok_1"))?;
        let state = vm.stream(second)?;
        assert_eq!(state.last_action(), Some(Action::Continue), "{kind:?}");
        assert_eq!(header_values(&vm, second)?, ["@alice:example.org"]);
        assert_eq!(vm.calls().len(), 1, "{kind:?}: the hit made no callout");
        assert_eq!(metric(&mut [&mut vm], "cache_hits"), 1);
        // The response passes through untouched.
        let action = vm.response_headers(
            second,
            &[(":status", "200"), ("content-type", "application/json")],
            false,
        )?;
        assert_eq!(action, Action::Continue);
        vm.end_stream(second)?;
        // Another device of the same user: its own token, its own whoami, the same user.
        let other = resolve(
            &mut vm,
            "mat_oidc_token_of_alice_phone",
            "@alice:example.org",
        )?;
        assert_eq!(header_values(&vm, other)?, ["@alice:example.org"]);
        no_anomalies(&vm)?;
    }
    Ok(())
}

#[test]
fn client_copies_of_the_header_never_survive() -> TestResult {
    let spoofs = [
        ("x-user-identifier", "@victim:example.org"),
        ("X-User-Identifier", "@victim:example.org"),
        ("X-USER-IDENTIFIER", "@victim2:example.org"),
    ];
    for kind in BOTH {
        let (_host, mut vm) = start(kind, json!({"reject_invalid_tokens": false}))?;
        let with_spoofs = |token: Option<&str>| {
            let mut headers = sync_headers(token);
            for (name, value) in spoofs {
                headers.push((name.into(), value.into()));
            }
            headers
        };
        // Miss then whoami.
        let miss = vm.request(&pairs(&with_spoofs(Some("tok_alice_1"))))?;
        let call = only_call(&vm, miss)?;
        vm.respond(call, 200, JSON, &whoami_body("@alice:example.org"))?;
        assert_eq!(
            header_values(&vm, miss)?,
            ["@alice:example.org"],
            "{kind:?} miss"
        );
        // Hit.
        let hit = vm.request(&pairs(&with_spoofs(Some("tok_alice_1"))))?;
        assert_eq!(
            header_values(&vm, hit)?,
            ["@alice:example.org"],
            "{kind:?} hit"
        );
        // No token: removed, nothing set.
        let anonymous = vm.request(&pairs(&with_spoofs(None)))?;
        assert_eq!(
            header_values(&vm, anonymous)?,
            Vec::<String>::new(),
            "{kind:?} no token"
        );
        // Fallback (whoami down).
        let down = vm.request(&pairs(&with_spoofs(Some("tok_bob_1"))))?;
        let call = only_call(&vm, down)?;
        vm.respond(call, 502, JSON, b"bad gateway")?;
        let values = header_values(&vm, down)?;
        assert!(
            values.len() == 1 && is_fallback_key(&values[0]),
            "{kind:?} fallback: {values:?}"
        );
        // Rejected token, forwarded.
        let denied = vm.request(&pairs(&with_spoofs(Some("tok_revoked"))))?;
        let call = only_call(&vm, denied)?;
        vm.respond(call, 401, JSON, br#"{"errcode":"M_UNKNOWN_TOKEN"}"#)?;
        let values = header_values(&vm, denied)?;
        assert!(
            values.len() == 1 && is_fallback_key(&values[0]),
            "{kind:?} denied: {values:?}"
        );
        no_anomalies(&vm)?;
    }
    Ok(())
}

#[test]
fn requests_without_a_token_spread_and_make_no_callout() -> TestResult {
    for kind in BOTH {
        let (_host, mut vm) = start(kind, json!({}))?;
        let stream = sync(&mut vm, None)?;
        let state = vm.stream(stream)?;
        assert_eq!(state.last_action(), Some(Action::Continue));
        assert_eq!(state.header(HEADER), None);
        assert!(vm.calls().is_empty());
        assert_eq!(metric(&mut [&mut vm], "no_token"), 1, "{kind:?}");
        assert_eq!(metric(&mut [&mut vm], "requests"), 1);
    }
    Ok(())
}

#[test]
fn the_access_token_query_parameter_is_used_percent_decoded() -> TestResult {
    for kind in BOTH {
        let (_host, mut vm) = start(kind, json!({}))?;
        let stream = vm.request(&[
            (":method", "GET"),
            (
                ":path",
                "/_matrix/client/r0/sync?since=s1&access_token=syt_a%2Bb%3Dc_x&full_state=false",
            ),
            (":authority", "m.example.org"),
        ])?;
        let call = only_call(&vm, stream)?;
        let record = vm.pending_calls()[0].clone();
        assert_eq!(
            record.header("authorization"),
            Some("Bearer syt_a+b=c_x"),
            "{kind:?}"
        );
        vm.respond(call, 200, JSON, &whoami_body("@bob:example.org"))?;
        assert_eq!(header_values(&vm, stream)?, ["@bob:example.org"]);
        // Header and query both: Synapse answers 401 ("Mixing Authorization headers and
        // access_token query parameters"), so no callout and the fallback key.
        let both = vm.request(&[
            (":method", "GET"),
            (":path", "/_matrix/client/v3/sync?access_token=query_token"),
            (":authority", "m.example.org"),
            ("authorization", "Bearer header_token"),
        ])?;
        assert!(
            vm.pending_calls().iter().all(|call| call.context != both),
            "a callout for a request Synapse refuses"
        );
        let keys = header_values(&vm, both)?;
        assert!(keys.len() == 1 && is_fallback_key(&keys[0]), "{keys:?}");
    }
    Ok(())
}

#[test]
fn every_sync_path_of_the_family_is_handled_and_neighbours_are_not() -> TestResult {
    let handled = [
        "/_matrix/client/v3/sync",
        "/_matrix/client/r0/sync?since=x",
        "/_matrix/client/api/v1/events?from=1",
        "/_matrix/client/unstable/initialSync",
        "/_matrix/client/v3/rooms/!abc:example.org/initialSync",
        "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync",
        "/_matrix/client/v4/sync",
    ];
    let ignored = [
        "/_matrix/client/v3/sync/extra",
        "/_matrix/client/v4/sync/",
        "/_matrix/client/v4/events",
        "/_matrix/client/v3/rooms/a/b/initialSync",
        "/_matrix/client/unstable/org.matrix.simplified_msc3575/syncX",
        "/_matrix/client/v3/account/whoami",
        "/",
    ];
    for kind in BOTH {
        let (_host, mut vm) = start(kind, json!({}))?;
        for path in handled {
            let stream = vm.request(&[
                (":method", "GET"),
                (":path", path),
                ("authorization", &format!("Bearer t{path}")),
            ])?;
            assert_eq!(
                vm.stream(stream)?.last_action(),
                Some(Action::Pause),
                "{kind:?} {path}"
            );
            vm.end_stream(stream)?;
        }
        for path in ignored {
            let stream = vm.request(&[
                (":method", "GET"),
                (":path", path),
                ("authorization", "Bearer t"),
            ])?;
            assert_eq!(
                vm.stream(stream)?.last_action(),
                Some(Action::Continue),
                "{kind:?} {path}"
            );
            assert_eq!(vm.stream(stream)?.header(HEADER), None);
        }
    }
    Ok(())
}

#[test]
fn reject_invalid_tokens_answers_at_the_edge_with_synapses_error() -> TestResult {
    for kind in BOTH {
        let (_host, mut vm) = start(kind, json!({"reject_invalid_tokens": true}))?;
        let body = br#"{"errcode":"M_UNKNOWN_TOKEN","error":"Invalid access token passed.","soft_logout":true}"#;
        let stream = sync(&mut vm, Some("syt_expired"))?;
        let call = only_call(&vm, stream)?;
        vm.respond(call, 401, JSON, body)?;
        let state = vm.stream(stream)?;
        let response = state.local_response.clone().ok_or("no local response")?;
        assert_eq!(response.status, 401, "{kind:?}");
        assert_eq!(response.body, body.to_vec());
        assert!(
            !state.paused && state.resumes == 0,
            "{kind:?}: answered, not forwarded"
        );
        assert_eq!(metric(&mut [&mut vm], "rejected"), 1);
        // Remembered for negative_ttl_s: the next request is answered without a callout.
        let again = sync(&mut vm, Some("syt_expired"))?;
        let state = vm.stream(again)?;
        assert_eq!(state.local_response.as_ref().map(|r| r.status), Some(401));
        assert_eq!(vm.calls().len(), 1, "{kind:?}");
        assert_eq!(metric(&mut [&mut vm], "negative_hits"), 1);
        // 403 (expired account) keeps its status.
        let locked = sync(&mut vm, Some("syt_locked"))?;
        let call = only_call(&vm, locked)?;
        vm.respond(call, 403, JSON, br#"{"errcode":"M_EXPIRED_ACCOUNT"}"#)?;
        let state = vm.stream(locked)?;
        assert_eq!(state.local_response.as_ref().map(|r| r.status), Some(403));
        no_anomalies(&vm)?;
    }
    Ok(())
}

#[test]
fn a_client_that_leaves_mid_callout_leaves_nothing_behind() -> TestResult {
    for kind in BOTH {
        let (host, mut vm) = start(kind, json!({}))?;
        let stream = sync(&mut vm, Some("tok_gone"))?;
        vm.end_stream(stream)?;
        match kind {
            // Envoy keeps the call (it belongs to the root context): its answer is cached
            // though nobody waits for it any more.
            HostKind::Envoy => {
                let call = vm.pending_calls()[0].token;
                vm.respond(call, 200, JSON, &whoami_body("@carol:example.org"))?;
                assert!(!vm.stream(stream)?.resumed());
                let next = sync(&mut vm, Some("tok_gone"))?;
                assert_eq!(header_values(&vm, next)?, ["@carol:example.org"]);
                assert_eq!(vm.calls().len(), 1);
            }
            // ngx_wasm_module cancels it with the request. Its in-flight marker keeps others
            // from calling until the callout timeout (+1 s) has passed; then a request asks.
            HostKind::Ngx => {
                assert!(vm.pending_calls().is_empty());
                assert_eq!(vm.calls()[0].outcome, CallOutcome::Canceled);
                let next = sync(&mut vm, Some("tok_gone"))?;
                assert!(is_fallback_key(&header_values(&vm, next)?[0]));
                host.advance(std::time::Duration::from_secs(4));
                resolve(&mut vm, "tok_gone", "@carol:example.org")?;
            }
        }
        assert!(host.logs_at_least(LogLevel::Error).is_empty(), "{kind:?}");
        no_anomalies(&vm)?;
    }
    Ok(())
}

#[test]
fn concurrent_misses_of_one_token_each_resume_with_the_user() -> TestResult {
    for kind in BOTH {
        let (_host, mut vm) = start(kind, json!({}))?;
        let streams: Vec<u32> = (0..5)
            .map(|_| sync(&mut vm, Some("tok_popular")))
            .collect::<Result<_, _>>()?;
        let pending = vm.pending_calls();
        assert_eq!(pending.len(), 1, "{kind:?}: one call for the token");
        vm.respond(
            pending[0].token,
            200,
            JSON,
            &whoami_body("@dave:example.org"),
        )?;
        for (i, stream) in streams.into_iter().enumerate() {
            let values = header_values(&vm, stream)?;
            // Envoy resumes every waiter with the answer; ngx_wasm_module cannot resume a
            // request from another one's callback, so the others went on with the fallback.
            if kind == HostKind::Envoy || i == 0 {
                assert_eq!(values, ["@dave:example.org"], "{kind:?}");
            } else {
                assert!(is_fallback_key(&values[0]), "{kind:?}: {values:?}");
            }
            assert!(vm.stream(stream)?.forwarded());
        }
        no_anomalies(&vm)?;
    }
    Ok(())
}

#[test]
fn envoy_refusing_the_callout_routes_with_the_fallback_key_and_says_why() -> TestResult {
    // The operator named a cluster Envoy does not have.
    let host = proxy_wasm_harness::Host::new(proxy_wasm_harness::Profile::envoy());
    let mut vm = host.start_vm(&filter()?, &config(HostKind::Envoy, json!({})))?;
    let stream = sync(&mut vm, Some("tok_x"))?;
    let state = vm.stream(stream)?;
    assert_eq!(state.last_action(), Some(Action::Continue));
    let values = header_values(&vm, stream)?;
    assert!(
        values.len() == 1 && is_fallback_key(&values[0]),
        "{values:?}"
    );
    assert_eq!(metric(&mut [&mut vm], "whoami_failed"), 1);
    let warnings = host.logs_at_least(LogLevel::Warn);
    assert!(
        warnings
            .iter()
            .any(|l| l.message.contains("synapse_whoami")),
        "{warnings:?}"
    );
    Ok(())
}
