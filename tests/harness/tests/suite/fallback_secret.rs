//! `fallback_key_secret`: proxy processes (harness hosts with their own shared data and random
//! source) that share it give an unresolved token one fallback key, under either host profile;
//! without it, or with another secret, the keys differ. The shared-data cache stays keyed per
//! process, and the secret shows up nowhere a host can observe.

use proxy_wasm_harness::{CallFailure, Host, HostKind};
use serde_json::json;

use crate::common::*;

const SECRET: &str = "00112233445566778899aabbccddeeff";
const OTHER: &str = "ffeeddccbbaa99887766554433221100";
const TOKEN: &str = "tok_unresolved";

/// What one proxy process shows for a sync with TOKEN whose whoami call fails: the fallback key,
/// the shared-data keys and values it wrote, and everything else observable as text.
struct Seen {
    key: String,
    shared: Vec<(String, Vec<u8>)>,
    observable: String,
}

fn through(
    kind: HostKind,
    seed: u64,
    secret: Option<&str>,
) -> Result<Seen, Box<dyn std::error::Error>> {
    let host = Host::with_seed(profile(kind), seed);
    let extra = secret.map_or(json!({}), |s| json!({ "fallback_key_secret": s }));
    let mut vm = host.start_vm(&filter()?, &config(kind, extra))?;
    let stream = sync(&mut vm, Some(TOKEN))?;
    let call = only_call(&vm, stream)?;
    vm.fail_call(call, CallFailure::Connect)?;
    let keys = header_values(&vm, stream)?;
    if keys.len() != 1 || !is_fallback_key(&keys[0]) {
        return Err(format!("{kind:?}: not one fallback key: {keys:?}").into());
    }
    vm.tick()?;
    no_anomalies(&vm)?;
    let shared: Vec<(String, Vec<u8>)> = host
        .shared_data()
        .into_iter()
        .map(|e| (e.key, e.value))
        .collect();
    let observable = format!(
        "{:?} {:?} {:?} {:?} {:?}",
        host.logs(),
        host.metrics(),
        shared,
        vm.stream(stream)?,
        vm.calls()
    );
    Ok(Seen {
        key: keys[0].clone(),
        shared,
        observable,
    })
}

#[test]
fn processes_sharing_the_secret_agree_on_the_fallback_key() -> TestResult {
    for kind in BOTH {
        let a = through(kind, 1, Some(SECRET))?;
        let b = through(kind, 2, Some(SECRET))?;
        assert_eq!(a.key, b.key, "{kind:?}");
        // Another secret, or none (keyed per process): other keys.
        assert_ne!(through(kind, 1, Some(OTHER))?.key, a.key, "{kind:?}");
        let (own_a, own_b) = (through(kind, 1, None)?, through(kind, 2, None)?);
        assert_ne!(own_a.key, own_b.key, "{kind:?}");
        assert_ne!(own_a.key, a.key, "{kind:?}");
        // The cache is still per process: the two processes' shared data differ (their own
        // random secrets, slots and entry hashes), and the configured secret changes nothing
        // in it.
        assert_ne!(a.shared, b.shared, "{kind:?}");
        assert_eq!(a.shared, own_a.shared, "{kind:?}");
    }
    Ok(())
}

#[test]
fn the_secret_shows_up_nowhere() -> TestResult {
    let raw: Vec<u8> = (0..16).map(|i| (i as u8) * 0x11).collect();
    for kind in BOTH {
        let seen = through(kind, 3, Some(SECRET))?;
        assert!(!seen.observable.contains(SECRET), "{kind:?}");
        assert!(!seen.observable.contains("112233"), "{kind:?}");
        for (key, value) in &seen.shared {
            assert!(
                !value.windows(4).any(|w| raw.windows(4).any(|r| r == w)),
                "{kind:?}: {key}"
            );
        }
    }
    Ok(())
}
