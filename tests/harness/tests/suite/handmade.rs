//! The harness itself, on tiny hand-assembled modules: a missing import is a load error naming
//! it, a guest trap or endless loop is a test-visible error (and fails the VM), and a host call
//! ngx_wasm_module does not implement traps there but not in Envoy.

use proxy_wasm_harness::util::encode_map;
use proxy_wasm_harness::{Action, Filter, HarnessError, Host, HostKind, Profile};

use crate::common::TestResult;

const I32: u8 = 0x7f;

fn leb(mut value: u32, out: &mut Vec<u8>) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// `i32.const value` (signed LEB128).
fn i32_const(value: u32) -> Vec<u8> {
    let mut out = vec![0x41];
    let mut value = value as i32;
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        let done = (value == 0 && byte & 0x40 == 0) || (value == -1 && byte & 0x40 != 0);
        out.push(if done { byte } else { byte | 0x80 });
        if done {
            return out;
        }
    }
}

fn name(text: &str, out: &mut Vec<u8>) {
    leb(text.len() as u32, out);
    out.extend_from_slice(text.as_bytes());
}

fn section(id: u8, body: Vec<u8>, out: &mut Vec<u8>) {
    out.push(id);
    leb(body.len() as u32, out);
    out.extend(body);
}

/// A module with one memory, the given imported functions, and exported functions whose bodies
/// are raw instructions (without locals or the final `end`).
struct Wasm {
    types: Vec<(Vec<u8>, Vec<u8>)>,
    imports: Vec<(&'static str, &'static str, usize)>,
    functions: Vec<(&'static str, usize, Vec<u8>)>,
    data: Vec<(u32, Vec<u8>)>,
}

impl Wasm {
    fn new() -> Wasm {
        Wasm {
            types: Vec::new(),
            imports: Vec::new(),
            functions: Vec::new(),
            data: Vec::new(),
        }
    }

    fn ty(&mut self, params: &[u8], results: &[u8]) -> usize {
        self.types.push((params.to_vec(), results.to_vec()));
        self.types.len() - 1
    }

    fn import(
        mut self,
        module: &'static str,
        field: &'static str,
        params: &[u8],
        results: &[u8],
    ) -> Wasm {
        let ty = self.ty(params, results);
        self.imports.push((module, field, ty));
        self
    }

    fn export(mut self, field: &'static str, params: &[u8], results: &[u8], code: &[u8]) -> Wasm {
        let ty = self.ty(params, results);
        self.functions.push((field, ty, code.to_vec()));
        self
    }

    /// Bytes placed in memory at `offset` when the module is instantiated.
    fn data(mut self, offset: u32, bytes: &[u8]) -> Wasm {
        self.data.push((offset, bytes.to_vec()));
        self
    }

