//! No token value ever leaves the filter except in the whoami callout's Authorization header:
//! not in log lines, metric names, shared-data keys or values, other headers, local responses,
//! or the guest's stdout/stderr — neither whole nor any 8-byte piece of one (issue 9), after the
//! bad-input scenarios of issue 9 as well as the ordinary ones.

use std::collections::HashSet;

use proxy_wasm_harness::{CallFailure, Host, Vm};
use serde_json::json;

use crate::common::*;

/// Every token below contains this; finding it anywhere it must not be is a leak.
const MARK: &str = "PRIVACYMARK";

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

/// Length of a token piece that must not appear anywhere.
const GRAM: usize = 8;

/// Every GRAM-byte piece of the tokens used, and whether bytes hold one (or the MARK).
struct Pieces(HashSet<Vec<u8>>);

impl Pieces {
    fn of(tokens: &[Vec<u8>]) -> Pieces {
        Pieces(
            tokens
                .iter()
                .flat_map(|t| t.windows(GRAM).map(<[u8]>::to_vec))
                .collect(),
        )
    }

    fn in_bytes(&self, haystack: &[u8]) -> bool {
        contains(haystack, MARK) || haystack.windows(GRAM).any(|w| self.0.contains(w))
    }

    fn in_text(&self, haystack: &str) -> bool {
        self.in_bytes(haystack.as_bytes())
    }
}

/// Answers every callout still pending with a user.
fn answer_all(vm: &mut Vm) -> TestResult {
    for call in vm.pending_calls() {
        vm.respond(call.token, 200, JSON, &whoami_body("@q:example.org"))?;
    }
    Ok(())
}

/// The bad-input cases of issue 9, each with tokens holding MARK; returns the tokens used.
fn bad_input(vm: &mut Vm, label: &str) -> Result<Vec<Vec<u8>>, Box<dyn std::error::Error>> {
    // Every token made is remembered for the scan.
    let used = std::cell::RefCell::new(Vec::new());
    let t = |name: &str| {
        let token = format!("syt_{MARK}_{name}_{label}");
        used.borrow_mut().push(token.clone().into_bytes());
        token
    };
    let bearer = |name: &str| format!("Bearer {}", t(name));
    let get = |path: String| vec![(":method", "GET".to_string()), (":path", path)];
    let huge = format!("{MARK}-{label}-").repeat(64 * 1024 / (MARK.len() + 4));
    let mut requests: Vec<Vec<(&str, String)>> = vec![
        get(format!("{SYNC_PATH}?access%5Ftoken={}", t("pct5f"))),
        get(format!(
            "{SYNC_PATH}?%61ccess_token={}&access_token={}",
            t("pct61"),
            t("second")
        )),
        get(format!("{SYNC_PATH}?timeout=0;access_token={}", t("semi"))),
        get(format!(
            "{SYNC_PATH}?access_token={}&access_token={}",
            t("twice1"),
            t("twice2")
        )),
        get(format!(
            "{SYNC_PATH}?access_token=&access_token={}",
            t("blankfirst")
        )),
        get(format!("{SYNC_PATH}?access_token={}", t("mixedq"))),
        get(SYNC_PATH.to_string()),
        get(SYNC_PATH.to_string()),
        get(SYNC_PATH.to_string()),
        get(SYNC_PATH.to_string()),
        get(SYNC_PATH.to_string()),
        get(format!("{SYNC_PATH}?access_token={}", t("formq"))),
    ];
    requests[5].push(("authorization", bearer("mixedh")));
    requests[6].extend([
        ("authorization", bearer("rep1")),
        ("Authorization", bearer("rep2")),
    ]);
    requests[7].push(("authorization", format!("Bearer {huge}")));
    requests[8].push(("authorization", "Bearer ".into()));
    // Spoofed hash-key headers holding tokens, in any case, repeated, with and without a token.
    requests[9].extend([
        ("authorization", bearer("spoofed")),
        ("X-User-Identifier", t("inkey1")),
        ("x-user-identifier", t("inkey2")),
    ]);
    requests[10].extend([
        ("X-USER-IDENTIFIER", t("inkey3")),
        ("x-user-identifier", t("inkey4")),
    ]);
    requests[11].push(("content-type", "application/x-www-form-urlencoded".into()));
    requests[11][0].1 = "POST".into();
    for request in &requests {
        let pairs: Vec<(&str, &str)> = request.iter().map(|(n, v)| (*n, v.as_str())).collect();
        vm.request(&pairs)?;
        answer_all(vm)?;
    }
    // Not UTF-8.
    let raw = [b"Bearer ".as_slice(), t("latin").as_bytes(), b"\xe9\xff"].concat();
    let stream = vm.create_stream()?;
    let headers = [
        (b":method".to_vec(), b"GET".to_vec()),
        (b":path".to_vec(), SYNC_PATH.as_bytes().to_vec()),
        (b"authorization".to_vec(), raw),
    ];
    vm.request_headers_bytes(stream, &headers, true)?;
    let mut used = used.into_inner();
    used.push(huge.into_bytes());
    Ok(used)
}

