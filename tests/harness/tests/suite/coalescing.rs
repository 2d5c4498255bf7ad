//! One whoami call per token per process, a bounded number of calls in flight, and no memory
//! kept for requests that went away — under both host profiles, several VMs sharing one store.

use std::time::Duration;

use proxy_wasm_harness::{Action, Host, HostKind, Vm};
use serde_json::json;

use crate::common::*;

fn vms(
    kind: HostKind,
    n: usize,
    extra: serde_json::Value,
) -> Result<(Host, Vec<Vm>), Box<dyn std::error::Error>> {
    let host = Host::new(profile(kind));
    let vms = (0..n)
        .map(|_| host.start_vm(&filter()?, &config(kind, extra.clone())))
        .collect::<Result<_, _>>()?;
    Ok((host, vms))
}

#[test]
fn concurrent_first_requests_of_a_token_in_several_vms_make_one_call() -> TestResult {
    for kind in BOTH {
        let (host, mut vms) = vms(kind, 3, json!({}))?;
        let mut streams = Vec::new();
        for round in 0..10 {
            for (i, vm) in vms.iter_mut().enumerate() {
                streams.push((i, sync(vm, Some("tok_burst"))?, round));
            }
        }
        let calls: Vec<_> = vms.iter().flat_map(|vm| vm.pending_calls()).collect();
        assert_eq!(calls.len(), 1, "{kind:?}: one whoami call for the process");
        let owner = vms
            .iter()
            .position(|vm| !vm.pending_calls().is_empty())
            .ok_or("no owner")?;
        vms[owner].respond(
            calls[0].token,
            200,
            JSON,
            &whoami_body("@burst:example.org"),
        )?;
        // The other VMs read the answer from shared data on their next (fast) tick.
        host.advance(Duration::from_millis(20));
        for vm in vms.iter_mut() {
            vm.tick()?;
        }
        for (i, stream, _) in streams {
            let state = vms[i].stream(stream)?;
            let values = header_values(&vms[i], stream)?;
            assert!(
                state.forwarded(),
                "{kind:?}: VM {i} stream {stream} still waits"
            );
            match kind {
                // Envoy: every waiter, in every VM, is resumed with the user.
                HostKind::Envoy => assert_eq!(values, ["@burst:example.org"], "VM {i}"),
                // ngx_wasm_module cannot resume one request from another's callback: only the
                // caller waited; the rest went on at once with the token's fallback key.
                HostKind::Ngx => {
                    let first = i == owner && state.resumed();
                    if first {
                        assert_eq!(values, ["@burst:example.org"]);
                    } else {
                        assert!(is_fallback_key(&values[0]), "{values:?}");
                    }
                }
            }
        }
        for vm in &vms {
            no_anomalies(vm)?;
        }
        assert_eq!(
            metric(&mut vms.iter_mut().collect::<Vec<_>>(), "whoami_ok"),
            1
        );
    }
    Ok(())
}

#[test]
fn a_storm_of_new_tokens_on_ngx_routes_the_excess_by_device_at_once() -> TestResult {
    // ngx_wasm_module cannot resume one request from another's answer: no waiting for a slot.
    let (_host, mut vms) = vms(HostKind::Ngx, 2, json!({"max_whoami_in_flight": 8}))?;
    let mut paused = 0;
    for i in 0..300 {
        let vm = &mut vms[i % 2];
        let stream = sync(vm, Some(&format!("tok_storm_{i}")))?;
        let state = vm.stream(stream)?;
        if state.last_action() == Some(Action::Pause) {
            paused += 1;
        } else {
            // Routed at once, by the device, without a callout.
            assert!(is_fallback_key(&header_values(vm, stream)?[0]));
        }
        for vm in &vms {
            assert!(vm.pending_calls().len() <= 8);
        }
    }
    assert_eq!(paused, 16, "8 calls per VM");
    let mut all: Vec<&mut Vm> = vms.iter_mut().collect();
    assert_eq!(metric(&mut all, "shed"), 300 - 16);
    // Answers free the budget: the next new token is resolved again.
    for vm in vms.iter_mut() {
        for call in vm.pending_calls() {
            vm.respond(call.token, 200, JSON, &whoami_body("@storm:example.org"))?;
        }
    }
    let stream = sync(&mut vms[0], Some("tok_after_storm"))?;
    assert_eq!(vms[0].stream(stream)?.last_action(), Some(Action::Pause));
    Ok(())
}

/// The user of cold-start token `tok_u<user>_d<device>`.
fn user_of_cold_token(authorization: &str) -> Option<String> {
    let rest = authorization.strip_prefix("Bearer tok_u")?;
    Some(format!("@u{}:example.org", rest.split('_').next()?))
}

