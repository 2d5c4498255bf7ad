//! tests/harness/README.md's example, verbatim (tests/docs.rs checks that they match), so
//! that it keeps compiling and passing.

use proxy_wasm_harness::{Action, Filter, Host, Profile};

#[test]
fn a_known_user_is_routed_by_user_id() -> Result<(), Box<dyn std::error::Error>> {
    let filter = Filter::from_file("../../target/wasm32-wasip1/release/matrix_sync_router.wasm")?;
    let host = Host::new(Profile::envoy().with_cluster("synapse_whoami"));
    let mut vm = host.start_vm(&filter, br#"{"whoami_upstream": "synapse_whoami"}"#)?;

    let stream = vm.request(&[
        (":method", "GET"),
        (":path", "/_matrix/client/v3/sync"),
        ("authorization", "Bearer syt_token"),
    ])?;
    assert_eq!(vm.stream(stream)?.last_action(), Some(Action::Pause));
    let call = vm.pending_calls()[0].clone();
    assert_eq!(call.header("authorization"), Some("Bearer syt_token"));
    vm.respond(
        call.token,
        200,
        &[("content-type", "application/json")],
        br#"{"user_id": "@alice:example.org"}"#,
    )?;

    let state = vm.stream(stream)?;
    assert!(state.resumed());
    assert_eq!(
        state.header("x-user-identifier").as_deref(),
        Some("@alice:example.org")
    );
    vm.tick()?; // counters are flushed to the host on the filter's tick
    assert_eq!(host.metric("matrix_sync_router_whoami_ok"), Some(1));
    host.advance(std::time::Duration::from_secs(3600)); // the fake clock
    Ok(())
}
