//! The decision engine against an in-memory host with several request contexts and VMs sharing
//! one shared-data store (the harness under tests/harness covers the compiled module against
//! real host semantics).

use super::*;
use crate::config::Config;
use crate::port::HeaderBlock;
use crate::port::{Level, SetStatus};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

const SYNC: &str = "/_matrix/client/v3/sync?since=s1&timeout=30000";
const HEADER: &str = "x-user-identifier";

/// A recorded callout: token, upstream, headers.
type Callout = (u32, String, Vec<(String, String)>);

/// Shared data of one process: value, CAS.
type Shared = Rc<RefCell<HashMap<String, (Vec<u8>, u32)>>>;

#[derive(Default)]
struct Stream {
    headers: Vec<(String, Vec<u8>)>,
    paused: bool,
    resumed: u32,
    reply: Option<(u16, Vec<u8>)>,
    gone: bool,
    vars: HashMap<String, Vec<u8>>,
}

/// One VM's view of its host.
struct FakeHost {
    ngx: bool,
    streams: RefCell<HashMap<ContextId, Stream>>,
    current: Cell<ContextId>,
    shared: Shared,
    shared_reads: Cell<u32>,
    next_cas: Rc<Cell<u32>>,
    now: Rc<Cell<u64>>,
    clock_reads: Cell<u32>,
    calls: RefCell<Vec<Callout>>,
    next_token: Cell<u32>,
    refuse_dispatch: Cell<bool>,
    tick_ms: Cell<u32>,
    counters: RefCell<HashMap<&'static str, u64>>,
    logs: RefCell<Vec<String>>,
    foreign: RefCell<Vec<String>>,
    /// Properties set on each stream (path joined by `.`).
    props: RefCell<Vec<(ContextId, String, Vec<u8>)>>,
}

impl FakeHost {
    fn new(ngx: bool) -> FakeHost {
        FakeHost {
            ngx,
            streams: RefCell::default(),
            current: Cell::new(0),
            shared: Shared::default(),
            shared_reads: Cell::new(0),
            next_cas: Rc::new(Cell::new(0)),
            now: Rc::new(Cell::new(1_000_000)),
            clock_reads: Cell::new(0),
            calls: RefCell::default(),
            next_token: Cell::new(1),
            refuse_dispatch: Cell::new(false),
            tick_ms: Cell::new(0),
            counters: RefCell::default(),
            logs: RefCell::default(),
            foreign: RefCell::default(),
            props: RefCell::default(),
        }
    }

    /// Another VM of the same process (same shared data and clock).
    fn sibling(&self) -> FakeHost {
        let mut h = FakeHost::new(self.ngx);
        h.shared = self.shared.clone();
        h.next_cas = self.next_cas.clone();
        h.now = self.now.clone();
        h.next_token.set(1000);
        h
    }

    fn advance(&self, ms: u64) {
        self.now.set(self.now.get() + ms);
    }

    fn with_stream<R>(&self, id: ContextId, f: impl FnOnce(&mut Stream) -> R) -> R {
        f(self.streams.borrow_mut().entry(id).or_default())
    }

    fn current<R>(&self, f: impl FnOnce(&mut Stream) -> R) -> R {
        self.with_stream(self.current.get(), f)
    }

    fn header(&self, id: ContextId) -> Vec<String> {
        self.with_stream(id, |s| {
            s.headers
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(HEADER))
                .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
                .collect()
        })
    }

    fn key(&self, id: ContextId) -> Option<String> {
        let values = self.header(id);
        assert!(values.len() <= 1, "several keys: {values:?}");
        values.into_iter().next()
    }

    fn counter(&self, c: Counter) -> u64 {
        self.counters.borrow().get(c.name()).copied().unwrap_or(0)
    }

    fn last_call(&self) -> u32 {
        self.calls.borrow().last().unwrap().0
    }

    fn calls_made(&self) -> usize {
        self.calls.borrow().len()
    }
}

