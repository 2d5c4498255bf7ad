//! Paths longer than the filter's limit (`MAX_PATH_LEN` in src/paths.rs, 4096 bytes without the
//! query) are matched against nothing: they pass as non-sync requests, carry no key of the
//! filter's, and are counted. Below the limit, the worst template set the configuration accepts
//! costs a bounded, small amount of work, measured in wasmtime fuel (about one unit per wasm
//! instruction) so that a loaded machine cannot make the bound flaky.

use std::time::Instant;

use proxy_wasm_harness::{Action, HarnessError, HostKind, Vm};
use serde_json::{json, Value};

use crate::common::*;

/// src/paths.rs `MAX_PATH_LEN`.
const MAX_PATH_LEN: usize = 4096;

/// A sync path (`rooms/*/initialSync`) of exactly `len` bytes.
fn initial_sync_path(len: usize) -> String {
    let fixed = "/_matrix/client/v3/rooms/!/initialSync".len();
    format!(
        "/_matrix/client/v3/rooms/!{}/initialSync",
        "r".repeat(len - fixed)
    )
}

fn request_with(vm: &mut Vm, path: &str, extra: &[(&str, &str)]) -> Result<u32, HarnessError> {
    let mut headers = vec![
        (":method", "GET"),
        (":path", path),
        (":authority", "matrix.example.org"),
        ("authorization", "Bearer tok_overlong"),
    ];
    headers.extend_from_slice(extra);
    vm.request(&headers)
}

#[test]
fn an_overlong_path_passes_unkeyed_and_is_counted() -> TestResult {
    for kind in BOTH {
        let (_host, mut vm) = start(
            kind,
            json!({"sync_kind_header": "x-msr-sync-kind", "room_header_name": "x-room"}),
        )?;
        // A client's own copies of the filter's headers.
        let forged = [
            (HEADER, "@victim:example.org"),
            ("x-msr-sync-kind", "initial"),
            ("x-room", "!chosen:example.org"),
        ];
        let longest = initial_sync_path(MAX_PATH_LEN);
        let over = initial_sync_path(MAX_PATH_LEN + 1);
        // At the limit: a sync request like any other (a whoami callout for the new token).
        let at_limit = request_with(&mut vm, &longest, &forged)?;
        assert_eq!(
            vm.stream(at_limit)?.last_action(),
            Some(Action::Pause),
            "{kind:?}"
        );
        assert_eq!(vm.pending_calls().len(), 1, "{kind:?}");
        // One byte over: no callout, no key, and the client's copies are gone.
        let stream = request_with(&mut vm, &format!("{over}?since=s1"), &forged)?;
        let state = vm.stream(stream)?;
        assert_eq!(state.last_action(), Some(Action::Continue), "{kind:?}");
        assert_eq!(vm.pending_calls().len(), 1, "{kind:?}: a callout for it");
        for (name, _) in forged {
            assert_eq!(
                state.request_headers.get_all(name),
                Vec::<String>::new(),
                "{kind:?}: {name}"
            );
        }
        assert_eq!(metric(&mut [&mut vm], "overlong_paths"), 1, "{kind:?}");
        assert_eq!(metric(&mut [&mut vm], "requests"), 1, "{kind:?}");
        // A room path over the limit gets no room key either.
        let room = format!("/_matrix/client/v3/rooms/!{}/messages", "r".repeat(4100));
        let stream = request_with(&mut vm, &room, &[("x-room", "!chosen:example.org")])?;
        assert_eq!(
            vm.stream(stream)?.request_headers.get_all("x-room"),
            Vec::<String>::new(),
            "{kind:?}"
        );
        assert_eq!(metric(&mut [&mut vm], "overlong_paths"), 2, "{kind:?}");
        no_anomalies(&vm)?;
    }
    Ok(())
}

/// Most fuel one request through the worst allowed template set may burn (sync_paths and
/// room_paths each at 64 expanded templates, on the longest path that is matched). Measured on
/// 2026-12-02 at c746892: at most 645,212 (every template walking 16 segments; 70-95 µs under
/// the harness's wasmtime on a loaded 2-core machine), against 31,353 for a plain /sync miss. The
/// filter before the path limit and the slash index (c02977f) burnt 12,704,390 (817 µs) on the
/// one-long-segment set at 4 KiB, and linearly more on longer paths.
const WORST_FUEL: u64 = 1_000_000;

/// A plain /sync miss with the default configuration, for scale.
fn plain_request_fuel() -> Result<u64, Box<dyn std::error::Error>> {
    let (_host, mut vm) = start(HostKind::Envoy, json!({}))?;
    let before = vm.fuel_spent();
    let stream = sync(&mut vm, Some("tok_plain"))?;
    let spent = vm.fuel_spent() - before;
    vm.end_stream(stream)?;
    Ok(spent)
}