    /// A proxy-wasm skeleton: ABI marker, allocator, root callbacks that accept everything.
    fn proxy() -> Wasm {
        Wasm::new()
            .export("proxy_abi_version_0_2_1", &[], &[], &[])
            // Allocations all land at 1024: enough for these modules.
            .export(
                "proxy_on_memory_allocate",
                &[I32],
                &[I32],
                &[0x41, 0x80, 0x08],
            )
            .export("proxy_on_context_create", &[I32, I32], &[], &[])
            .export("proxy_on_vm_start", &[I32, I32], &[I32], &[0x41, 0x01])
            .export("proxy_on_configure", &[I32, I32], &[I32], &[0x41, 0x01])
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = b"\0asm\x01\0\0\0".to_vec();
        let mut types = Vec::new();
        leb(self.types.len() as u32, &mut types);
        for (params, results) in &self.types {
            types.push(0x60);
            leb(params.len() as u32, &mut types);
            types.extend(params);
            leb(results.len() as u32, &mut types);
            types.extend(results);
        }
        section(1, types, &mut out);
        let mut imports = Vec::new();
        leb(self.imports.len() as u32, &mut imports);
        for (module, field, ty) in &self.imports {
            name(module, &mut imports);
            name(field, &mut imports);
            imports.push(0);
            leb(*ty as u32, &mut imports);
        }
        section(2, imports, &mut out);
        let mut functions = Vec::new();
        leb(self.functions.len() as u32, &mut functions);
        for (_, ty, _) in &self.functions {
            leb(*ty as u32, &mut functions);
        }
        section(3, functions, &mut out);
        section(5, vec![1, 0, 1], &mut out);
        let mut exports = Vec::new();
        leb(self.functions.len() as u32 + 1, &mut exports);
        name("memory", &mut exports);
        exports.extend([2, 0]);
        for (index, (field, _, _)) in self.functions.iter().enumerate() {
            name(field, &mut exports);
            exports.push(0);
            leb((self.imports.len() + index) as u32, &mut exports);
        }
        section(7, exports, &mut out);
        let mut code = Vec::new();
        leb(self.functions.len() as u32, &mut code);
        for (_, _, body) in &self.functions {
            let mut function = vec![0];
            function.extend(body);
            function.push(0x0b);
            leb(function.len() as u32, &mut code);
            code.extend(function);
        }
        section(10, code, &mut out);
        let mut data = Vec::new();
        leb(self.data.len() as u32, &mut data);
        for (offset, bytes) in &self.data {
            data.push(0);
            data.extend(i32_const(*offset));
            data.push(0x0b);
            leb(bytes.len() as u32, &mut data);
            data.extend(bytes);
        }
        section(11, data, &mut out);
        out
    }