impl Host for FakeHost {
    type Bytes = Vec<u8>;

    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        self.current(|s| {
            s.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        })
    }

    fn request_headers(&self) -> HeaderBlock {
        self.current(|s| {
            let pairs: Vec<(&str, &[u8])> = s
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), &v[..]))
                .collect();
            HeaderBlock::serialize(&pairs)
        })
    }

    fn set_request_header(&self, name: &str, value: &[u8]) {
        let ngx = self.ngx;
        self.current(|s| {
            // Envoy replaces every value; this fake ngx replaces only the exact spelling.
            s.headers.retain(|(k, _)| {
                if ngx {
                    k != name
                } else {
                    !k.eq_ignore_ascii_case(name)
                }
            });
            s.headers.push((name.to_string(), value.to_vec()));
        });
    }

    fn remove_request_header(&self, name: &str) {
        let ngx = self.ngx;
        self.current(|s| {
            s.headers.retain(|(k, _)| {
                if ngx {
                    k != name
                } else {
                    !k.eq_ignore_ascii_case(name)
                }
            })
        });
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        (path == ["source", "address"]).then(|| b"192.0.2.7:5555".to_vec())
    }

    fn set_property(&self, path: &[&str], value: &[u8]) -> bool {
        self.props
            .borrow_mut()
            .push((self.current.get(), path.join("."), value.to_vec()));
        match path {
            ["ngx", name] => self.current(|s| {
                s.vars.insert(name.to_string(), value.to_vec());
                true
            }),
            ["msr_source" | "msr_sync_kind"] => !self.ngx,
            _ => false,
        }
    }

    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, u32) {
        self.shared_reads.set(self.shared_reads.get() + 1);
        match self.shared.borrow().get(key) {
            Some((v, cas)) => (Some(v.clone()), *cas),
            None => (None, 0),
        }
    }

    fn shared_set(&self, key: &str, value: &[u8], cas: u32) -> SetStatus {
        let mut shared = self.shared.borrow_mut();
        let current = shared.get(key).map(|(_, c)| *c);
        // ngx_wasm_module semantics (stricter than Envoy's): CAS must match what is there.
        if current.unwrap_or(0) != cas {
            return SetStatus::CasMismatch;
        }
        self.next_cas.set(self.next_cas.get() + 1);
        shared.insert(key.to_string(), (value.to_vec(), self.next_cas.get()));
        SetStatus::Ok
    }

    fn now_ms(&self) -> u64 {
        self.clock_reads.set(self.clock_reads.get() + 1);
        self.now.get()
    }

    fn random(&self, buf: &mut [u8]) -> bool {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (self.next_token.get() as u8)
                .wrapping_mul(31)
                .wrapping_add(i as u8);
        }
        true
    }

    fn dispatch(&self, upstream: &str, headers: &[(&str, &str)], _timeout: u32) -> Option<u32> {
        if self.refuse_dispatch.get() {
            return None;
        }
        let token = self.next_token.get();
        self.next_token.set(token + 1);
        let headers = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.calls
            .borrow_mut()
            .push((token, upstream.to_string(), headers));
        Some(token)
    }

    fn send_response(&self, status: u16, _headers: &[(&str, &str)], body: &[u8]) {
        self.current(|s| s.reply = Some((status, body.to_vec())));
    }

    fn enter(&self, context: ContextId) -> bool {
        assert!(!self.ngx, "ngx_wasm_module cannot switch contexts");
        let alive = self.with_stream(context, |s| !s.gone);
        if alive {
            self.current.set(context);
        }
        alive
    }

    fn resume(&self) {
        self.current(|s| {
            assert!(s.paused, "resumed a request that was not paused");
            s.paused = false;
            s.resumed += 1;
        });
    }

    fn set_tick_period(&self, ms: u32) {
        self.tick_ms.set(ms);
    }

    fn call_foreign(&self, name: &str) -> bool {
        self.foreign.borrow_mut().push(name.to_string());
        !self.ngx
    }

    fn add_to_counter(&self, counter: Counter, delta: u64) {
        *self
            .counters
            .borrow_mut()
            .entry(counter.name())
            .or_default() += delta;
    }

    fn log(&self, _level: Level, message: &str) {
        self.logs.borrow_mut().push(message.to_string());
    }
}

fn router(host: &FakeHost, extra: &str) -> Router {
    let proxy = if host.ngx {
        r#""proxy":"ngx_wasm_module","whoami_upstream":"127.0.0.1:8008""#
    } else {
        r#""proxy":"envoy""#
    };
    let sep = if extra.is_empty() { "" } else { "," };
    let json = format!("{{{proxy}{sep}{extra}}}");
    Router::new(Config::parse(json.as_bytes()).unwrap(), host).unwrap()
}

/// Sends request `id` with `headers` through the engine; its verdict.
fn send(
    r: &mut Router,
    host: &FakeHost,
    id: ContextId,
    path: &str,
    headers: &[(&str, &str)],
) -> Verdict {
    let mut h = vec![(":path".to_string(), path.as_bytes().to_vec())];
    h.extend(
        headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())),
    );
    host.with_stream(id, |s| s.headers = h);
    host.current.set(id);
    let verdict = r.on_request_headers(host, id);
    host.with_stream(id, |s| s.paused = verdict == Verdict::Pause);
    verdict
}

fn sync(r: &mut Router, host: &FakeHost, id: ContextId, token: &str) -> Verdict {
    send(
        r,
        host,
        id,
        SYNC,
        &[("authorization", &format!("Bearer {token}"))],
    )
}

fn answer(r: &mut Router, host: &FakeHost, call: u32, status: u16, body: &str) {
    // Envoy delivers answers on the root context; ngx on the request that made the call.
    if host.ngx {
        let owner = host
            .streams
            .borrow()
            .iter()
            .find(|(_, s)| s.paused)
            .map(|(id, _)| *id);
        host.current.set(owner.unwrap_or(0));
    } else {
        host.current.set(0);
    }
    let status = status.to_string();
    r.on_whoami_response(host, call, Some(status.as_bytes()), Some(body.as_bytes()));
}

