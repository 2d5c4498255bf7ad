//! "A cache hit allocates nothing" (src/host.rs): the compiled filter, rewritten so that every
//! function counts its calls in a global of its own, serves a hit without running the
//! allocator, under both host profiles.
//!
//! The allocator is found in the module itself: every function `proxy_on_memory_allocate` can
//! reach, which is the global allocator's path (Rust's `__rdl_alloc`, wasi-libc's `malloc` and
//! `posix_memalign`, and what they call). `alloc_zeroed` and a moving `realloc` end in the same
//! `malloc`. The host's own allocations go through `proxy_on_memory_allocate`, whose calls are
//! counted too: on a hit they are served from the per-callback arena, so the allocator's
//! functions never run.

use std::collections::{BTreeSet, HashMap};

use proxy_wasm_harness::{Filter, Host, HostKind, Vm};
use serde_json::json;
use wasmparser::{BinaryReader, CodeSectionReader, Operator, Parser, Payload, TypeRef};

use crate::common::*;

type Failure = Box<dyn std::error::Error>;

/// What the rewrite needs to know about the module.
struct Shape {
    imported_funcs: u32,
    globals: u32,
    defined_funcs: u32,
    /// Direct calls of each defined function (by function index).
    calls: HashMap<u32, BTreeSet<u32>>,
    exports: HashMap<String, u32>,
}

fn shape(wasm: &[u8]) -> Result<Shape, Failure> {
    let mut shape = Shape {
        imported_funcs: 0,
        globals: 0,
        defined_funcs: 0,
        calls: HashMap::new(),
        exports: HashMap::new(),
    };
    for payload in Parser::new(0).parse_all(wasm) {
        match payload? {
            Payload::ImportSection(imports) => {
                for import in imports.into_imports() {
                    match import?.ty {
                        TypeRef::Func(_) => shape.imported_funcs += 1,
                        TypeRef::Global(_) => shape.globals += 1,
                        _ => {}
                    }
                }
            }
            Payload::GlobalSection(globals) => shape.globals += globals.count(),
            Payload::ExportSection(exports) => {
                for export in exports {
                    let export = export?;
                    if export.kind == wasmparser::ExternalKind::Func {
                        shape.exports.insert(export.name.to_string(), export.index);
                    }
                }
            }
            Payload::CodeSectionEntry(body) => {
                let index = shape.imported_funcs + shape.defined_funcs;
                shape.defined_funcs += 1;
                let mut callees = BTreeSet::new();
                let mut reader = body.get_operators_reader()?;
                while !reader.eof() {
                    if let Operator::Call { function_index } = reader.read()? {
                        callees.insert(function_index);
                    }
                }
                shape.calls.insert(index, callees);
            }
            _ => {}
        }
    }
    Ok(shape)
}

/// Every function reachable from `root` by direct calls, without `root` itself.
fn reachable(shape: &Shape, root: u32) -> BTreeSet<u32> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![root];
    while let Some(f) = todo.pop() {
        for &callee in shape.calls.get(&f).into_iter().flatten() {
            if callee != root && seen.insert(callee) {
                todo.push(callee);
            }
        }
    }
    seen
}

fn leb(out: &mut Vec<u8>, mut n: u64) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// A section's entries after its entry count (LEB128).
fn entries(content: &[u8]) -> &[u8] {
    let count_len = content
        .iter()
        .position(|b| b & 0x80 == 0)
        .map_or(0, |i| i + 1);
    &content[count_len..]
}

fn section(out: &mut Vec<u8>, id: u8, count: u32, entries: &[u8]) {
    let mut content = Vec::new();
    leb(&mut content, u64::from(count));
    content.extend_from_slice(entries);
    out.push(id);
    leb(out, content.len() as u64);
    out.extend(content);
}