/// Fuel and wall-clock time of one request to `path` with `config`, the best of a few runs (the
/// fuel is the same every run).
fn cost(config: &Value, path: &str) -> Result<(u64, f64), Box<dyn std::error::Error>> {
    let (_host, mut vm) = start(HostKind::Envoy, config.clone())?;
    let mut fuel = 0;
    let mut best = f64::MAX;
    for _ in 0..20 {
        let before = vm.fuel_spent();
        let started = Instant::now();
        let stream = request_with(&mut vm, path, &[])?;
        best = best.min(started.elapsed().as_secs_f64() * 1e6);
        fuel = vm.fuel_spent() - before;
        vm.end_stream(stream)?;
        vm.forget_ended_streams();
    }
    no_anomalies(&vm)?;
    Ok((fuel, best))
}

#[test]
fn the_worst_template_set_on_the_longest_path_costs_microseconds() -> TestResult {
    let plain = plain_request_fuel()?;
    // Each a set the filter accepts at its limits: 32 patterns, 64 templates after expansion,
    // templates of up to 512 bytes and 16 segments; the same set as room_paths (room keys on,
    // so a non-sync path is matched twice).
    // Templates are at most 256 bytes (MAX_FIELD_LEN in src/config.rs).
    let literal = "a".repeat(240);
    let stars = "/*".repeat(15);
    let sets: Vec<(&str, Vec<String>, String)> = vec![
        (
            "one long segment, scanned by every template",
            (0..32).map(|i| format!("/*/p{i}/{{a|b}}")).collect(),
            format!("/{}", "x".repeat(MAX_PATH_LEN - 1)),
        ),
        (
            "long literals that agree with the path up to their end",
            (0..32)
                .map(|i| format!("/{literal}{i:02}/{{b|c}}"))
                .collect(),
            format!("/{literal}99/{}", "x".repeat(MAX_PATH_LEN - 244)),
        ),
        (
            "every template walking 16 segments",
            (0..32).map(|i| format!("{stars}/{{a{i}|b{i}}}")).collect(),
            "/x".repeat(MAX_PATH_LEN / 2),
        ),
    ];
    let mut worst = 0;
    for (what, templates, path) in &sets {
        assert!(path.len() <= MAX_PATH_LEN, "{what}");
        let config = json!({
            "sync_paths": templates, "room_paths": templates, "room_header_name": "x-room",
        });
        let (fuel, micros) = cost(&config, path)?;
        println!(
            "{what}: {fuel} fuel, {micros:.1} µs under wasmtime (a plain /sync miss: {plain} fuel)"
        );
        worst = worst.max(fuel);
        // The same set on a path one slash longer than the limit: matched against nothing.
        let (over, _) = cost(&config, &format!("{path}/"))?;
        assert!(over < fuel, "{what}: {over} over the limit vs {fuel}");
    }
    assert!(
        worst <= WORST_FUEL,
        "the worst template set costs {worst} fuel, over the bound of {WORST_FUEL} (a plain \
         /sync miss: {plain})"
    );
    Ok(())
}

/// Guest work allowed per byte of an overlong path, and per request on top. Measured on
/// 2026-12-02 (issue 14's reshape, with the path limit): 16 fuel a byte (1.0 M for 61 KiB),
/// so the bound is about 3x that; matching such a path at all would burn far more.
const FUEL_PER_PATH_BYTE: u64 = 50;
const FUEL_PER_REQUEST: u64 = 100_000;

/// A long hostile path (over the limit, as a client may send) against templates with
/// wildcards costs a bounded amount of guest work per byte: it is read, never matched.
/// (Moved from coalescing.rs, which bounded it by 200 ms of wall-clock time.)
#[test]
fn a_long_hostile_path_costs_no_more_than_reading_it() -> TestResult {
    let (_host, mut vm) = start(
        HostKind::Envoy,
        json!({"sync_paths": ["/_matrix/client/*/sync", "/_matrix/client/{r0|v3}/rooms/*/initialSync"]}),
    )?;
    let hostile = [
        format!("/_matrix/client/{}/sync", "x".repeat(60 * 1024)),
        format!("/_matrix/client/{}", "/sync".repeat(12 * 1024)),
        "/_matrix/client/v3/rooms/".repeat(2500),
    ];
    for path in &hostile {
        let before = vm.fuel_spent();
        let stream = vm.request(&[
            (":method", "GET"),
            (":path", path),
            ("authorization", "Bearer t"),
        ])?;
        let fuel = vm.fuel_spent() - before;
        let bound = FUEL_PER_PATH_BYTE * path.len() as u64 + FUEL_PER_REQUEST;
        assert!(
            fuel <= bound,
            "{} bytes: {fuel} fuel, over {bound}",
            path.len()
        );
        vm.end_stream(stream)?;
    }
    Ok(())
}
