//! Route metadata and what tokens say by themselves, in the compiled filter under both host
//! profiles: the sync kind (and Envoy's route refresh), room keys, nginx variables, Envoy
//! filter state, appservice masquerading, native Synapse tokens.

use proxy_wasm_harness::{Action, Host, HostKind, Vm};
use serde_json::json;

use crate::common::*;

fn get(
    vm: &mut Vm,
    path: &str,
    token: Option<&str>,
    extra: &[(&str, &str)],
) -> Result<u32, Box<dyn std::error::Error>> {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![
        (":method", "GET"),
        (":path", path),
        (":authority", "m.example.org"),
    ];
    if let Some(auth) = &auth {
        headers.push(("authorization", auth));
    }
    headers.extend_from_slice(extra);
    Ok(vm.request(&headers)?)
}

#[test]
fn envoy_gets_the_sync_kind_header_a_route_refresh_and_filter_state() -> TestResult {
    let (_host, mut vm) = start(
        HostKind::Envoy,
        json!({"sync_kind_header": "x-msr-sync-kind", "filter_state": true}),
    )?;
    let first = get(
        &mut vm,
        "/_matrix/client/v3/sync?timeout=0",
        Some("tok_k"),
        &[("x-msr-sync-kind", "sliding")],
    )?;
    assert_eq!(
        vm.stream(first)?.header("x-msr-sync-kind").as_deref(),
        Some("initial")
    );
    assert_eq!(vm.foreign_calls(), ["clear_route_cache"]);
    let call = only_call(&vm, first)?;
    vm.respond(call, 200, JSON, &whoami_body("@k:example.org"))?;
    let state = vm.stream(first)?;
    assert_eq!(state.property("msr_sync_kind"), Some(&b"initial"[..]));
    assert_eq!(state.property("msr_source"), Some(&b"whoami"[..]));
    let later = get(
        &mut vm,
        "/_matrix/client/v3/sync?since=s1",
        Some("tok_k"),
        &[],
    )?;
    let state = vm.stream(later)?;
    assert_eq!(
        state.header("x-msr-sync-kind").as_deref(),
        Some("incremental")
    );
    assert_eq!(state.property("msr_source"), Some(&b"cache"[..]));
    no_anomalies(&vm)
}

#[test]
fn ngx_gets_variables_and_its_headers_stay_untouched() -> TestResult {
    let profile = profile(HostKind::Ngx)
        .with_ngx_var("msr_user")
        .with_ngx_var("msr_kind")
        .with_ngx_var("msr_room");
    let host = Host::new(profile);
    let cfg = config(
        HostKind::Ngx,
        json!({"nginx_variable": "msr_user", "nginx_sync_kind_variable": "msr_kind",
               "nginx_room_variable": "msr_room"}),
    );
    let mut vm = host.start_vm(&filter()?, &cfg)?;
    let s = get(
        &mut vm,
        "/_matrix/client/v3/sync?since=s1",
        Some("tok_n"),
        &[("X-User-Identifier", "@victim:x")],
    )?;
    let call = only_call(&vm, s)?;
    vm.respond(call, 200, JSON, &whoami_body("@n:example.org"))?;
    let state = vm.stream(s)?;
    assert_eq!(state.property("ngx.msr_user"), Some(&b"@n:example.org"[..]));
    assert_eq!(state.property("ngx.msr_kind"), Some(&b"incremental"[..]));
    assert_eq!(
        state.header("X-User-Identifier").as_deref(),
        Some("@victim:x"),
        "headers untouched"
    );
    // As nginx hands it over: `:path` is its percent-decoded URI.
    let r = get(
        &mut vm,
        "/_matrix/client/v3/rooms/!r:example.org/messages",
        Some("tok_n"),
        &[],
    )?;
    let room = vm.stream(r)?.property("ngx.msr_room").map(<[u8]>::to_vec);
    assert_eq!(room.as_deref(), Some(&b"!r:example.org"[..]));
    assert!(
        vm.foreign_calls().is_empty(),
        "nginx has no route cache to clear"
    );
    no_anomalies(&vm)
}