/// The module with a mutable i64 global per defined function, exported as `count:<function
/// index>`, that the function adds one to when it starts. Nothing existing moves: the new
/// globals come after every existing one, the new exports after the others.
fn counting(wasm: &[u8], shape: &Shape) -> Result<Vec<u8>, Failure> {
    let n = shape.defined_funcs;
    let mut out = wasm[..8].to_vec();
    for payload in Parser::new(0).parse_all(wasm) {
        let payload = payload?;
        let Some((id, range)) = payload.as_section() else {
            continue;
        };
        let content = &wasm[range.clone()];
        match payload {
            Payload::GlobalSection(globals) => {
                let mut body = entries(content).to_vec();
                for _ in 0..n {
                    // mutable i64, initialised by `i64.const 0; end`
                    body.extend_from_slice(&[0x7e, 0x01, 0x42, 0x00, 0x0b]);
                }
                section(&mut out, id, globals.count() + n, &body);
            }
            Payload::ExportSection(exports) => {
                let mut body = entries(content).to_vec();
                for i in 0..n {
                    let name = format!("count:{}", shape.imported_funcs + i);
                    leb(&mut body, name.len() as u64);
                    body.extend_from_slice(name.as_bytes());
                    body.push(0x03); // a global
                    leb(&mut body, u64::from(shape.globals + i));
                }
                section(&mut out, id, exports.count() + n, &body);
            }
            Payload::CodeSectionStart { count, .. } => {
                let reader = CodeSectionReader::new(BinaryReader::new(content, range.start))?;
                let mut body = Vec::new();
                for (i, func) in reader.into_iter().enumerate() {
                    let func = func?;
                    let mut locals = func.get_locals_reader()?;
                    for _ in 0..locals.get_count() {
                        locals.read()?;
                    }
                    let code_start = locals.original_position();
                    let whole = func.range();
                    let global = u64::from(shape.globals) + i as u64;
                    // global.get g; i64.const 1; i64.add; global.set g
                    let mut count_call = vec![0x23];
                    leb(&mut count_call, global);
                    count_call.extend_from_slice(&[0x42, 0x01, 0x7c, 0x24]);
                    leb(&mut count_call, global);
                    let mut f = wasm[whole.start..code_start].to_vec();
                    f.extend(count_call);
                    f.extend_from_slice(&wasm[code_start..whole.end]);
                    leb(&mut body, f.len() as u64);
                    body.extend(f);
                }
                section(&mut out, id, count, &body);
            }
            Payload::CodeSectionEntry(_) => {}
            _ => {
                out.push(id);
                leb(&mut out, content.len() as u64);
                out.extend_from_slice(content);
            }
        }
    }
    Ok(out)
}

/// The instrumented filter, the index of `proxy_on_memory_allocate`, and the allocator's
/// functions.
fn counting_filter() -> Result<(Filter, u32, BTreeSet<u32>), Failure> {
    let wasm = std::fs::read(wasm_path())?;
    let shape = shape(&wasm)?;
    let on_allocate = *shape
        .exports
        .get("proxy_on_memory_allocate")
        .ok_or("no proxy_on_memory_allocate export")?;
    let allocator = reachable(&shape, on_allocate);
    let module = counting(&wasm, &shape)?;
    Ok((Filter::from_bytes(&module)?, on_allocate, allocator))
}

/// Calls of each function so far.
fn counts(vm: &mut Vm, funcs: impl IntoIterator<Item = u32>) -> Result<Vec<i64>, String> {
    funcs
        .into_iter()
        .map(|f| {
            vm.exported_global(&format!("count:{f}"))
                .ok_or(format!("no counter for function {f}"))
        })
        .collect()
}

/// (host allocations through `proxy_on_memory_allocate`, calls of allocator functions) made
/// by one sync request with `token`, start to end.
fn allocations(
    vm: &mut Vm,
    on_allocate: u32,
    allocator: &BTreeSet<u32>,
    token: &str,
) -> Result<(i64, i64), Failure> {
    let funcs = || std::iter::once(on_allocate).chain(allocator.iter().copied());
    let before = counts(vm, funcs())?;
    let stream = sync(vm, Some(token))?;
    vm.end_stream(stream)?;
    let after = counts(vm, funcs())?;
    let delta: Vec<i64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    Ok((delta[0], delta[1..].iter().sum()))
}

#[test]
fn a_cache_hit_allocates_nothing_on_either_host() -> TestResult {
    let (filter, on_allocate, allocator) = counting_filter()?;
    assert!(
        allocator.len() >= 2,
        "the allocator's path was not found: {allocator:?}"
    );
    let configs = [
        (HostKind::Envoy, json!({})),
        // ngx_wasm_module: every spelling of the header is found with one header-map read.
        (HostKind::Ngx, json!({})),
        // The shipped nginx.conf: the key goes into an nginx variable.
        (HostKind::Ngx, json!({"nginx_variable": "msr_routing_key"})),
        // Every option that writes route metadata on a hit.
        (
            HostKind::Envoy,
            json!({"filter_state": true, "sync_kind_header": "x-msr-sync-kind"}),
        ),
    ];
    for (kind, extra) in configs {
        let host = Host::new(profile(kind).with_ngx_var("msr_routing_key"));
        let mut vm = host.start_vm(&filter, &config(kind, extra.clone()))?;
        // A miss allocates (the call's waiter list, the answer's copy): the counters see it.
        let stream = sync(&mut vm, Some("tok_alloc"))?;
        let call = only_call(&vm, stream)?;
        vm.respond(call, 200, JSON, &whoami_body("@alloc:example.org"))?;
        vm.end_stream(stream)?;
        let (_, missed) = allocations(&mut vm, on_allocate, &allocator, "tok_other")?;
        assert!(
            missed > 0,
            "{kind:?} {extra}: a miss ran no allocator function"
        );
        for round in 0..3 {
            let (host_buffers, heap) = allocations(&mut vm, on_allocate, &allocator, "tok_alloc")?;
            assert!(
                host_buffers >= 2,
                "{kind:?} {extra}: the host handed over {host_buffers} buffers"
            );
            assert_eq!(
                heap, 0,
                "{kind:?} {extra} hit {round}: the allocator ran {heap} times"
            );
        }
        no_anomalies(&vm)?;
    }
    Ok(())
}
