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
use std::convert::Infallible;

use proxy_wasm_harness::{Filter, Host, HostKind, Vm};
use serde_json::json;
use wasm_encoder::reencode::{utils, Error, Reencode};
use wasm_encoder::{ConstExpr, ExportKind, GlobalType, Instruction, ValType};
use wasmparser::{Operator, Parser, Payload, TypeRef};

use crate::common::*;

/// What the rewrite needs to know about the module.
struct Shape {
    imported_funcs: u32,
    globals: u32,
    defined_funcs: u32,
    /// Direct calls of each defined function (by function index).
    calls: HashMap<u32, BTreeSet<u32>>,
    exports: HashMap<String, u32>,
}

fn shape(wasm: &[u8]) -> Result<Shape, Box<dyn std::error::Error>> {
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

/// Adds a mutable i64 global per defined function, exported as `count:<function index>`, and
/// makes each function add one to its global when it starts. Nothing existing moves: the new
/// globals come after every existing one.
struct Counting<'s> {
    shape: &'s Shape,
    next: u32,
}

impl Reencode for Counting<'_> {
    type Error = Infallible;

    fn parse_global_section(
        &mut self,
        globals: &mut wasm_encoder::GlobalSection,
        section: wasmparser::GlobalSectionReader<'_>,
    ) -> Result<(), Error<Infallible>> {
        utils::parse_global_section(self, globals, section)?;
        let counter = GlobalType {
            val_type: ValType::I64,
            mutable: true,
            shared: false,
        };
        (0..self.shape.defined_funcs).for_each(|_| {
            globals.global(counter, &ConstExpr::i64_const(0));
        });
        Ok(())
    }

    fn parse_export_section(
        &mut self,
        exports: &mut wasm_encoder::ExportSection,
        section: wasmparser::ExportSectionReader<'_>,
    ) -> Result<(), Error<Infallible>> {
        let shape = self.shape;
        let counters =
            (0..shape.defined_funcs).map(|i| (shape.imported_funcs + i, shape.globals + i));
        for (func, global) in counters {
            exports.export(&format!("count:{func}"), ExportKind::Global, global);
        }
        utils::parse_export_section(self, exports, section)
    }

    fn parse_function_body(
        &mut self,
        code: &mut wasm_encoder::CodeSection,
        func: wasmparser::FunctionBody<'_>,
    ) -> Result<(), Error<Infallible>> {
        let mut f = self.new_function_with_parsed_locals(&func)?;
        let counter = self.shape.globals + self.next;
        self.next += 1;
        f.instruction(&Instruction::GlobalGet(counter))
            .instruction(&Instruction::I64Const(1))
            .instruction(&Instruction::I64Add)
            .instruction(&Instruction::GlobalSet(counter));
        let mut reader = func.get_operators_reader()?;
        while !reader.eof() {
            f.instruction(&self.parse_instruction(&mut reader)?);
        }
        code.function(&f);
        Ok(())
    }
}

/// The instrumented filter, the index of `proxy_on_memory_allocate`, and the allocator's
/// functions.
fn counting_filter() -> Result<(Filter, u32, BTreeSet<u32>), Box<dyn std::error::Error>> {
    let wasm = std::fs::read(wasm_path())?;
    let shape = shape(&wasm)?;
    let mut module = wasm_encoder::Module::new();
    let mut counting = Counting {
        shape: &shape,
        next: 0,
    };
    counting
        .parse_core_module(&mut module, Parser::new(0), &wasm)
        .map_err(|e| format!("rewriting the module: {e:?}"))?;
    let on_allocate = *shape
        .exports
        .get("proxy_on_memory_allocate")
        .ok_or("no proxy_on_memory_allocate export")?;
    let allocator = reachable(&shape, on_allocate);
    Ok((
        Filter::from_bytes(&module.finish())?,
        on_allocate,
        allocator,
    ))
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
) -> Result<(i64, i64), Box<dyn std::error::Error>> {
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
