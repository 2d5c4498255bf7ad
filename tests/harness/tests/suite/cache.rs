//! The shared cache: its bound, slot collisions, several VMs, CAS races, and ngx_wasm_module's
//! evicting, CRC-32-keyed zones.

use std::error::Error;

use proxy_wasm_harness::{Action, Eviction, Host, HostKind, Profile, Rng, SharedData, Vm};
use serde_json::json;

use crate::common::*;

fn token_of(index: u64) -> String {
    let mut mix = Rng::new(index);
    format!("syt_dXNlcg_{index:x}_{:016x}", mix.next_u64())
}

fn user_of(index: u64) -> String {
    format!("@u{index}:example.org")
}

/// One request with `token`: the header must be `user` whether it came from the cache or from
/// whoami. Returns true for a cache hit.
fn check(vm: &mut Vm, token: &str, user: &str) -> Result<bool, Box<dyn Error>> {
    let stream = sync(vm, Some(token))?;
    let hit = vm.stream(stream)?.last_action() == Some(Action::Continue);
    if !hit {
        let call = only_call(vm, stream)?;
        vm.respond(call, 200, JSON, &whoami_body(user))?;
    }
    let values = header_values(vm, stream)?;
    if values != [user] {
        return Err(
            format!("token {token} (hit: {hit}) routed as {values:?}, expected {user}").into(),
        );
    }
    vm.end_stream(stream)?;
    Ok(hit)
}

/// Keys the filter may hold: `<prefix>/secret` and `<prefix>/<slot>` with slot < capacity.
fn only_slot_keys(host: &Host, capacity: u64) -> Result<(), Box<dyn Error>> {
    for entry in host.shared_data() {
        let Some(rest) = entry.key.strip_prefix("msr/") else {
            return Err(format!("unexpected shared-data key {:?}", entry.key).into());
        };
        let slot_ok = rest.parse::<u64>().is_ok_and(|slot| slot < capacity);
        if rest != "secret" && !slot_ok {
            return Err(format!("unexpected shared-data key {:?}", entry.key).into());
        }
    }
    Ok(())
}

/// `tokens` distinct tokens, each asked once, with an earlier token asked again every fourth
/// request: shared data never holds more than `capacity + 1` keys, and no request is ever routed
/// as another token's user.
fn bounded_and_never_wrong(
    host: &Host,
    kind: HostKind,
    capacity: u64,
    tokens: u64,
) -> Result<u64, Box<dyn Error>> {
    let mut vm = host.start_vm(
        &filter()?,
        &config(kind, json!({"cache_capacity": capacity})),
    )?;
    let mut rng = Rng::new(capacity ^ tokens);
    let mut hits = 0;
    for index in 0..tokens {
        check(&mut vm, &token_of(index), &user_of(index))?;
        if index % 4 == 3 {
            let earlier = rng.below(index);
            hits += u64::from(check(&mut vm, &token_of(earlier), &user_of(earlier))?);
        }
        let keys = host.shared_data_len() as u64;
        if keys > capacity + 1 {
            return Err(format!("{kind:?}: {keys} shared-data keys after {index} tokens").into());
        }
        if index % 1024 == 0 {
            vm.forget_ended_streams();
            vm.clear_call_history();
        }
    }
    assert!(host.shared_stats().max_keys as u64 <= capacity + 1);
    only_slot_keys(host, capacity)?;
    no_anomalies(&vm)?;
    Ok(hits)
}

#[test]
fn envoy_100k_tokens_stay_within_capacity_and_never_get_another_users_key() -> TestResult {
    let host = Host::new(profile(HostKind::Envoy));
    let hits = bounded_and_never_wrong(&host, HostKind::Envoy, 4096, 100_000)?;
    // Some re-asked tokens were still cached: the cache works under churn.
    assert!(hits > 0);
    Ok(())
}

#[test]
fn ngx_100k_tokens_stay_within_capacity_and_never_get_another_users_key() -> TestResult {
    let host = Host::new(profile(HostKind::Ngx));
    let hits = bounded_and_never_wrong(&host, HostKind::Ngx, 4096, 100_000)?;
    assert!(hits > 0);
    Ok(())
}

#[test]
fn ngx_crc32_key_collisions_never_return_another_users_key() -> TestResult {
    // Only 6 bits of key identity: `msr/secret` and slot keys collide all the time, as they may
    // (rarely) under the real CRC-32.
    let host = Host::new(profile(HostKind::Ngx).with_key_hash_bits(6));
    bounded_and_never_wrong(&host, HostKind::Ngx, 1000, 5_000)?;
    Ok(())
}