#[test]
fn room_requests_get_their_room_key_without_a_callout() -> TestResult {
    // Client paths `/rooms/%21abc%3Aexample.org/...` and `/rooms/%21ab%2541%3Aexample.org/...`
    // (Synapse's rooms `!abc:example.org` and `!ab%41:example.org`) as each host hands them to
    // the filter: Envoy unchanged, ngx_wasm_module as nginx's decoded URI (seen on 3bed2783), so
    // the filter decodes only on Envoy and both hosts key the room Synapse serves.
    let send = "/send/m.room.message/t1";
    for (kind, rooms) in [
        (
            HostKind::Envoy,
            ["%21abc%3Aexample.org", "%21ab%2541%3Aexample.org"],
        ),
        (HostKind::Ngx, ["!abc:example.org", "!ab%41:example.org"]),
    ] {
        let (_host, mut vm) = start(kind, json!({"room_header_name": "x-room-identifier"}))?;
        for (room, expected) in rooms.iter().zip(["!abc:example.org", "!ab%41:example.org"]) {
            let r = get(
                &mut vm,
                &format!("/_matrix/client/v3/rooms/{room}{send}"),
                Some("tok_r"),
                &[("x-room-identifier", "!spoof:x")],
            )?;
            let state = vm.stream(r)?;
            assert_eq!(state.last_action(), Some(Action::Continue));
            assert_eq!(
                state.request_headers.get_all("x-room-identifier"),
                [expected],
                "{kind:?} {room}"
            );
        }
        assert!(vm.pending_calls().is_empty());
        no_anomalies(&vm)?;
    }
    Ok(())
}

#[test]
fn a_masquerading_appservice_is_routed_by_the_masqueraded_user() -> TestResult {
    for kind in BOTH {
        let (_host, mut vm) = start(kind, json!({}))?;
        let path = "/_matrix/client/v3/sync?user_id=%40bridged_1%3Aexample.org&since=s";
        let s = get(&mut vm, path, Some("as_token_x"), &[])?;
        let call = vm.pending_calls()[0].clone();
        assert_eq!(
            call.header(":path"),
            Some("/_matrix/client/v3/account/whoami?user_id=%40bridged%5F1%3Aexample%2Eorg")
        );
        vm.respond(
            call.token,
            200,
            JSON,
            &whoami_body("@bridged_1:example.org"),
        )?;
        assert_eq!(
            header_values(&vm, s)?,
            ["@bridged_1:example.org"],
            "{kind:?}"
        );
    }
    Ok(())
}

#[test]
fn native_tokens_need_no_callout_when_the_server_name_is_given() -> TestResult {
    // syt_<base64 "alice">_<20 letters>_<base62 CRC-32>, made as Synapse makes them.
    let token = "syt_YWxpY2U_AbCdEfGhIjKlMnOpQrSt_";
    let crc = {
        let base = &token[..token.len() - 1];
        let mut n = crc32(base.as_bytes());
        let digits = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        let mut out = [b'0'; 6];
        for slot in out.iter_mut().rev() {
            *slot = digits[(n % 62) as usize];
            n /= 62;
        }
        String::from_utf8(out.to_vec())?
    };
    let token = format!("{token}{crc}");
    for kind in BOTH {
        let (_host, mut vm) = start(kind, json!({"native_token_server_name": "example.org"}))?;
        let s = sync(&mut vm, Some(&token))?;
        assert_eq!(header_values(&vm, s)?, ["@alice:example.org"], "{kind:?}");
        assert!(vm.pending_calls().is_empty());
    }
    Ok(())
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

#[test]
fn an_undeclared_nginx_variable_is_reported_naming_the_field() -> TestResult {
    let (host, mut vm) = start(HostKind::Ngx, json!({"nginx_variable": "msr_missing"}))?;
    let s = sync(&mut vm, Some("tok_u"))?;
    let call = only_call(&vm, s)?;
    vm.respond(call, 200, JSON, &whoami_body("@u:example.org"))?;
    assert!(vm.stream(s)?.forwarded());
    let warned = host.logs().iter().any(|l| {
        l.message.contains("field `nginx_variable`") && l.message.contains("$msr_missing")
    });
    assert!(warned, "{:?}", host.logs());
    Ok(())
}
