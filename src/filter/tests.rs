//! The state machine against an in-memory host (the harness under tests/harness covers the
//! compiled module against real host semantics).

use super::*;
use crate::config::Config;
use crate::request::HeaderBlock;
use std::cell::RefCell;
use std::collections::HashMap;

/// A recorded callout: upstream, headers, timeout.
type Call = (String, Vec<(String, String)>, u32);

#[derive(Default)]
struct FakeHost {
    headers: RefCell<Vec<(String, Vec<u8>)>>,
    case_sensitive: bool,
    shared: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    shared_reads: Cell<u32>,
    next_cas: Cell<u32>,
    now: Cell<u64>,
    dispatched: RefCell<Vec<Call>>,
    refuse_dispatch: bool,
    replies: RefCell<Vec<(u16, Vec<u8>)>>,
    resumed: Cell<u32>,
    counts: RefCell<HashMap<&'static str, u32>>,
    rng: Cell<u8>,
}

impl FakeHost {
    fn envoy() -> Self {
        FakeHost {
            now: Cell::new(1_000_000),
            ..Default::default()
        }
    }

    fn request(&self, path: &str, headers: &[(&str, &str)]) {
        let mut h = vec![(":path".to_string(), path.as_bytes().to_vec())];
        for (k, v) in headers {
            let k = if self.case_sensitive {
                k.to_string()
            } else {
                k.to_ascii_lowercase()
            };
            h.push((k, v.as_bytes().to_vec()));
        }
        *self.headers.borrow_mut() = h;
    }

    fn header(&self, name: &str) -> Vec<String> {
        self.headers
            .borrow()
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
            .collect()
    }

    fn count_of(&self, c: Counter) -> u32 {
        self.counts.borrow().get(c.name()).copied().unwrap_or(0)
    }

    fn matches(&self, a: &str, b: &str) -> bool {
        if self.case_sensitive {
            a == b
        } else {
            a.eq_ignore_ascii_case(b)
        }
    }
}

impl Host for FakeHost {
    fn request_headers(&self) -> HeaderBlock {
        let h = self.headers.borrow();
        let pairs: Vec<(&str, &[u8])> = h.iter().map(|(k, v)| (k.as_str(), &v[..])).collect();
        HeaderBlock::serialize(&pairs)
    }
    fn set_request_header(&self, name: &str, value: &[u8]) {
        let mut h = self.headers.borrow_mut();
        match h.iter_mut().find(|(k, _)| self.matches(k, name)) {
            Some(slot) => slot.1 = value.to_vec(),
            None => h.push((name.to_string(), value.to_vec())),
        }
    }
    fn remove_request_header(&self, name: &str) {
        self.headers
            .borrow_mut()
            .retain(|(k, _)| !self.matches(k, name));
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        (path == ["source", "address"]).then(|| b"192.0.2.7:4000".to_vec())
    }
    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, u32) {
        self.shared_reads.set(self.shared_reads.get() + 1);
        match self.shared.borrow().get(key) {
            Some((v, cas)) => (Some(v.clone()), *cas),
            None => (None, 0),
        }
    }
    fn shared_set(&self, key: &str, value: &[u8], cas: u32) -> SetStatus {
        let mut s = self.shared.borrow_mut();
        if let Some((_, current)) = s.get(key) {
            if cas != 0 && cas != *current {
                return SetStatus::CasMismatch;
            }
        }
        self.next_cas.set(self.next_cas.get() + 1);
        s.insert(key.to_string(), (value.to_vec(), self.next_cas.get()));
        SetStatus::Ok
    }
    fn now_ms(&self) -> u64 {
        self.now.get()
    }
    fn random(&self, buf: &mut [u8]) -> bool {
        self.rng.set(self.rng.get().wrapping_add(1));
        buf.fill(self.rng.get());
        true
    }
    fn dispatch(&self, upstream: &str, headers: &[(&str, &str)], timeout_ms: u32) -> bool {
        if self.refuse_dispatch {
            return false;
        }
        let h = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.dispatched
            .borrow_mut()
            .push((upstream.to_string(), h, timeout_ms));
        true
    }
    fn send_response(&self, status: u16, _headers: &[(&str, &str)], body: &[u8]) {
        self.replies.borrow_mut().push((status, body.to_vec()));
    }
    fn resume(&self) {
        self.resumed.set(self.resumed.get() + 1);
    }
    fn count(&self, counter: Counter) {
        *self.counts.borrow_mut().entry(counter.name()).or_default() += 1;
    }
}