#[test]
fn ngx_an_evicting_zone_smaller_than_the_cache_stays_correct() -> TestResult {
    // The zone holds 40 keys, the cache wants 200 slots and the secret: the zone evicts (even
    // the secret), the filter re-creates what it needs and never routes a token wrongly.
    let host =
        Host::new(Profile::ngx("matrix-sync-router").with_zone("msr", Some(40), Eviction::Lru));
    bounded_and_never_wrong(&host, HostKind::Ngx, 200, 5_000)?;
    assert!(host.shared_stats().evictions > 0);
    assert!(host.shared_data_len() <= 40);
    Ok(())
}

#[test]
fn a_second_vm_sees_the_first_vms_cache_entry() -> TestResult {
    for kind in BOTH {
        let (host, mut first) = start(kind, json!({}))?;
        resolve(&mut first, "tok_shared", "@jo:example.org")?;
        let mut second = host.start_vm(&filter()?, &config(kind, json!({})))?;
        let stream = sync(&mut second, Some("tok_shared"))?;
        assert_eq!(
            second.stream(stream)?.last_action(),
            Some(Action::Continue),
            "{kind:?}"
        );
        assert_eq!(header_values(&second, stream)?, ["@jo:example.org"]);
        assert!(
            second.calls().is_empty(),
            "{kind:?}: no callout from the second VM"
        );
    }
    Ok(())
}

/// Runs `write` (one VM's whoami answer) as if `interloper` (another VM's answer, run first
/// here) had landed between its read and its write: the interloper's shared-data writes are
/// recorded, undone, and replayed just before the first write of `write`.
fn interleave(
    host: &Host,
    interloper: impl FnOnce() -> Result<(), Box<dyn Error>>,
    write: impl FnOnce() -> Result<(), Box<dyn Error>>,
) -> TestResult {
    let before = host.snapshot_shared();
    interloper()?;
    let after = host.snapshot_shared();
    host.restore_shared(before);
    let mut replay = Some(after);
    host.on_guest_set(move |_, store: &mut SharedData| {
        if let Some(after) = replay.take() {
            *store = after;
        }
    });
    let result = write();
    host.clear_guest_set_hook();
    result
}

#[test]
fn two_vms_racing_on_one_slot_both_end_correct() -> TestResult {
    for kind in BOTH {
        // One slot: every token shares it.
        let (host, mut a) = start(kind, json!({"cache_capacity": 1}))?;
        let mut b = host.start_vm(&filter()?, &config(kind, json!({"cache_capacity": 1})))?;
        // The slot holds an entry, so A's write carries a real CAS.
        resolve(&mut a, "tok_zero", "@zero:example.org")?;
        let stream_a = sync(&mut a, Some("tok_one"))?;
        let stream_b = sync(&mut b, Some("tok_two"))?;
        let call_a = only_call(&a, stream_a)?;
        let call_b = only_call(&b, stream_b)?;
        let mismatches = host.shared_stats().cas_mismatches;
        interleave(
            &host,
            || Ok(b.respond(call_b, 200, JSON, &whoami_body("@two:example.org"))?),
            || Ok(a.respond(call_a, 200, JSON, &whoami_body("@one:example.org"))?),
        )?;
        assert!(
            host.shared_stats().cas_mismatches > mismatches,
            "{kind:?}: A's write must have hit B's"
        );
        assert_eq!(
            header_values(&a, stream_a)?,
            ["@one:example.org"],
            "{kind:?}"
        );
        assert_eq!(
            header_values(&b, stream_b)?,
            ["@two:example.org"],
            "{kind:?}"
        );
        assert_eq!(
            metric(&mut [&mut a, &mut b], "cache_write_failures"),
            0,
            "{kind:?}"
        );
        // Whoever holds the slot now, every token still routes to its own user from either VM.
        for vm in [&mut a, &mut b] {
            check(vm, "tok_one", "@one:example.org")?;
            check(vm, "tok_two", "@two:example.org")?;
            check(vm, "tok_zero", "@zero:example.org")?;
        }
        no_anomalies(&a)?;
        no_anomalies(&b)?;
    }
    Ok(())
}