/// Issue 18: a freshly started Envoy meets many more new tokens than `max_whoami_in_flight`
/// (100 users x 3 devices, two VMs with a cap of 8 each). The excess waits for a free call
/// slot instead of taking the fallback key, so every request is keyed by its user, and no VM
/// ever has more than 8 calls open.
#[test]
fn a_cold_start_keeps_every_user_together_with_the_calls_in_flight_capped() -> TestResult {
    let (_host, mut vms) = vms(HostKind::Envoy, 2, json!({"max_whoami_in_flight": 8}))?;
    let mut streams = Vec::new();
    for i in 0..300 {
        let (user, device) = (i % 100, i / 100);
        let vm = i % 2;
        let stream = sync(&mut vms[vm], Some(&format!("tok_u{user}_d{device}")))?;
        assert_eq!(vms[vm].stream(stream)?.last_action(), Some(Action::Pause));
        streams.push((vm, stream, format!("@u{user}:example.org")));
    }
    let mut calls = 0;
    loop {
        let mut answered = false;
        for vm in vms.iter_mut() {
            assert!(
                vm.pending_calls().len() <= 8,
                "more calls open than the cap"
            );
            if let Some(call) = vm.pending_calls().first().cloned() {
                let user = call
                    .header("authorization")
                    .and_then(user_of_cold_token)
                    .ok_or("a callout without a cold-start token")?;
                vm.respond(call.token, 200, JSON, &whoami_body(&user))?;
                calls += 1;
                answered = true;
            }
        }
        // The host clock stands still: each answer gives its call slot to the next request
        // well within the callout timeout.
        for vm in vms.iter_mut() {
            vm.tick()?;
        }
        if !answered {
            break;
        }
    }
    assert!(calls <= 300, "{calls} whoami calls for 300 tokens");
    for (vm, stream, user) in &streams {
        let state = vms[*vm].stream(*stream)?;
        assert!(state.forwarded(), "VM {vm} stream {stream} still waits");
        assert_eq!(
            header_values(&vms[*vm], *stream)?,
            [user.as_str()],
            "VM {vm}"
        );
    }
    let mut all: Vec<&mut Vm> = vms.iter_mut().collect();
    assert_eq!(metric(&mut all, "shed"), 0);
    for vm in &vms {
        no_anomalies(vm)?;
    }
    Ok(())
}

/// A flood of garbage tokens at a whoami that never answers: the queue of requests waiting for
/// a call slot is bounded (the rest go on at once with the fallback key), guest memory stays
/// flat, and every waiting request goes on with its fallback key at the callout timeout.
#[test]
fn a_flood_of_garbage_tokens_keeps_the_wait_queue_bounded() -> TestResult {
    let (host, mut vm) = start(
        HostKind::Envoy,
        json!({"max_whoami_in_flight": 2, "whoami_timeout_ms": 1000}),
    )?;
    let mut waiting = Vec::new();
    for round in 0..3 {
        let memory = vm.memory_bytes();
        for i in 0..2000 {
            let stream = sync(&mut vm, Some(&format!("junk_{round}_{i}")))?;
            match vm.stream(stream)?.last_action() {
                Some(Action::Pause) => waiting.push(stream),
                _ => assert!(is_fallback_key(&header_values(&vm, stream)?[0])),
            }
        }
        assert!(vm.pending_calls().len() <= 2);
        assert!(waiting.len() <= 2 + 1024, "{} requests wait", waiting.len());
        if round > 0 {
            assert_eq!(vm.memory_bytes(), memory, "guest memory grew");
        }
        // The callout timeout passes: every waiting request goes on, unanswered calls too.
        host.advance(Duration::from_millis(3100));
        vm.tick()?;
        vm.expire_calls()?;
        vm.tick()?;
        for stream in waiting.drain(..) {
            let state = vm.stream(stream)?;
            assert!(state.forwarded(), "stream {stream} still waits");
            assert!(is_fallback_key(&header_values(&vm, stream)?[0]));
        }
        vm.forget_ended_streams();
    }
    no_anomalies(&vm)?;
    Ok(())
}

#[test]
fn requests_that_go_away_while_waiting_leave_no_memory_behind() -> TestResult {
    for kind in BOTH {
        let (host, mut vm) = start(kind, json!({}))?;
        let round = |vm: &mut Vm, i: u32| -> TestResult {
            let first = sync(vm, Some(&format!("tok_gone_{i}")))?;
            let second = sync(vm, Some(&format!("tok_gone_{i}")))?;
            vm.end_stream(first)?;
            vm.end_stream(second)?;
            // Envoy still answers the call (it belongs to the root context); ngx canceled it.
            for call in vm.pending_calls() {
                vm.respond(call.token, 200, JSON, &whoami_body("@gone:example.org"))?;
            }
            vm.forget_ended_streams();
            host.advance(Duration::from_millis(50));
            Ok(())
        };
        // Warm up past every table's first fill (VM memory: 4096 users), then measure.
        for i in 0..10_000 {
            round(&mut vm, i)?;
        }
        let warm = vm.memory_bytes();
        for i in 10_000..40_000 {
            round(&mut vm, i)?;
        }
        assert_eq!(vm.memory_bytes(), warm, "{kind:?}: guest memory grew");
        no_anomalies(&vm)?;
    }
    Ok(())
}