const SYNC: &str = "/_matrix/client/v3/sync?timeout=30000";
const ALICE: &[u8] = br#"{"user_id":"@alice:example.org","device_id":"A"}"#;

fn router(host: &FakeHost, json: &str) -> Router {
    Router::new(Config::parse(json.as_bytes()).unwrap(), host).unwrap()
}

/// Sends one request and, if it paused, answers whoami with `answer`.
fn run(
    r: &Router,
    host: &FakeHost,
    headers: &[(&str, &str)],
    answer: Option<(&str, &[u8])>,
) -> Verdict {
    host.request(SYNC, headers);
    let mut phase = Phase::Idle;
    let v = r.on_request_headers(host, &mut phase);
    if v == Verdict::Pause && !matches!(phase, Phase::Idle) {
        let (status, body) = answer.expect("callout made but no answer given");
        r.on_whoami_response(host, &mut phase, Some(status.as_bytes()), Some(body));
    }
    v
}

#[test]
fn non_sync_requests_pass_untouched() {
    let host = FakeHost::envoy();
    let r = router(&host, "");
    host.request(
        "/_matrix/client/v3/rooms/!r:x/messages",
        &[
            ("authorization", "Bearer t"),
            ("x-user-identifier", "spoof"),
        ],
    );
    assert_eq!(
        r.on_request_headers(&host, &mut Phase::Idle),
        Verdict::Continue
    );
    assert_eq!(host.header("x-user-identifier"), vec!["spoof"]);
    assert!(host.dispatched.borrow().is_empty());
    assert_eq!(host.count_of(Counter::Requests), 0);
}

#[test]
fn miss_calls_whoami_then_hit_uses_cache() {
    let host = FakeHost::envoy();
    let r = router(&host, "");
    let auth = [
        ("authorization", "Bearer syt_alice"),
        ("user-agent", "Element"),
    ];
    assert_eq!(run(&r, &host, &auth, Some(("200", ALICE))), Verdict::Pause);
    assert_eq!(host.header("x-user-identifier"), vec!["@alice:example.org"]);
    assert_eq!(host.resumed.get(), 1);
    let calls = host.dispatched.borrow().clone();
    assert_eq!(calls.len(), 1);
    let (upstream, headers, timeout) = &calls[0];
    assert_eq!(upstream, "synapse_whoami");
    assert_eq!(*timeout, 2000);
    assert!(headers.contains(&("authorization".into(), "Bearer syt_alice".into())));
    assert!(headers.contains(&("user-agent".into(), "Element".into())));
    assert!(headers.contains(&("x-forwarded-for".into(), "192.0.2.7".into())));

    // Second request: served from the cache, no callout, no pause.
    assert_eq!(run(&r, &host, &auth, None), Verdict::Continue);
    assert_eq!(host.header("x-user-identifier"), vec!["@alice:example.org"]);
    assert_eq!(host.dispatched.borrow().len(), 1);
    assert_eq!(host.count_of(Counter::CacheHits), 1);
    assert_eq!(host.count_of(Counter::CacheMisses), 1);
    assert_eq!(host.count_of(Counter::WhoamiOk), 1);
}

/// Sends one request and returns its verdict and phase, without answering anything.
fn send(r: &Router, host: &FakeHost, headers: &[(&str, &str)]) -> (Verdict, Phase) {
    host.request(SYNC, headers);
    let mut phase = Phase::Idle;
    let v = r.on_request_headers(host, &mut phase);
    (v, phase)
}