#[test]
fn two_vms_resolving_the_same_token_at_once_agree() -> TestResult {
    for kind in BOTH {
        let (host, mut a) = start(kind, json!({}))?;
        let mut b = host.start_vm(&filter()?, &config(kind, json!({})))?;
        let stream_a = sync(&mut a, Some("tok_same"))?;
        let stream_b = sync(&mut b, Some("tok_same"))?;
        // A's in-flight marker keeps B from calling too.
        let call_a = only_call(&a, stream_a)?;
        assert!(b.pending_calls().is_empty(), "{kind:?}");
        a.respond(call_a, 200, JSON, &whoami_body("@kim:example.org"))?;
        assert_eq!(header_values(&a, stream_a)?, ["@kim:example.org"]);
        match kind {
            // Envoy: B waits and reads A's answer from the slot on its next (fast) tick.
            HostKind::Envoy => {
                assert_eq!(b.tick_period_ms(), 20);
                assert!(!b.stream(stream_b)?.resumed());
                host.advance(std::time::Duration::from_millis(20));
                b.tick()?;
                assert!(b.stream(stream_b)?.resumed());
                assert_eq!(header_values(&b, stream_b)?, ["@kim:example.org"]);
            }
            // ngx_wasm_module cannot resume B from a tick: it went on with the fallback key.
            HostKind::Ngx => {
                assert!(is_fallback_key(&header_values(&b, stream_b)?[0]));
            }
        }
        assert!(
            check(&mut a, "tok_same", "@kim:example.org")?,
            "{kind:?}: cached"
        );
        assert!(
            check(&mut b, "tok_same", "@kim:example.org")?,
            "{kind:?}: cached"
        );
        assert_eq!(metric(&mut [&mut a, &mut b], "cache_write_failures"), 0);
    }
    Ok(())
}

#[test]
fn a_cache_write_that_keeps_losing_is_given_up_and_the_request_still_routes() -> TestResult {
    for kind in BOTH {
        // One slot, already holding an entry: every read hands out a real CAS (in Envoy, a
        // write with CAS 0 after reading an absent key simply overwrites).
        let (host, mut vm) = start(kind, json!({"cache_capacity": 1}))?;
        resolve(&mut vm, "tok_before", "@kai:example.org")?;
        let stream = sync(&mut vm, Some("tok_contended"))?;
        let call = only_call(&vm, stream)?;
        // Another worker writes the slot before every one of this VM's writes.
        host.on_guest_set(|attempt, store: &mut SharedData| {
            let _ = store.put(&attempt.key, b"another worker's entry");
        });
        vm.respond(call, 200, JSON, &whoami_body("@lee:example.org"))?;
        host.clear_guest_set_hook();
        assert_eq!(
            header_values(&vm, stream)?,
            ["@lee:example.org"],
            "{kind:?}"
        );
        assert!(vm.stream(stream)?.resumed());
        assert_eq!(
            metric(&mut [&mut vm], "cache_write_failures"),
            1,
            "{kind:?}"
        );
    }
    Ok(())
}

#[test]
fn vms_that_raced_to_create_the_secret_converge() -> TestResult {
    for kind in BOTH {
        let host = Host::with_seed(profile(kind), 7);
        let config = config(kind, json!({}));
        // B creates its secret; then A starts as if it had read "no secret" before B wrote.
        let empty = host.snapshot_shared();
        let mut b = host.start_vm(&filter()?, &config)?;
        let with_b = host.snapshot_shared();
        host.restore_shared(empty);
        let mut replay = Some(with_b);
        host.on_guest_set(move |_, store: &mut SharedData| {
            if let Some(with_b) = replay.take() {
                *store = with_b;
            }
        });
        let mut a = host.start_vm(&filter()?, &config)?;
        host.clear_guest_set_hook();
        // Whatever secret each ended with, a user resolved by one VM is found by the other.
        resolve(&mut b, "tok_secret", "@max:example.org")?;
        assert!(
            check(&mut a, "tok_secret", "@max:example.org")?,
            "{kind:?}: A finds B's entry"
        );
        resolve(&mut a, "tok_secret_2", "@nia:example.org")?;
        assert!(
            check(&mut b, "tok_secret_2", "@nia:example.org")?,
            "{kind:?}: B finds A's entry"
        );
        let fallback_a = {
            let stream = sync(&mut a, Some("tok_fallback"))?;
            let call = only_call(&a, stream)?;
            a.fail_call(call, proxy_wasm_harness::CallFailure::Timeout)?;
            header_values(&a, stream)?
        };
        let stream = sync(&mut b, Some("tok_fallback"))?;
        assert_eq!(
            header_values(&b, stream)?,
            fallback_a,
            "{kind:?}: one fallback key"
        );
    }
    Ok(())
}

#[test]
#[ignore = "a few minutes: `just harness-long` (CI runs the 100k versions above)"]
fn a_million_tokens_stay_within_capacity_and_never_get_another_users_key() -> TestResult {
    for kind in BOTH {
        let host = Host::new(profile(kind));
        bounded_and_never_wrong(&host, kind, 4096, 1_000_000)?;
    }
    Ok(())
}