fn ok(user: &str) -> String {
    format!(r#"{{"user_id":"{user}","is_guest":false,"device_id":"D"}}"#)
}

/// Resolves `token` to `user` on stream `id` (miss, whoami, answer).
fn resolve(r: &mut Router, host: &FakeHost, id: ContextId, token: &str, user: &str) {
    assert_eq!(sync(r, host, id, token), Verdict::Pause);
    answer(r, host, host.last_call(), 200, &ok(user));
    assert_eq!(host.key(id).as_deref(), Some(user));
}

fn is_fallback(key: &Option<String>) -> bool {
    key.as_deref()
        .is_some_and(|k| k.len() == 17 && k.starts_with('~'))
}

#[test]
fn non_sync_requests_pass_untouched() {
    let host = FakeHost::new(false);
    let mut r = router(&host, "");
    let v = send(
        &mut r,
        &host,
        1,
        "/_matrix/client/v3/rooms/!r:x/messages",
        &[("authorization", "Bearer tok"), (HEADER, "spoof")],
    );
    assert_eq!(v, Verdict::Continue);
    assert_eq!(host.header(1), vec!["spoof"]);
    assert_eq!(host.calls_made(), 0);
    r.on_tick(&host);
    assert_eq!(host.counter(Counter::Requests), 0);
}

#[test]
fn a_miss_calls_whoami_once_then_hits_from_vm_memory() {
    let host = FakeHost::new(false);
    let mut r = router(&host, "");
    send(
        &mut r,
        &host,
        1,
        SYNC,
        &[
            ("authorization", "Bearer syt_a"),
            ("user-agent", "Element/1"),
            (HEADER, "@victim:x"),
        ],
    );
    let calls = host.calls.borrow().clone();
    assert_eq!(calls.len(), 1);
    let (_, upstream, headers) = &calls[0];
    assert_eq!(upstream, "synapse_whoami");
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(get("authorization"), Some("Bearer syt_a"));
    assert_eq!(get("user-agent"), Some("Element/1"));
    assert_eq!(get("x-forwarded-for"), Some("192.0.2.7"));
    answer(&mut r, &host, calls[0].0, 200, &ok("@alice:x"));
    assert_eq!(host.key(1).as_deref(), Some("@alice:x"));
    assert_eq!(host.with_stream(1, |s| s.resumed), 1);
    // Repeat hits: no shared-data read, no clock read, no callout.
    let (reads, clock) = (host.shared_reads.get(), host.clock_reads.get());
    for id in 2..50 {
        assert_eq!(sync(&mut r, &host, id, "syt_a"), Verdict::Continue);
        assert_eq!(host.key(id).as_deref(), Some("@alice:x"));
    }
    assert_eq!(host.shared_reads.get(), reads);
    assert_eq!(host.clock_reads.get(), clock);
    assert_eq!(host.calls_made(), 1);
    // Counted in VM memory, flushed on the tick.
    assert_eq!(host.counter(Counter::Requests), 0);
    r.on_tick(&host);
    assert_eq!(host.counter(Counter::Requests), 49);
    assert_eq!(host.counter(Counter::CacheHits), 48);
    assert_eq!(host.counter(Counter::CacheMisses), 1);
    assert_eq!(host.counter(Counter::WhoamiOk), 1);
}

#[test]
fn concurrent_first_requests_share_one_call_on_envoy() {
    let host = FakeHost::new(false);
    let mut r = router(&host, "");
    for id in 1..=50 {
        assert_eq!(sync(&mut r, &host, id, "syt_new"), Verdict::Pause);
    }
    assert_eq!(host.calls_made(), 1);
    // One waiter went away before the answer.
    host.with_stream(7, |s| s.gone = true);
    answer(&mut r, &host, host.last_call(), 200, &ok("@bob:x"));
    for id in (1..=50).filter(|&id| id != 7) {
        assert_eq!(host.key(id).as_deref(), Some("@bob:x"), "stream {id}");
        assert_eq!(host.with_stream(id, |s| s.resumed), 1);
    }
    assert_eq!(host.with_stream(7, |s| s.resumed), 0);
    r.on_tick(&host);
    assert_eq!(host.counter(Counter::Coalesced), 49);
}

#[test]
fn other_vms_wait_for_the_call_in_flight_and_poll_its_slot() {
    let a_host = FakeHost::new(false);
    let b_host = a_host.sibling();
    let mut a = router(&a_host, "");
    let mut b = router(&b_host, "");
    assert_eq!(sync(&mut a, &a_host, 1, "syt_t"), Verdict::Pause);
    for id in 1..=5 {
        assert_eq!(sync(&mut b, &b_host, id, "syt_t"), Verdict::Pause);
    }
    assert_eq!(b_host.calls_made(), 0, "the other VM must not call whoami");
    assert_eq!(b_host.tick_ms.get(), FAST_TICK_MS);
    b.on_tick(&b_host); // nothing yet: still waiting
    assert_eq!(b_host.with_stream(1, |s| s.resumed), 0);
    answer(&mut a, &a_host, a_host.last_call(), 200, &ok("@carol:x"));
    b_host.advance(FAST_TICK_MS.into());
    b.on_tick(&b_host);
    for id in 1..=5 {
        assert_eq!(b_host.key(id).as_deref(), Some("@carol:x"));
        assert_eq!(b_host.with_stream(id, |s| s.resumed), 1);
    }
    assert_eq!(b_host.tick_ms.get(), TICK_MS);
    // And B now answers from its own memory.
    assert_eq!(sync(&mut b, &b_host, 9, "syt_t"), Verdict::Continue);
    assert_eq!(b_host.key(9).as_deref(), Some("@carol:x"));
}

#[test]
fn watchers_give_up_with_the_fallback_when_the_marker_lapses() {
    let a_host = FakeHost::new(false);
    let b_host = a_host.sibling();
    let mut a = router(&a_host, r#""whoami_timeout_ms":500"#);
    let mut b = router(&b_host, r#""whoami_timeout_ms":500"#);
    sync(&mut a, &a_host, 1, "syt_t");
    sync(&mut b, &b_host, 1, "syt_t");
    b_host.advance(1600);
    b.on_tick(&b_host);
    assert!(is_fallback(&b_host.key(1)));
    assert_eq!(b_host.with_stream(1, |s| s.resumed), 1);
}

#[test]
fn on_ngx_only_the_caller_waits_and_the_others_use_the_fallback() {
    let host = FakeHost::new(true);
    let mut r = router(&host, "");
    assert_eq!(sync(&mut r, &host, 1, "syt_n"), Verdict::Pause);
    for id in 2..=10 {
        assert_eq!(sync(&mut r, &host, id, "syt_n"), Verdict::Continue);
        assert!(is_fallback(&host.key(id)));
    }
    assert_eq!(host.calls_made(), 1);
    answer(&mut r, &host, host.last_call(), 200, &ok("@dan:x"));
    assert_eq!(host.key(1).as_deref(), Some("@dan:x"));
    // A second nginx worker (another VM on the same shm zone) does not call either.
    let other = host.sibling();
    let mut r2 = router(&other, "");
    assert_eq!(sync(&mut r2, &other, 1, "syt_n"), Verdict::Continue);
    assert_eq!(other.key(1).as_deref(), Some("@dan:x"));
    assert_eq!(other.calls_made(), 0);
}

/// The `queued` and `shed` counters after a tick (which flushes them).
fn queued_and_shed(r: &mut Router, host: &FakeHost) -> (u64, u64) {
    r.on_tick(host);
    (host.counter(Counter::Queued), host.counter(Counter::Shed))
}

/// The user of a storm token `syt_u<user>d<device>`.
fn storm_user(headers: &[(String, String)]) -> String {
    let auth = headers.iter().find(|(k, _)| k == "authorization").unwrap();
    let token = auth.1.strip_prefix("Bearer syt_u").unwrap();
    format!("@u{}:x", token.split('d').next().unwrap())
}

#[test]
fn a_cold_start_waits_for_free_call_slots_and_keeps_users_together_on_envoy() {
    let host = FakeHost::new(false);
    let mut r = router(&host, r#""max_whoami_in_flight":8"#);
    // 100 users with 3 devices each, all new, all at once.
    let token = |id: u32| format!("syt_u{}d{}", id % 100, id / 100);
    for id in 0..300 {
        assert_eq!(sync(&mut r, &host, id + 1, &token(id)), Verdict::Pause);
    }
    assert_eq!(host.calls_made(), 8);
    // Each answer frees a call slot for the oldest waiting request; never more than 8 open.
    let mut answered = 0;
    while answered < host.calls_made() {
        let (call, user) = {
            let calls = host.calls.borrow();
            (calls[answered].0, storm_user(&calls[answered].2))
        };
        answer(&mut r, &host, call, 200, &ok(&user));
        answered += 1;
        assert!(host.calls_made() - answered <= 8);
    }
    // One call per token, and every request keyed by its user.
    assert_eq!(host.calls_made(), 300);
    for id in 0..300 {
        assert_eq!(host.key(id + 1), Some(format!("@u{}:x", id % 100)), "{id}");
        assert_eq!(host.with_stream(id + 1, |s| s.resumed), 1);
    }
    assert_eq!(queued_and_shed(&mut r, &host), (292, 0));
}

#[test]
fn requests_waiting_for_a_call_slot_take_the_fallback_key_after_the_timeout() {
    let host = FakeHost::new(false);
    let mut r = router(
        &host,
        r#""max_whoami_in_flight":2,"whoami_timeout_ms":1000"#,
    );
    // A flood of garbage tokens against a whoami that never answers: 2 calls, a bounded queue
    // (1024), and the rest routed by the device at once.
    let mut paused = 0;
    for id in 1..=1500 {
        match sync(&mut r, &host, id, &format!("junk{id}")) {
            Verdict::Pause => paused += 1,
            Verdict::Continue => assert!(is_fallback(&host.key(id)), "{id}"),
        }
    }
    assert_eq!(paused, 2 + 1024);
    assert_eq!(host.calls_made(), 2);
    assert_eq!(host.tick_ms.get(), FAST_TICK_MS);
    host.advance(999);
    r.on_tick(&host);
    assert_eq!(host.key(3), None, "waited less than the callout timeout");
    // At the timeout every waiting request goes on with its fallback key; still 2 calls.
    host.advance(1);
    r.on_tick(&host);
    for id in 3..=1026 {
        assert!(is_fallback(&host.key(id)), "{id}");
        assert_eq!(host.with_stream(id, |s| s.resumed), 1);
    }
    assert_eq!(host.calls_made(), 2);
    r.on_tick(&host);
    assert_eq!(host.counter(Counter::Shed), 1500 - 2);
    assert_eq!(host.tick_ms.get(), TICK_MS);
}

#[test]
fn a_restart_storm_on_ngx_routes_the_excess_by_device_at_once() {
    // ngx_wasm_module cannot resume a request from another one's answer: no queue.
    let host = FakeHost::new(true);
    let mut r = router(&host, r#""max_whoami_in_flight":8"#);
    let mut paused = Vec::new();
    for id in 1..=300 {
        match sync(&mut r, &host, id, &format!("syt_storm{id}")) {
            Verdict::Pause => paused.push(id),
            Verdict::Continue => assert!(is_fallback(&host.key(id)), "stream {id}"),
        }
    }
    assert_eq!(paused.len(), 8);
    assert_eq!(host.calls_made(), 8);
    assert_eq!(queued_and_shed(&mut r, &host), (0, 292));
}

#[test]
fn calls_the_host_never_answers_are_dropped_after_their_deadline() {
    let host = FakeHost::new(false);
    let mut r = router(
        &host,
        r#""whoami_timeout_ms":1000,"max_whoami_in_flight":1"#,
    );
    sync(&mut r, &host, 1, "syt_x");
    sync(&mut r, &host, 2, "syt_x");
    host.advance(2500);
    r.on_tick(&host);
    assert!(is_fallback(&host.key(1)) && is_fallback(&host.key(2)));
    let resumed = |id| host.with_stream(id, |s| s.resumed);
    assert_eq!((resumed(1), resumed(2)), (1, 1));
    // The call no longer counts: the slot is free for a new one.
    let late = host.last_call();
    assert_eq!(sync(&mut r, &host, 3, "syt_y"), Verdict::Pause);
    assert_eq!(host.calls_made(), 2);
    // Its late answer (kept for FORGET_MS) still updates the cache, and resumes nothing on
    // Envoy: its requests went on at the deadline, and request 3 waits for its own call.
    answer(&mut r, &host, late, 200, &ok("@late:x"));
    assert_eq!((resumed(1), resumed(2), resumed(3)), (1, 1, 0));
    assert_eq!(host.key(3), None);
    assert_eq!(sync(&mut r, &host, 4, "syt_x"), Verdict::Continue);
    assert_eq!(host.key(4).as_deref(), Some("@late:x"));
    assert_eq!(host.calls_made(), 2);
    // An answer to a call nobody knows (forgotten, or never made) changes nothing.
    answer(&mut r, &host, 9999, 200, &ok("@nobody:x"));
    assert_eq!((resumed(1), resumed(2), resumed(3)), (1, 1, 0));
}

#[test]
fn on_ngx_a_late_answer_resumes_its_own_request_with_the_user() {
    let host = FakeHost::new(true);
    let mut r = router(&host, r#""whoami_timeout_ms":1000"#);
    assert_eq!(sync(&mut r, &host, 1, "syt_x"), Verdict::Pause);
    host.advance(2500);
    r.on_tick(&host);
    // ngx_wasm_module cannot resume a request from a tick: it keeps waiting for its call,
    // which the host answers (or times out) itself.
    assert_eq!(host.with_stream(1, |s| s.resumed), 0);
    answer(&mut r, &host, host.last_call(), 200, &ok("@late:x"));
    assert_eq!(host.with_stream(1, |s| s.resumed), 1);
    assert_eq!(host.key(1).as_deref(), Some("@late:x"));
}

#[test]
fn rejected_tokens_are_cached_and_answered_the_same_every_time() {
    let host = FakeHost::new(false);
    let mut r = router(&host, r#""reject_invalid_tokens":true"#);
    sync(&mut r, &host, 1, "syt_bad");
    sync(&mut r, &host, 2, "syt_bad");
    let body =
        r#"{"errcode":"M_UNKNOWN_TOKEN","error":"Invalid token syt_bad","soft_logout":true}"#;
    answer(&mut r, &host, host.last_call(), 401, body);
    sync(&mut r, &host, 3, "syt_bad");
    let replies: Vec<_> = (1..=3)
        .map(|id| host.with_stream(id, |s| s.reply.clone()).unwrap())
        .collect();
    assert!(replies.iter().all(|r| r == &replies[0]));
    let (status, body) = &replies[0];
    assert_eq!(*status, 401);
    let text = String::from_utf8(body.clone()).unwrap();
    assert!(text.contains("M_UNKNOWN_TOKEN") && text.contains("soft_logout"));
    assert!(!text.contains("syt_bad"));
    assert!(host
        .shared
        .borrow()
        .values()
        .all(|(v, _)| !v.windows(7).any(|w| w == b"syt_bad")));
    assert_eq!(host.calls_made(), 1);
}

#[test]
fn rejected_tokens_are_forwarded_with_the_fallback_by_default() {
    let host = FakeHost::new(false);
    let mut r = router(&host, "");
    sync(&mut r, &host, 1, "syt_bad");
    answer(
        &mut r,
        &host,
        host.last_call(),
        401,
        r#"{"errcode":"M_UNKNOWN_TOKEN"}"#,
    );
    assert!(is_fallback(&host.key(1)));
    assert_eq!(host.with_stream(1, |s| s.resumed), 1);
    sync(&mut r, &host, 2, "syt_bad");
    assert_eq!(host.key(2), host.key(1));
    assert_eq!(host.calls_made(), 1);
}

#[test]
fn failures_fail_open_and_back_off() {
    let host = FakeHost::new(false);
    let mut r = router(&host, r#""failure_backoff_s":10"#);
    sync(&mut r, &host, 1, "syt_f");
    r.on_whoami_response(&host, host.last_call(), None, None);
    assert!(is_fallback(&host.key(1)));
    sync(&mut r, &host, 2, "syt_f");
    assert_eq!(host.key(2), host.key(1));
    assert_eq!(host.calls_made(), 1);
    host.advance(10_001);
    assert_eq!(sync(&mut r, &host, 3, "syt_f"), Verdict::Pause);
    for (status, body) in [
        (500, "oops".to_string()),
        (429, "{}".to_string()),
        (200, "<html>".to_string()),
        (200, r#"{"user_id":"@a:x\r\nX: y"}"#.to_string()),
        (200, r#"{"user_id":"#.to_string()),
    ] {
        host.advance(10_001);
        let id = 100 + status as u32 + body.len() as u32;
        assert_eq!(
            sync(&mut r, &host, id, "syt_f"),
            Verdict::Pause,
            "{status} {body}"
        );
        answer(&mut r, &host, host.last_call(), status, &body);
        assert!(is_fallback(&host.key(id)), "{status} {body}");
    }
    assert!(!host.logs.borrow().is_empty());
}

#[test]
fn a_refused_dispatch_routes_with_the_fallback_and_warns_once() {
    let host = FakeHost::new(false);
    let mut r = router(&host, "");
    host.refuse_dispatch.set(true);
    for id in 1..=5 {
        assert_eq!(
            sync(&mut r, &host, id, &format!("t{id}")),
            Verdict::Continue
        );
        assert!(is_fallback(&host.key(id)));
    }
    assert_eq!(host.logs.borrow().len(), 1);
}

#[test]
fn an_entry_in_use_is_refreshed_once_in_the_background_on_envoy() {
    let host = FakeHost::new(false);
    let mut r = router(&host, r#""cache_ttl_s":100"#);
    resolve(&mut r, &host, 1, "syt_r", "@r:x");
    host.advance(91_000);
    r.on_tick(&host); // the hit path's clock comes from the tick
    assert_eq!(sync(&mut r, &host, 2, "syt_r"), Verdict::Continue);
    assert_eq!(host.key(2).as_deref(), Some("@r:x"));
    assert_eq!(host.calls_made(), 2);
    assert_eq!(sync(&mut r, &host, 3, "syt_r"), Verdict::Continue);
    assert_eq!(host.calls_made(), 2, "only one request refreshes");
    answer(&mut r, &host, host.last_call(), 200, &ok("@r:x"));
    host.advance(50_000);
    r.on_tick(&host);
    assert_eq!(sync(&mut r, &host, 4, "syt_r"), Verdict::Continue);
    assert_eq!(host.calls_made(), 2, "the refreshed entry lives on");
}

#[test]
fn on_ngx_the_refreshing_request_waits_and_is_resumed() {
    let host = FakeHost::new(true);
    let mut r = router(&host, r#""cache_ttl_s":100"#);
    resolve(&mut r, &host, 1, "syt_r", "@r:x");
    host.advance(91_000);
    r.on_tick(&host);
    assert_eq!(sync(&mut r, &host, 2, "syt_r"), Verdict::Pause);
    assert_eq!(host.key(2).as_deref(), Some("@r:x"));
    r.on_whoami_response(&host, host.last_call(), None, None);
    assert_eq!(host.with_stream(2, |s| s.resumed), 1);
    assert_eq!(host.key(2).as_deref(), Some("@r:x"));
}

#[test]
fn a_refresh_that_finds_the_token_revoked_rejects_it_from_then_on() {
    let host = FakeHost::new(false);
    let mut r = router(&host, r#""cache_ttl_s":100"#);
    resolve(&mut r, &host, 1, "syt_r", "@r:x");
    host.advance(91_000);
    r.on_tick(&host);
    sync(&mut r, &host, 2, "syt_r");
    answer(
        &mut r,
        &host,
        host.last_call(),
        401,
        r#"{"errcode":"M_UNKNOWN_TOKEN"}"#,
    );
    sync(&mut r, &host, 3, "syt_r");
    assert!(is_fallback(&host.key(3)));
}

#[test]
fn no_token_means_no_key_and_client_copies_go() {
    for ngx in [false, true] {
        let host = FakeHost::new(ngx);
        let mut r = router(&host, "");
        send(
            &mut r,
            &host,
            1,
            SYNC,
            &[("X-User-Identifier", "spoof"), (HEADER, "spoof2")],
        );
        assert_eq!(host.header(1), Vec::<String>::new(), "ngx={ngx}");
        send(
            &mut r,
            &host,
            2,
            SYNC,
            &[
                ("X-USER-IDENTIFIER", "spoof"),
                ("authorization", "Bearer a b"),
            ],
        );
        assert!(is_fallback(&host.key(2)), "ngx={ngx}");
    }
}

#[test]
fn the_nginx_variable_carries_the_key_and_headers_stay_untouched() {
    let host = FakeHost::new(true);
    let mut r = router(&host, r#""nginx_variable":"msr_user""#);
    send(
        &mut r,
        &host,
        1,
        SYNC,
        &[("authorization", "Bearer syt_v"), (HEADER, "spoof")],
    );
    answer(&mut r, &host, host.last_call(), 200, &ok("@v:x"));
    let var = host.with_stream(1, |s| s.vars.get("msr_user").cloned());
    assert_eq!(var.as_deref(), Some(&b"@v:x"[..]));
    assert_eq!(host.header(1), vec!["spoof"]);
    send(&mut r, &host, 2, SYNC, &[(HEADER, "spoof")]);
    assert_eq!(host.with_stream(2, |s| s.vars.len()), 0);
}

#[test]
fn query_tokens_are_resolved_too() {
    let host = FakeHost::new(false);
    let mut r = router(&host, "");
    let path = "/_matrix/client/v3/sync?access_token=syt_q&since=1";
    assert_eq!(send(&mut r, &host, 1, path, &[]), Verdict::Pause);
    let calls = host.calls.borrow().clone();
    assert!(calls[0]
        .2
        .contains(&("authorization".into(), "Bearer syt_q".into())));
}

#[test]
fn vms_share_one_secret_and_a_stale_one_converges() {
    let a_host = FakeHost::new(false);
    let b_host = a_host.sibling();
    let mut a = router(&a_host, "");
    resolve(&mut a, &a_host, 1, "syt_s", "@s:x");
    // B started before A's secret existed and made its own; A's won in shared data.
    let mut b = router(&b_host, "");
    b.store
        .replace_secret(crate::cache::Secret::from_bytes(&[9; 16]).unwrap());
    assert_eq!(sync(&mut b, &b_host, 1, "syt_s"), Verdict::Continue);
    assert_eq!(b_host.key(1).as_deref(), Some("@s:x"));
}

#[test]
fn a_corrupt_or_foreign_slot_is_never_trusted_and_gets_repaired() {
    let host = FakeHost::new(false);
    let mut r = router(&host, r#""cache_capacity":1"#);
    resolve(&mut r, &host, 1, "syt_c", "@c:x");
    // Somebody rewrites the slot with an entry for the same token hash but a bad user.
    let key = "msr/0".to_string();
    let mut value = host.shared.borrow()[&key].0.clone();
    let header_len = value.len() - "@c:x".len();
    value.truncate(header_len);
    value.extend_from_slice(b"@c:x\r\nX-Evil: 1");
    let cas = host.shared.borrow()[&key].1;
    host.shared.borrow_mut().insert(key.clone(), (value, cas));
    let mut fresh = router(&host, r#""cache_capacity":1"#); // a VM without the answer in memory
    assert_eq!(sync(&mut fresh, &host, 2, "syt_c"), Verdict::Pause);
    answer(&mut fresh, &host, host.last_call(), 200, &ok("@c:x"));
    let repaired = &host.shared.borrow()[&key].0;
    assert!(repaired.ends_with(b"@c:x") && !repaired.windows(2).any(|w| w == b"\r\n"));
}

#[test]
fn shared_data_never_holds_a_token() {
    let host = FakeHost::new(false);
    let mut r = router(&host, r#""cache_capacity":64"#);
    for i in 0..40 {
        let token = format!("syt_secret{i:04}_tokenvalue");
        resolve(&mut r, &host, i + 1, &token, &format!("@u{i}:x"));
        for (k, (v, _)) in host.shared.borrow().iter() {
            for part in token.as_bytes().windows(8) {
                assert!(!k.as_bytes().windows(8).any(|w| w == part));
                assert!(!v.windows(8).any(|w| w == part));
            }
        }
    }
    assert!(host.shared.borrow().len() <= 65);
}

fn prop(host: &FakeHost, id: ContextId, name: &str) -> Option<String> {
    host.props
        .borrow()
        .iter()
        .rev()
        .find(|(c, n, _)| *c == id && n == name)
        .map(|(_, _, v)| String::from_utf8(v.clone()).unwrap())
}

fn header_of(host: &FakeHost, id: ContextId, name: &str) -> Vec<String> {
    host.with_stream(id, |s| {
        s.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
            .collect()
    })
}

#[test]
fn the_sync_kind_is_set_before_routing_and_envoy_rematches_the_route() {
    let host = FakeHost::new(false);
    let mut r = router(
        &host,
        r#""sync_kind_header":"x-msr-sync-kind","filter_state":true"#,
    );
    for (id, path, kind) in [
        (1, "/_matrix/client/v3/sync?timeout=0", "initial"),
        (
            2,
            "/_matrix/client/v3/sync?since=s1&timeout=0",
            "incremental",
        ),
        (
            3,
            "/_matrix/client/v3/sync?since=s1&full_state=true",
            "initial",
        ),
        (
            4,
            "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync",
            "sliding",
        ),
    ] {
        send(
            &mut r,
            &host,
            id,
            path,
            &[
                ("authorization", "Bearer syt_k"),
                ("x-msr-sync-kind", "sliding"),
            ],
        );
        assert_eq!(
            header_of(&host, id, "x-msr-sync-kind"),
            vec![kind],
            "{path}"
        );
        assert_eq!(prop(&host, id, "msr_sync_kind").as_deref(), Some(kind));
    }
    assert_eq!(host.foreign.borrow().len(), 4);
    assert!(host
        .foreign
        .borrow()
        .iter()
        .all(|f| f == "clear_route_cache"));
    // The key's source: whoami for the first, then the cache; none without a token.
    answer(&mut r, &host, host.last_call(), 200, &ok("@k:x"));
    assert_eq!(prop(&host, 1, "msr_source").as_deref(), Some("whoami"));
    sync(&mut r, &host, 9, "syt_k");
    assert_eq!(prop(&host, 9, "msr_source").as_deref(), Some("cache"));
    send(&mut r, &host, 10, SYNC, &[]);
    assert_eq!(prop(&host, 10, "msr_source").as_deref(), Some("none"));
}

#[test]
fn with_every_option_off_no_metadata_call_is_made() {
    let host = FakeHost::new(false);
    let mut r = router(&host, "");
    resolve(&mut r, &host, 1, "syt_o", "@o:x");
    sync(&mut r, &host, 2, "syt_o");
    send(
        &mut r,
        &host,
        3,
        "/_matrix/client/v3/rooms/!r:x/messages",
        &[("authorization", "Bearer syt_o")],
    );
    assert!(host.foreign.borrow().is_empty());
    assert!(host.props.borrow().is_empty());
    assert!(header_of(&host, 3, "x-room-identifier").is_empty());
}

#[test]
fn room_requests_get_the_room_id_as_key_without_a_callout() {
    let host = FakeHost::new(false);
    let mut r = router(&host, r#""room_header_name":"x-room-identifier""#);
    send(
        &mut r,
        &host,
        1,
        "/_matrix/client/v3/rooms/%21abc%3Aexample.org/messages?dir=b",
        &[
            ("authorization", "Bearer syt_room"),
            ("x-room-identifier", "!spoof:x"),
        ],
    );
    assert_eq!(
        header_of(&host, 1, "x-room-identifier"),
        vec!["!abc:example.org"]
    );
    send(
        &mut r,
        &host,
        2,
        "/_matrix/client/v3/rooms/%23alias%3Ax/messages",
        &[("x-room-identifier", "!spoof:x")],
    );
    assert!(header_of(&host, 2, "x-room-identifier").is_empty());
    send(
        &mut r,
        &host,
        3,
        "/_matrix/client/v3/profile/@a:x",
        &[("x-room-identifier", "!spoof:x")],
    );
    assert_eq!(
        header_of(&host, 3, "x-room-identifier"),
        vec!["!spoof:x"],
        "not a room path: untouched"
    );
    assert_eq!(host.calls_made(), 0);
    // On nginx the room goes into a variable.
    let ngx = FakeHost::new(true);
    let mut r = router(&ngx, r#""nginx_room_variable":"msr_room""#);
    send(
        &mut r,
        &ngx,
        1,
        "/_matrix/client/v3/rooms/!r:x/send/m.room.message/t1",
        &[],
    );
    assert_eq!(
        ngx.with_stream(1, |s| s.vars.get("msr_room").cloned())
            .as_deref(),
        Some(&b"!r:x"[..])
    );
}

#[test]
fn a_masquerading_appservice_is_resolved_per_masqueraded_user() {
    let host = FakeHost::new(false);
    let mut r = router(&host, "");
    let path = |u: &str| format!("/_matrix/client/v3/sync?user_id={u}&since=s1");
    send(
        &mut r,
        &host,
        1,
        &path("%40irc_a%3Ax"),
        &[("authorization", "Bearer as_token")],
    );
    let whoami_path = host.calls.borrow()[0]
        .2
        .iter()
        .find(|(k, _)| k == ":path")
        .map(|(_, v)| v.clone());
    assert_eq!(
        whoami_path.as_deref(),
        Some("/_matrix/client/v3/account/whoami?user_id=%40irc%5Fa%3Ax")
    );
    answer(&mut r, &host, host.last_call(), 200, &ok("@irc_a:x"));
    assert_eq!(host.key(1).as_deref(), Some("@irc_a:x"));
    // Another masqueraded user of the same token is another entry; the first one is cached.
    assert_eq!(
        send(
            &mut r,
            &host,
            2,
            &path("%40irc_b%3Ax"),
            &[("authorization", "Bearer as_token")]
        ),
        Verdict::Pause
    );
    answer(&mut r, &host, host.last_call(), 200, &ok("@irc_b:x"));
    assert_eq!(host.key(2).as_deref(), Some("@irc_b:x"));
    assert_eq!(
        send(
            &mut r,
            &host,
            3,
            &path("%40irc_a%3Ax"),
            &[("authorization", "Bearer as_token")]
        ),
        Verdict::Continue
    );
    assert_eq!(host.key(3).as_deref(), Some("@irc_a:x"));
    // Without user_id: the appservice's own user; a user_id that is no user ID is ignored.
    assert_eq!(sync(&mut r, &host, 4, "as_token"), Verdict::Pause);
    let bad = send(
        &mut r,
        &host,
        5,
        "/_matrix/client/v3/sync?user_id=nobody",
        &[("authorization", "Bearer as_token")],
    );
    assert_eq!(bad, Verdict::Pause, "joins the plain token's call");
    assert_eq!(host.calls_made(), 3);
}

#[test]
fn native_tokens_are_routed_without_a_callout_and_junk_never_trusted() {
    use base64::Engine;
    let host = FakeHost::new(false);
    let mut r = router(&host, r#""native_token_server_name":"example.org""#);
    let b64 = base64::engine::general_purpose::STANDARD_NO_PAD.encode("alice");
    let base = format!("syt_{b64}_AbCdEfGhIjKlMnOpQrSt");
    let crc = crate::tokens::crc32(base.as_bytes());
    let digits = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut n = crc;
    let mut crc_text = Vec::new();
    for _ in 0..6 {
        crc_text.push(digits[(n % 62) as usize]);
        n /= 62;
    }
    crc_text.reverse();
    let token = format!("{base}_{}", String::from_utf8(crc_text).unwrap());
    assert_eq!(sync(&mut r, &host, 1, &token), Verdict::Continue);
    assert_eq!(host.key(1).as_deref(), Some("@alice:example.org"));
    let junk = format!("{}X", &token[..token.len() - 1]);
    assert_eq!(sync(&mut r, &host, 2, &junk), Verdict::Continue);
    assert!(is_fallback(&host.key(2)));
    assert_eq!(host.calls_made(), 0);
    // Other tokens still ask whoami.
    assert_eq!(
        sync(
            &mut r,
            &host,
            3,
            "mat_kkLSacJDpek22jKWw4AcXG68b7U3W6_0Lg9yb"
        ),
        Verdict::Pause
    );
}

#[test]
fn mas_tokens_with_a_broken_checksum_cost_no_callout_when_asked() {
    let host = FakeHost::new(false);
    let mut r = router(&host, r#""refuse_bad_mas_tokens":true"#);
    assert_eq!(
        sync(
            &mut r,
            &host,
            1,
            "mat_kkLSacJDpek22jKWw4AcXG68b7U3W6_0Lg9yX"
        ),
        Verdict::Continue
    );
    assert!(is_fallback(&host.key(1)));
    assert_eq!(
        sync(
            &mut r,
            &host,
            2,
            "mat_kkLSacJDpek22jKWw4AcXG68b7U3W6_0Lg9yb"
        ),
        Verdict::Pause
    );
    assert_eq!(host.calls_made(), 1);
}

#[test]
fn trusting_the_route_match_skips_the_path_for_bearer_tokens_only() {
    let host = FakeHost::new(false);
    let mut r = router(
        &host,
        r#""trust_route_match":true,"appservice_masquerading":false"#,
    );
    assert!(r.requests.path_unneeded);
    // No :path at all: the Bearer token is resolved all the same.
    host.with_stream(1, |s| {
        s.headers = vec![("authorization".into(), b"Bearer syt_t".to_vec())]
    });
    host.current.set(1);
    assert_eq!(r.on_request_headers(&host, 1), Verdict::Pause);
    host.with_stream(1, |s| s.paused = true);
    answer(&mut r, &host, host.last_call(), 200, &ok("@t:x"));
    assert_eq!(host.key(1).as_deref(), Some("@t:x"));
    // A query token still needs the path (and the sync-path check).
    let q = "/_matrix/client/v3/sync?access_token=syt_q";
    assert_eq!(send(&mut r, &host, 2, q, &[]), Verdict::Pause);
    assert_eq!(
        send(&mut r, &host, 3, "/other?access_token=syt_q", &[]),
        Verdict::Continue
    );
    // Any option that needs the path turns the shortcut off.
    let host = FakeHost::new(false);
    let r = router(&host, r#""trust_route_match":true"#);
    assert!(!r.requests.path_unneeded, "masquerading needs the query");
}
