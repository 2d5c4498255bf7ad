//! The module's size bound: Envoy compiles the module with V8's optimizing compiler once per
//! process and clones it per worker, so size is start-up and reload time. `just build` runs
//! Binaryen's `wasm-opt -Oz`; `just bench` reports the measured size in BENCHMARKS.md.

use crate::common::*;

/// The bound the project holds the built module to (bench/run.py checks the same figure).
const MAX_MODULE_BYTES: u64 = 200_000;

#[test]
fn the_built_module_is_at_most_200_kb() -> TestResult {
    let size = std::fs::metadata(wasm_path())?.len();
    assert!(
        size <= MAX_MODULE_BYTES,
        "the module is {size} bytes, over the {MAX_MODULE_BYTES}-byte bound (built without wasm-opt?)"
    );
    Ok(())
}