    fn load(&self) -> Result<Filter, HarnessError> {
        Filter::from_bytes(&self.bytes())
    }
}

const HEADERS: [(&str, &str); 2] = [(":method", "GET"), (":path", "/")];

#[test]
fn an_import_the_harness_lacks_is_a_load_error_naming_it() -> TestResult {
    let filter = Wasm::proxy()
        .import("env", "proxy_not_in_the_abi", &[I32], &[I32])
        .import(
            "wasi_snapshot_preview1",
            "sock_accept",
            &[I32, I32, I32],
            &[I32],
        )
        .load()?;
    for kind in [HostKind::Envoy, HostKind::Ngx] {
        let host = Host::new(match kind {
            HostKind::Envoy => Profile::envoy(),
            HostKind::Ngx => Profile::ngx("f"),
        });
        match host.vm(&filter) {
            Err(HarnessError::Load(message)) => {
                assert!(message.contains("env.proxy_not_in_the_abi"), "{message}");
                assert!(
                    message.contains("wasi_snapshot_preview1.sock_accept"),
                    "{message}"
                );
            }
            Err(other) => return Err(format!("expected a load error, got {other}").into()),
            Ok(_) => return Err("a module with unknown imports loaded".into()),
        }
    }
    Ok(())
}

#[test]
fn a_module_that_is_not_a_proxy_wasm_filter_is_refused() -> TestResult {
    let filter = Wasm::new()
        .export("proxy_on_memory_allocate", &[I32], &[I32], &[0x41, 0x00])
        .load()?;
    match Host::new(Profile::envoy()).vm(&filter) {
        Err(HarnessError::Load(message)) => {
            assert!(message.contains("proxy_abi_version"), "{message}")
        }
        other => return Err(format!("expected a load error, got {:?}", other.err()).into()),
    }
    assert!(matches!(
        Filter::from_bytes(b"\0asm garbage"),
        Err(HarnessError::Load(_))
    ));
    Ok(())
}

#[test]
fn a_guest_trap_is_an_error_and_fails_the_vm() -> TestResult {
    // proxy_on_request_headers: `unreachable`.
    let filter = Wasm::proxy()
        .export(
            "proxy_on_request_headers",
            &[I32, I32, I32],
            &[I32],
            &[0x00],
        )
        .load()?;
    let host = Host::new(Profile::envoy());
    let mut vm = host.start_vm(&filter, b"")?;
    match vm.request(&HEADERS) {
        Err(HarnessError::Trap {
            callback, message, ..
        }) => {
            assert_eq!(callback, "proxy_on_request_headers");
            assert!(message.contains("unreachable"), "{message}");
        }
        other => return Err(format!("expected a trap, got {other:?}").into()),
    }
    assert!(matches!(
        vm.request(&HEADERS),
        Err(HarnessError::VmFailed { .. })
    ));
    assert!(vm.failure().is_some());
    Ok(())
}

#[test]
fn an_endless_loop_runs_out_of_fuel_instead_of_hanging() -> TestResult {
    // proxy_on_request_headers: `loop br 0 end` then return 0.
    let filter = Wasm::proxy()
        .export(
            "proxy_on_request_headers",
            &[I32, I32, I32],
            &[I32],
            &[0x03, 0x40, 0x0c, 0x00, 0x0b, 0x41, 0x00],
        )
        .load()?;
    let host = Host::new(Profile::envoy());
    let mut vm = host.start_vm(&filter, b"")?;
    vm.set_fuel_per_call(1_000_000);
    let error = vm.request(&HEADERS).err().ok_or("the loop returned")?;
    assert!(error.is_trap(), "{error}");
    assert!(error.to_string().contains("fuel"), "{error}");
    Ok(())
}

#[test]
fn proxy_done_works_in_envoy_and_traps_in_ngx_wasm_module() -> TestResult {
    // proxy_on_request_headers: call the imported proxy_done, drop its status, return 0.
    let filter = Wasm::proxy()
        .import("env", "proxy_done", &[], &[I32])
        .export(
            "proxy_on_request_headers",
            &[I32, I32, I32],
            &[I32],
            &[0x10, 0x00, 0x1a, 0x41, 0x00],
        )
        .load()?;
    let host = Host::new(Profile::envoy());
    let mut vm = host.start_vm(&filter, b"")?;
    vm.request(&HEADERS)?;
    assert_eq!(vm.done_calls(), 1);
    let host = Host::new(Profile::ngx("f"));
    let mut vm = host.start_vm(&filter, b"")?;
    match vm.request(&HEADERS) {
        Err(HarnessError::Trap { message, .. }) => {
            assert!(message.contains("not yet implemented"), "{message}")
        }
        other => return Err(format!("expected ngx to trap, got {other:?}").into()),
    }
    Ok(())
}

/// `proxy_http_call` arguments: `upstream` at 64, the serialized `headers` at 256, token at 8.
fn http_call_args(upstream: &str, headers: &[(&str, &str)]) -> (Vec<u8>, Vec<u8>) {
    let map: Vec<(Vec<u8>, Vec<u8>)> = headers
        .iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect();
    let map = encode_map(&map);
    let mut code = Vec::new();
    for arg in [
        64,
        upstream.len() as u32,
        256,
        map.len() as u32,
        0,
        0,
        0,
        0,
        1000,
        8,
    ] {
        code.extend(i32_const(arg));
    }
    (code, map)
}

/// A filter whose `on_request_headers` dispatches a callout to `upstream` with `headers` and
/// returns the host's status as its action (0 = Ok, 2 = BadArgument).
fn dispatcher(upstream: &str, headers: &[(&str, &str)]) -> Result<Filter, HarnessError> {
    let (mut code, map) = http_call_args(upstream, headers);
    code.extend([0x10, 0x00]);
    Wasm::proxy()
        .import("env", "proxy_http_call", &[I32; 10], &[I32])
        .export("proxy_on_request_headers", &[I32, I32, I32], &[I32], &code)
        .data(64, upstream.as_bytes())
        .data(256, &map)
        .load()
}

#[test]
fn callout_validation_differs_per_host() -> TestResult {
    let full = [
        (":method", "GET"),
        (":path", "/who"),
        (":authority", "synapse"),
    ];
    let no_authority = [(":method", "GET"), (":path", "/who")];
    let no_method = [(":path", "/who"), (":authority", "synapse")];
    let envoy = Host::new(Profile::envoy().with_cluster("synapse_whoami"));
    let action = |host: &Host, filter: Filter| -> Result<Action, HarnessError> {
        let mut vm = host.start_vm(&filter, b"")?;
        let stream = vm.request(&HEADERS)?;
        Ok(vm
            .stream(stream)?
            .last_action()
            .unwrap_or(Action::Other(99)))
    };
    // Envoy: a known cluster and all three pseudo-headers, else BadArgument at once.
    assert_eq!(
        action(&envoy, dispatcher("synapse_whoami", &full)?)?,
        Action::Continue
    );
    assert_eq!(
        action(&envoy, dispatcher("synapse_whoami", &no_authority)?)?,
        Action::Other(2)
    );
    assert_eq!(
        action(&envoy, dispatcher("127.0.0.1:8008", &full)?)?,
        Action::Other(2)
    );
    // ngx_wasm_module: host:port, `:authority` optional; a bad upstream or no `:method` traps.
    let ngx = Host::new(Profile::ngx("f"));
    assert_eq!(
        action(&ngx, dispatcher("127.0.0.1:8008", &no_authority)?)?,
        Action::Continue
    );
    for (upstream, headers) in [
        ("synapse whoami", &full[..]),
        ("127.0.0.1:8008", &no_method[..]),
    ] {
        match action(&ngx, dispatcher(upstream, headers)?) {
            Err(error) if error.is_trap() => {
                assert!(error.to_string().contains("dispatch failed"), "{error}")
            }
            other => {
                return Err(
                    format!("ngx {upstream} {headers:?}: expected a trap, got {other:?}").into(),
                )
            }
        }
    }
    Ok(())
}

#[test]
fn set_effective_context_resumes_another_context_in_envoy_only() -> TestResult {
    // The request pauses; the root context's tick dispatches a callout; its response handler
    // switches to the request's context (2) and resumes it. Envoy honours the switch;
    // ngx_wasm_module accepts the call but ignores it, so the resume does not reach the request.
    for (kind, upstream) in [(HostKind::Envoy, "c"), (HostKind::Ngx, "127.0.0.1:1")] {
        let (mut tick, map) = http_call_args(
            upstream,
            &[(":method", "GET"), (":path", "/"), (":authority", "a")],
        );
        tick.extend([0x10, 0x00, 0x1a]);
        let mut respond = i32_const(2);
        respond.extend([0x10, 0x01, 0x1a]);
        respond.extend(i32_const(0));
        respond.extend([0x10, 0x02, 0x1a]);
        let filter = Wasm::proxy()
            .import("env", "proxy_http_call", &[I32; 10], &[I32])
            .import("env", "proxy_set_effective_context", &[I32], &[I32])
            .import("env", "proxy_continue_stream", &[I32], &[I32])
            .export(
                "proxy_on_request_headers",
                &[I32, I32, I32],
                &[I32],
                &i32_const(1),
            )
            .export("proxy_on_tick", &[I32], &[], &tick)
            .export("proxy_on_http_call_response", &[I32; 5], &[], &respond)
            .data(64, upstream.as_bytes())
            .data(256, &map)
            .load()?;
        let host = Host::new(match kind {
            HostKind::Envoy => Profile::envoy().with_cluster("c"),
            HostKind::Ngx => Profile::ngx("f"),
        });
        let mut vm = host.start_vm(&filter, b"")?;
        let stream = vm.request(&HEADERS)?;
        assert_eq!(stream, 2);
        assert!(vm.stream(stream)?.paused);
        vm.tick()?;
        let call = vm
            .pending_calls()
            .first()
            .map(|c| c.token)
            .ok_or("no callout")?;
        vm.respond(call, 200, &[("a", "b")], b"")?;
        let resumed = !vm.stream(stream)?.paused;
        assert_eq!(resumed, kind == HostKind::Envoy, "{kind:?}");
    }
    Ok(())
}