#[test]
fn cache_expires_after_ttl_when_nobody_refreshed_it() {
    let host = FakeHost::envoy();
    let r = router(&host, r#"{"cache_ttl_s":60}"#);
    let auth = [("authorization", "Bearer t")];
    run(&r, &host, &auth, Some(("200", ALICE)));
    // Still fresh: a plain hit.
    host.now.set(host.now.get() + 53_999);
    assert_eq!(run(&r, &host, &auth, None), Verdict::Continue);
    assert_eq!(host.dispatched.borrow().len(), 1);
    host.now.set(host.now.get() + 6_001);
    assert_eq!(run(&r, &host, &auth, Some(("200", ALICE))), Verdict::Pause);
    assert_eq!(host.dispatched.borrow().len(), 2);
}

#[test]
fn an_entry_in_use_is_refreshed_once_before_it_expires() {
    let host = FakeHost::envoy();
    let r = router(&host, r#"{"cache_ttl_s":60}"#);
    let vm2 = router(&host, r#"{"cache_ttl_s":60}"#);
    let auth = [("authorization", "Bearer t"), ("user-agent", "Element")];
    run(&r, &host, &auth, Some(("200", ALICE)));
    // In the last tenth of the TTL: the hit goes on at once and claims the refresh.
    host.now.set(host.now.get() + 54_000);
    let (v, mut refreshing) = send(&r, &host, &auth);
    assert_eq!(v, Verdict::Continue);
    assert_eq!(host.header("x-user-identifier"), vec!["@alice:example.org"]);
    assert!(matches!(refreshing, Phase::Refreshing { .. }));
    assert_eq!(host.dispatched.borrow().len(), 2);
    // Every other request, on any VM, just hits while the refresh is in flight.
    for vm in [&r, &vm2, &r] {
        let (v, phase) = send(vm, &host, &auth);
        assert_eq!(v, Verdict::Continue);
        assert!(matches!(phase, Phase::Idle));
    }
    assert_eq!(host.dispatched.borrow().len(), 2);
    assert_eq!(host.count_of(Counter::Refreshes), 1);
    // The answer extends the entry; the request is not resumed (it never waited).
    r.on_whoami_response(&host, &mut refreshing, Some(b"200"), Some(ALICE));
    assert_eq!(host.resumed.get(), 1);
    host.now.set(host.now.get() + 30_000); // past the first entry's expiry
    assert_eq!(send(&r, &host, &auth).0, Verdict::Continue);
    assert_eq!(host.header("x-user-identifier"), vec!["@alice:example.org"]);
    assert_eq!(host.dispatched.borrow().len(), 2);
}

#[test]
fn a_failed_refresh_keeps_the_entry_and_is_retried_after_its_claim() {
    let host = FakeHost::envoy();
    let r = router(&host, r#"{"cache_ttl_s":60,"whoami_timeout_ms":1000}"#);
    let auth = [("authorization", "Bearer t")];
    run(&r, &host, &auth, Some(("200", ALICE)));
    host.now.set(host.now.get() + 54_000);
    let (_, mut refreshing) = send(&r, &host, &auth);
    r.on_whoami_response(&host, &mut refreshing, Some(b"503"), Some(b""));
    assert_eq!(host.count_of(Counter::WhoamiFailed), 1);
    // Within the claim (timeout + 1 s): hits, no new callout.
    host.now.set(host.now.get() + 1_999);
    assert!(matches!(send(&r, &host, &auth).1, Phase::Idle));
    assert_eq!(host.header("x-user-identifier"), vec!["@alice:example.org"]);
    // The claim lapsed: the next hit refreshes again.
    host.now.set(host.now.get() + 1);
    assert!(matches!(send(&r, &host, &auth).1, Phase::Refreshing { .. }));
    assert_eq!(host.dispatched.borrow().len(), 3);
}

#[test]
fn a_refresh_that_finds_the_token_revoked_caches_it_as_rejected() {
    let host = FakeHost::envoy();
    let r = router(&host, r#"{"cache_ttl_s":60}"#);
    let auth = [("authorization", "Bearer t")];
    run(&r, &host, &auth, Some(("200", ALICE)));
    host.now.set(host.now.get() + 54_000);
    let (_, mut refreshing) = send(&r, &host, &auth);
    let body: &[u8] = br#"{"errcode":"M_UNKNOWN_TOKEN"}"#;
    r.on_whoami_response(&host, &mut refreshing, Some(b"401"), Some(body));
    assert_eq!(send(&r, &host, &auth).0, Verdict::Continue);
    assert!(host.header("x-user-identifier")[0].starts_with('~'));
    assert_eq!(host.count_of(Counter::NegativeHits), 1);
}

#[test]
fn spoofed_header_is_replaced_or_removed() {
    let host = FakeHost::envoy();
    let r = router(&host, "");
    run(
        &r,
        &host,
        &[
            ("authorization", "Bearer t"),
            ("x-user-identifier", "@mallory:x"),
        ],
        Some(("200", ALICE)),
    );
    assert_eq!(host.header("x-user-identifier"), vec!["@alice:example.org"]);
    run(&r, &host, &[("x-user-identifier", "@mallory:x")], None);
    assert!(host.header("x-user-identifier").is_empty());
    assert_eq!(host.count_of(Counter::NoToken), 1);
}

#[test]
fn ngx_removes_every_case_variant() {
    let host = FakeHost {
        case_sensitive: true,
        ..FakeHost::envoy()
    };
    let r = router(
        &host,
        r#"{"proxy":"ngx_wasm_module","whoami_upstream":"127.0.0.1:8008"}"#,
    );
    let spoofed = [
        ("X-User-Identifier", "@mallory:x"),
        ("x-USER-identifier", "@eve:x"),
        ("x-user-identifier", "@trent:x"),
    ];
    run(&r, &host, &spoofed, None);
    assert!(host.header("x-user-identifier").is_empty());

    let mut with_token = spoofed.to_vec();
    with_token.push(("Authorization", "Bearer t"));
    run(&r, &host, &with_token, Some(("200", ALICE)));
    assert_eq!(host.header("x-user-identifier"), vec!["@alice:example.org"]);
    // And on a cache hit.
    run(&r, &host, &with_token, None);
    assert_eq!(host.header("x-user-identifier"), vec!["@alice:example.org"]);
}

#[test]
fn query_token_is_used_and_header_with_query_is_fallback() {
    let host = FakeHost::envoy();
    let r = router(&host, "");
    host.request("/_matrix/client/v3/sync?access_token=%74%6f%6b", &[]);
    let mut phase = Phase::Idle;
    assert_eq!(r.on_request_headers(&host, &mut phase), Verdict::Pause);
    let calls = host.dispatched.borrow().clone();
    assert!(calls[0]
        .1
        .contains(&("authorization".into(), "Bearer tok".into())));
    r.on_whoami_response(&host, &mut phase, Some(b"200"), Some(ALICE));

    host.request(
        "/_matrix/client/v3/sync?access_token=tok",
        &[("authorization", "Bearer other")],
    );
    // Synapse answers 401 "Mixing Authorization headers and access_token query parameters":
    // fallback routing, no callout.
    let mut phase = Phase::Idle;
    assert_eq!(r.on_request_headers(&host, &mut phase), Verdict::Continue);
    assert_eq!(host.dispatched.borrow().len(), 1);
}

#[test]
fn denied_token_is_forwarded_with_fallback_and_cached_negatively() {
    let host = FakeHost::envoy();
    let r = router(&host, r#"{"negative_ttl_s":5}"#);
    let auth = [("authorization", "Bearer bad")];
    let body: &[u8] = br#"{"errcode":"M_UNKNOWN_TOKEN"}"#;
    assert_eq!(run(&r, &host, &auth, Some(("401", body))), Verdict::Pause);
    let key = host.header("x-user-identifier");
    assert_eq!(key.len(), 1);
    assert!(key[0].starts_with('~') && key[0].len() == 17);
    assert!(!key[0].contains("bad"));
    assert_eq!(host.resumed.get(), 1);
    assert!(host.replies.borrow().is_empty());

    // Negative hit: no callout, same fallback key.
    assert_eq!(run(&r, &host, &auth, None), Verdict::Continue);
    assert_eq!(host.header("x-user-identifier"), key);
    assert_eq!(host.count_of(Counter::NegativeHits), 1);
    // After the negative TTL, whoami is asked again.
    host.now.set(host.now.get() + 5_000);
    assert_eq!(run(&r, &host, &auth, Some(("401", body))), Verdict::Pause);
    assert_eq!(host.dispatched.borrow().len(), 2);
}

#[test]
fn reject_mode_answers_at_the_edge() {
    let host = FakeHost::envoy();
    let r = router(&host, r#"{"reject_invalid_tokens":true}"#);
    let auth = [("authorization", "Bearer bad")];
    let body: &[u8] = br#"{"errcode":"M_UNKNOWN_TOKEN","soft_logout":true}"#;
    run(&r, &host, &auth, Some(("401", body)));
    assert_eq!(host.replies.borrow().clone(), vec![(401, body.to_vec())]);
    assert_eq!(host.resumed.get(), 0);
    // Cached: the next one is answered without a callout.
    assert_eq!(run(&r, &host, &auth, None), Verdict::Pause);
    assert_eq!(host.replies.borrow().len(), 2);
    assert_eq!(host.dispatched.borrow().len(), 1);
    assert_eq!(host.count_of(Counter::Rejected), 2);
}

#[test]
fn failures_fail_open_and_back_off() {
    for (status, body) in [
        (Some("503"), &b"upstream connect error"[..]),
        (Some("504"), b"upstream request timeout"),
        (Some("429"), b"{}"),
        (Some("200"), b"not json"),
        (Some("200"), br#"{"user_id":"nope"}"#),
        (None, b""),
    ] {
        let host = FakeHost::envoy();
        let r = router(&host, r#"{"failure_backoff_s":10}"#);
        host.request(SYNC, &[("authorization", "Bearer t")]);
        let mut phase = Phase::Idle;
        assert_eq!(r.on_request_headers(&host, &mut phase), Verdict::Pause);
        r.on_whoami_response(&host, &mut phase, status.map(str::as_bytes), Some(body));
        let key = host.header("x-user-identifier");
        assert!(key[0].starts_with('~'), "{status:?}");
        assert_eq!(host.resumed.get(), 1);
        assert_eq!(host.count_of(Counter::WhoamiFailed), 1);
        // Within the back-off no new callout, same device key.
        assert_eq!(
            run(&r, &host, &[("authorization", "Bearer t")], None),
            Verdict::Continue
        );
        assert_eq!(host.header("x-user-identifier"), key);
        assert_eq!(host.count_of(Counter::BackoffHits), 1);
        host.now.set(host.now.get() + 10_000);
        assert_eq!(
            run(
                &r,
                &host,
                &[("authorization", "Bearer t")],
                Some(("200", ALICE))
            ),
            Verdict::Pause
        );
        assert_eq!(host.header("x-user-identifier"), vec!["@alice:example.org"]);
    }
}

#[test]
fn oversized_body_is_a_failure() {
    let host = FakeHost::envoy();
    let r = router(&host, "");
    host.request(SYNC, &[("authorization", "Bearer t")]);
    let mut phase = Phase::Idle;
    r.on_request_headers(&host, &mut phase);
    r.on_whoami_response(&host, &mut phase, Some(b"200"), None);
    assert_eq!(host.count_of(Counter::WhoamiFailed), 1);
    assert!(host.header("x-user-identifier")[0].starts_with('~'));
}

#[test]
fn refused_dispatch_routes_with_fallback_without_pausing() {
    let host = FakeHost {
        refuse_dispatch: true,
        ..FakeHost::envoy()
    };
    let r = router(&host, "");
    assert_eq!(
        run(&r, &host, &[("authorization", "Bearer t")], None),
        Verdict::Continue
    );
    assert!(host.header("x-user-identifier")[0].starts_with('~'));
    assert_eq!(host.count_of(Counter::WhoamiFailed), 1);
}

#[test]
fn malformed_token_never_reaches_whoami() {
    let host = FakeHost::envoy();
    let r = router(&host, "");
    host.request("/_matrix/client/v3/sync?access_token=a%0d%0ax:y", &[]);
    assert_eq!(
        r.on_request_headers(&host, &mut Phase::Idle),
        Verdict::Continue
    );
    assert!(host.dispatched.borrow().is_empty());
    assert!(host.header("x-user-identifier")[0].starts_with('~'));
}

#[test]
fn token_never_reaches_shared_data() {
    let host = FakeHost::envoy();
    let r = router(&host, r#"{"reject_invalid_tokens":false}"#);
    let token = "syt_c2VjcmV0dXNlcg_SuperSecretRandomPart_1a2b3c";
    run(
        &r,
        &host,
        &[("authorization", &format!("Bearer {token}"))],
        Some(("200", ALICE)),
    );
    for (k, (v, _)) in host.shared.borrow().iter() {
        for w in token.as_bytes().windows(6) {
            assert!(!k.as_bytes().windows(6).any(|x| x == w));
            assert!(!v.windows(6).any(|x| x == w), "token piece in shared data");
        }
    }
}

#[test]
fn vms_share_one_secret_and_one_cache() {
    let host = FakeHost::envoy();
    let vm1 = router(&host, "");
    let vm2 = router(&host, "");
    assert_eq!(vm1.secret.get(), vm2.secret.get());
    run(
        &vm1,
        &host,
        &[("authorization", "Bearer t")],
        Some(("200", ALICE)),
    );
    assert_eq!(
        run(&vm2, &host, &[("authorization", "Bearer t")], None),
        Verdict::Continue
    );
    assert_eq!(host.header("x-user-identifier"), vec!["@alice:example.org"]);
}

#[test]
fn a_vm_with_a_stale_secret_converges_on_its_next_miss() {
    let host = FakeHost::envoy();
    let vm1 = router(&host, "");
    // Another VM overwrote the secret (Envoy's CAS 0 overwrites) after vm1 read it.
    host.shared
        .borrow_mut()
        .insert("msr/secret".into(), (vec![42; 16], 999));
    let vm2 = router(&host, "");
    run(
        &vm2,
        &host,
        &[("authorization", "Bearer t")],
        Some(("200", ALICE)),
    );
    assert_eq!(
        run(&vm1, &host, &[("authorization", "Bearer t")], None),
        Verdict::Continue
    );
    assert_eq!(host.header("x-user-identifier"), vec!["@alice:example.org"]);
    assert_eq!(host.dispatched.borrow().len(), 1);
}

#[test]
fn slot_collision_never_returns_another_users_id() {
    let host = FakeHost::envoy();
    let r = router(&host, r#"{"cache_capacity":1}"#);
    run(
        &r,
        &host,
        &[("authorization", "Bearer a")],
        Some(("200", ALICE)),
    );
    let bob: &[u8] = br#"{"user_id":"@bob:example.org"}"#;
    // Same single slot, other token: a miss, not alice.
    assert_eq!(
        run(
            &r,
            &host,
            &[("authorization", "Bearer b")],
            Some(("200", bob))
        ),
        Verdict::Pause
    );
    assert_eq!(host.header("x-user-identifier"), vec!["@bob:example.org"]);
    assert_eq!(host.shared.borrow().len(), 2); // secret + one slot
}

#[test]
fn store_retries_on_cas_mismatch_and_keeps_a_racing_users_entry() {
    let host = FakeHost::envoy();
    let r = router(&host, "");
    host.request(SYNC, &[("authorization", "Bearer t")]);
    let mut p1 = Phase::Idle;
    let mut p2 = Phase::Idle;
    r.on_request_headers(&host, &mut p1);
    r.on_request_headers(&host, &mut p2);
    r.on_whoami_response(&host, &mut p1, Some(b"200"), Some(ALICE));
    let cas_after_first = host.next_cas.get();
    r.on_whoami_response(&host, &mut p2, Some(b"200"), Some(ALICE));
    // The second answer found alice already stored and did not rewrite the slot.
    assert_eq!(host.next_cas.get(), cas_after_first);
    assert_eq!(host.count_of(Counter::CacheWriteFailures), 0);
}

#[test]
fn unexpected_callout_answer_is_ignored() {
    let host = FakeHost::envoy();
    let r = router(&host, "");
    r.on_whoami_response(&host, &mut Phase::Idle, Some(b"200"), Some(ALICE));
    assert_eq!(host.resumed.get(), 0);
}

#[test]
fn counter_names_are_unique_and_prefixed() {
    let mut names: Vec<_> = Counter::ALL.iter().map(|c| c.name()).collect();
    assert!(names.iter().all(|n| n.starts_with("matrix_sync_router_")));
    names.sort();
    names.dedup();
    assert_eq!(names.len(), Counter::ALL.len());
}

#[test]
fn a_vm_answers_repeat_tokens_from_its_own_memory() {
    let host = FakeHost::envoy();
    let r = router(&host, "");
    let auth = [("authorization", "Bearer t")];
    run(&r, &host, &auth, Some(("200", ALICE)));
    let reads = host.shared_reads.get();
    assert_eq!(run(&r, &host, &auth, None), Verdict::Continue);
    assert_eq!(host.header("x-user-identifier"), vec!["@alice:example.org"]);
    assert_eq!(
        host.shared_reads.get(),
        reads,
        "a repeat hit reads no shared data"
    );
    assert_eq!(host.count_of(Counter::CacheHits), 1);
    // Another VM has no such memory yet: it reads shared data once, then remembers.
    let vm2 = router(&host, "");
    run(&vm2, &host, &auth, None);
    let reads = host.shared_reads.get();
    run(&vm2, &host, &auth, None);
    assert_eq!(host.shared_reads.get(), reads);
}

#[test]
fn two_busy_tokens_sharing_a_first_slot_both_stay_cached() {
    let host = FakeHost::envoy();
    let r = router(&host, r#"{"cache_capacity":64}"#);
    // Two tokens whose first candidate slot is the same.
    let secret = r.secret.get();
    let first = |t: &str| secret.hash(t.as_bytes()).slots(64)[0];
    let tokens: Vec<String> = (0..1000).map(|i| format!("tok{i}")).collect();
    let x = &tokens[0];
    let y = tokens[1..].iter().find(|t| first(t) == first(x)).unwrap();
    let bob: &[u8] = br#"{"user_id":"@bob:example.org"}"#;
    run(
        &r,
        &host,
        &[("authorization", &format!("Bearer {x}"))],
        Some(("200", ALICE)),
    );
    run(
        &r,
        &host,
        &[("authorization", &format!("Bearer {y}"))],
        Some(("200", bob)),
    );
    // A VM without memory of either finds both in shared data: no more whoami calls.
    let vm2 = router(&host, r#"{"cache_capacity":64}"#);
    for _ in 0..3 {
        for (t, user) in [(x, "@alice:example.org"), (y, "@bob:example.org")] {
            let v = run(
                &vm2,
                &host,
                &[("authorization", &format!("Bearer {t}"))],
                None,
            );
            assert_eq!(v, Verdict::Continue);
            assert_eq!(host.header("x-user-identifier"), vec![user]);
        }
    }
    assert_eq!(host.dispatched.borrow().len(), 2);
}

#[test]
fn on_ngx_the_refreshing_request_waits_and_is_resumed_whatever_the_answer() {
    for (status, body) in [("200", ALICE), ("503", &b""[..]), ("401", &b"{}"[..])] {
        let host = FakeHost::envoy();
        let cfg =
            r#"{"proxy":"ngx_wasm_module","whoami_upstream":"127.0.0.1:8008","cache_ttl_s":60}"#;
        let r = router(&host, cfg);
        let auth = [("authorization", "Bearer t")];
        run(&r, &host, &auth, Some(("200", ALICE)));
        host.now.set(host.now.get() + 54_000);
        let (v, mut refreshing) = send(&r, &host, &auth);
        assert_eq!(v, Verdict::Pause, "{status}");
        assert!(matches!(refreshing, Phase::Refreshing { paused: true, .. }));
        // Already routed by the cached user while it waits.
        assert_eq!(host.header("x-user-identifier"), vec!["@alice:example.org"]);
        let resumed = host.resumed.get();
        r.on_whoami_response(&host, &mut refreshing, Some(status.as_bytes()), Some(body));
        assert_eq!(host.resumed.get(), resumed + 1, "{status}");
        assert_eq!(host.header("x-user-identifier"), vec!["@alice:example.org"]);
    }
}
