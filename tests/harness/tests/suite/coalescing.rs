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
fn a_storm_of_new_tokens_never_has_more_calls_in_flight_than_configured() -> TestResult {
    for kind in BOTH {
        let (_host, mut vms) = vms(kind, 2, json!({"max_whoami_in_flight": 8}))?;
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
                assert!(vm.pending_calls().len() <= 8, "{kind:?}");
            }
        }
        assert_eq!(paused, 16, "{kind:?}: 8 calls per VM");
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
    }
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
