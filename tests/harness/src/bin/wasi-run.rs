//! `wasi-run MODULE.wasm [ARGS...]`: runs a `wasm32-wasip1` command module (e.g. a `cargo test`
//! binary) with the harness's WASI and exits with its status. Set it as
//! `CARGO_TARGET_WASM32_WASIP1_RUNNER` to run unit tests compiled to wasm32.
//!
//! The guest gets the arguments, the `RUST_*`/`NO_COLOR`/`TERM` environment variables, the real
//! clocks, the real stdout/stderr, and randomness from `WASI_RUN_SEED` (default 0). Nothing is
//! pre-opened, so it cannot touch files.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use proxy_wasm_harness::wasi::{self, ProcExit, WasiView};
use proxy_wasm_harness::Rng;
use wasmtime::{Config, Engine, Linker, Module, OptLevel, Store};

struct Runner {
    args: Vec<Vec<u8>>,
    env: Vec<Vec<u8>>,
    started: Instant,
    rng: Rng,
}

impl WasiView for Runner {
    fn args(&self) -> Vec<Vec<u8>> {
        self.args.clone()
    }

    fn env(&self) -> Vec<Vec<u8>> {
        self.env.clone()
    }

    fn clock_ns(&mut self, id: u32) -> Option<u64> {
        let monotonic = self.started.elapsed().as_nanos() as u64;
        match id {
            0 => Some(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |since| since.as_nanos() as u64),
            ),
            1..=3 => Some(monotonic),
            _ => None,
        }
    }

    fn sleep_ns(&mut self, ns: u64) {
        std::thread::sleep(std::time::Duration::from_nanos(ns.min(10_000_000_000)));
    }

    fn random(&mut self, buf: &mut [u8]) {
        self.rng.fill(buf);
    }

    fn output(&mut self, fd: u32, data: &[u8]) {
        // Output errors (a closed pipe) cannot be reported to the guest usefully; drop them.
        if fd == 1 {
            let _ = std::io::stdout().write_all(data);
        } else {
            let _ = std::io::stderr().write_all(data);
        }
    }
}

fn run() -> Result<i32, String> {
    let mut args = std::env::args_os();
    let _runner = args.next();
    let module_path = args.next().ok_or("usage: wasi-run MODULE.wasm [ARGS...]")?;
    let mut guest_args = vec![module_path.to_string_lossy().into_owned().into_bytes()];
    guest_args.extend(args.map(|arg| arg.to_string_lossy().into_owned().into_bytes()));
    let env = std::env::vars()
        .filter(|(name, _)| name.starts_with("RUST_") || name == "NO_COLOR" || name == "TERM")
        .map(|(name, value)| format!("{name}={value}").into_bytes())
        .collect();
    let seed = std::env::var("WASI_RUN_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or(0);

    let mut config = Config::new();
    // Test binaries are large and run once: compile fast rather than well.
    config.cranelift_opt_level(OptLevel::None);
    let engine = Engine::new(&config).map_err(|error| format!("engine: {error}"))?;
    let module = Module::from_file(&engine, &module_path)
        .map_err(|error| format!("cannot load {}: {error}", module_path.to_string_lossy()))?;
    let mut linker: Linker<Runner> = Linker::new(&engine);
    wasi::add_to_linker(&mut linker).map_err(|error| format!("linker: {error}"))?;
    let mut store = Store::new(
        &engine,
        Runner {
            args: guest_args,
            env,
            started: Instant::now(),
            rng: Rng::new(seed),
        },
    );
    let missing: Vec<String> = module
        .imports()
        .filter(|import| linker.get_by_import(&mut store, import).is_none())
        .map(|import| format!("{}.{}", import.module(), import.name()))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "the module imports {} that wasi-run does not provide",
            missing.join(", ")
        ));
    }
    let instance = linker
        .instantiate(&mut store, &module)
        .map_err(|error| format!("cannot instantiate: {error}"))?;
    let start = instance
        .get_typed_func::<(), ()>(&mut store, "_start")
        .map_err(|error| format!("the module has no _start: {error}"))?;
    match start.call(&mut store, ()) {
        Ok(()) => Ok(0),
        Err(error) => match error.downcast_ref::<ProcExit>() {
            Some(ProcExit(code)) => Ok(*code),
            None => Err(format!("the guest trapped: {error:?}")),
        },
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(message) => {
            eprintln!("wasi-run: {message}");
            // Like a Rust test binary that panicked.
            ExitCode::from(101)
        }
    }
}