fn exercise(vm: &mut Vm, label: &str) -> Result<Vec<Vec<u8>>, Box<dyn std::error::Error>> {
    let mut used = bad_input(vm, label)?;
    let answers: Vec<(u16, Vec<u8>)> = vec![
        (200, whoami_body("@ok:example.org")),
        (401, br#"{"errcode":"M_UNKNOWN_TOKEN"}"#.to_vec()),
        (403, br#"{"errcode":"M_USER_LOCKED"}"#.to_vec()),
        (429, b"{}".to_vec()),
        (200, b"{\"user_id\":".to_vec()),
        (
            200,
            format!(r#"{{"user_id":"not a user {MARK}"}}"#).into_bytes(),
        ),
        (200, vec![b'x'; 5000]),
    ];
    for (index, (status, body)) in answers.iter().enumerate() {
        let token = format!("syt_{MARK}_{index}_{label}");
        used.push(token.clone().into_bytes());
        let stream = sync(vm, Some(&token))?;
        let call = only_call(vm, stream)?;
        vm.respond(call, *status, JSON, body)?;
        // And once more, served from the cache.
        sync(vm, Some(&token))?;
    }
    for (index, failure) in [
        CallFailure::Connect,
        CallFailure::Timeout,
        CallFailure::Reset,
    ]
    .into_iter()
    .enumerate()
    {
        let token = format!("syt_{MARK}_fail{index}_{label}");
        used.push(token.clone().into_bytes());
        let stream = sync(vm, Some(&token))?;
        let call = only_call(vm, stream)?;
        vm.fail_call(call, failure)?;
    }
    // From the query string, malformed, and a client leaving mid-callout.
    let query = format!("syt_{MARK}_query_{label}");
    vm.request(&[
        (":method", "GET"),
        (":path", &format!("{SYNC_PATH}?access_token={query}")),
    ])?;
    answer_all(vm)?;
    let spaced = format!("syt {MARK} spaced");
    vm.request(&[
        (":method", "GET"),
        (":path", SYNC_PATH),
        ("authorization", &format!("Bearer {spaced}")),
    ])?;
    let gone = format!("syt_{MARK}_gone_{label}");
    let stream = sync(vm, Some(&gone))?;
    vm.end_stream(stream)?;
    used.extend([query, spaced, gone].map(String::into_bytes));
    Ok(used)
}

fn assert_no_leak(host: &Host, vms: &[&Vm], secret: &Pieces) -> TestResult {
    for line in host.logs() {
        assert!(
            !secret.in_text(&line.message),
            "log line leaks a token: {line:?}"
        );
    }
    for metric in host.metrics() {
        assert!(
            !secret.in_text(&metric.name),
            "metric name leaks a token: {metric:?}"
        );
    }
    for entry in host.shared_data() {
        assert!(
            !secret.in_text(&entry.key) && !secret.in_bytes(&entry.value),
            "shared data leaks a token: {entry:?}"
        );
    }
    for vm in vms {
        assert!(!secret.in_text(&vm.stdout()) && !secret.in_text(&vm.stderr()));
        for call in vm.calls() {
            for (name, value) in &call.headers {
                if name != "authorization" {
                    assert!(
                        !secret.in_text(value),
                        "callout header {name} leaks: {value}"
                    );
                }
            }
            assert!(!secret.in_bytes(&call.body), "callout body leaks");
        }
        for stream in 2..1000 {
            let Ok(state) = vm.stream(stream) else {
                continue;
            };
            for (name, value) in state.request_headers.pairs() {
                // The client's own credentials stay where the client put them.
                if name.eq_ignore_ascii_case(b"authorization") || name.as_slice() == b":path" {
                    continue;
                }
                assert!(
                    !secret.in_bytes(value),
                    "request header {} leaks a token",
                    String::from_utf8_lossy(name)
                );
            }
            if let Some(response) = &state.local_response {
                assert!(
                    !secret.in_bytes(&response.body),
                    "local response body leaks"
                );
                for (name, value) in &response.headers {
                    assert!(!secret.in_text(value), "local response header {name} leaks");
                }
            }
        }
    }
    Ok(())
}

#[test]
fn no_token_appears_anywhere_but_the_whoami_authorization() -> TestResult {
    for kind in BOTH {
        for reject in [false, true] {
            let (host, mut vm) = start(kind, json!({"reject_invalid_tokens": reject}))?;
            let mut second = host.start_vm(
                &filter()?,
                &config(kind, json!({"reject_invalid_tokens": reject})),
            )?;
            let mut used = exercise(&mut vm, "a")?;
            used.extend(exercise(&mut second, "b")?);
            assert!(vm.calls().len() > 5, "{kind:?}: the scenario made callouts");
            assert_no_leak(&host, &[&vm, &second], &Pieces::of(&used))
                .map_err(|error| format!("{kind:?} reject={reject}: {error}"))?;
        }
    }
    Ok(())
}
