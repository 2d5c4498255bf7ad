//! `check-config [--host envoy|ngx] [--name NAME] [--zones A,B] MODULE.wasm CONFIG`: runs a
//! plugin configuration through the filter's own parser, as the host would at start-up.
//!
//! Why: `nginx -t` does not run a filter's configuration (a bad one only shows when the nginx
//! workers start, and then they exit), and an Envoy log's last line only says "Unable to create
//! Wasm plugin". This loads the compiled filter into the harness, calls `proxy_on_vm_start` and
//! `proxy_on_configure` with CONFIG (the JSON text; `@FILE` reads a file, `-` stdin) and prints
//! the filter's own log lines, so the line naming the bad field is the last one.
//!
//! `--host` picks the host profile (default: from the configuration's `proxy` field, `envoy` when
//! absent). For ngx, `--zones` lists the `shm_kv` zones nginx.conf declares (default: only `*`),
//! so a configuration whose `shared_data_prefix` names no zone fails here as it does in nginx.
//!
//! Exit status: 0 accepted, 1 refused by the filter, 2 the filter trapped, 3 usage or load error.

use std::io::Read;
use std::process::ExitCode;

use proxy_wasm_harness::{Eviction, Filter, HarnessError, Host, LogLevel, Profile};

const USAGE: &str =
    "usage: check-config [--host envoy|ngx] [--name NAME] [--zones A,B] MODULE.wasm CONFIG";

struct Args {
    host: Option<String>,
    name: String,
    zones: Option<Vec<String>>,
    module: String,
    config: Vec<u8>,
}

fn parse_args() -> Result<Args, String> {
    let mut host = None;
    let mut name = "matrix_sync_router".to_string();
    let mut zones = None;
    let mut positional = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| args.next().ok_or(format!("{flag} needs a value\n{USAGE}"));
        match arg.as_str() {
            "--host" => host = Some(value("--host")?),
            "--name" => name = value("--name")?,
            "--zones" => {
                let list = value("--zones")?;
                zones = Some(
                    list.split(',')
                        .filter(|z| !z.is_empty())
                        .map(String::from)
                        .collect(),
                );
            }
            "-h" | "--help" => return Err(USAGE.to_string()),
            _ => positional.push(arg),
        }
    }
    let [module, config] = <[String; 2]>::try_from(positional).map_err(|_| USAGE.to_string())?;
    let config = match config.as_str() {
        "-" => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .map_err(|e| format!("cannot read stdin: {e}"))?;
            buf
        }
        _ if config.starts_with('@') => {
            std::fs::read(&config[1..]).map_err(|e| format!("cannot read {}: {e}", &config[1..]))?
        }
        _ => config.into_bytes(),
    };
    Ok(Args {
        host,
        name,
        zones,
        module,
        config,
    })
}

/// The value of the top-level `"proxy"` field, if the text has one (a rough scan: the filter's
/// parser decides what is valid; this only picks the profile to play).
fn proxy_field(config: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(config);
    let at = text.find("\"proxy\"")? + "\"proxy\"".len();
    let rest = text[at..].trim_start().strip_prefix(':')?.trim_start();
    let value = rest.strip_prefix('"')?;
    Some(value[..value.find('"')?].to_string())
}

fn profile(args: &Args) -> Result<Profile, String> {
    let host = match &args.host {
        Some(host) => host.clone(),
        None => match proxy_field(&args.config).as_deref() {
            Some("ngx_wasm_module") => "ngx".into(),
            _ => "envoy".into(),
        },
    };
    match host.as_str() {
        "envoy" => Ok(Profile::envoy().with_plugin_name(&args.name)),
        "ngx" | "ngx_wasm_module" | "nginx" => {
            let mut profile = Profile::ngx(&args.name);
            if let Some(zones) = &args.zones {
                profile = profile.without_default_zone();
                for zone in zones {
                    profile = profile.with_zone(zone, None, Eviction::Lru);
                }
            }
            Ok(profile)
        }
        other => Err(format!("unknown --host `{other}` (envoy or ngx)\n{USAGE}")),
    }
}

fn level(level: LogLevel) -> &'static str {
    match level {
        LogLevel::Trace => "trace",
        LogLevel::Debug => "debug",
        LogLevel::Info => "info",
        LogLevel::Warn => "warning",
        LogLevel::Error => "error",
        LogLevel::Critical => "critical",
    }
}

fn run() -> Result<u8, String> {
    let args = parse_args()?;
    let profile = profile(&args)?;
    let kind = format!("{:?}", profile.kind).to_lowercase();
    let filter = Filter::from_file(&args.module).map_err(|e| e.to_string())?;
    let host = Host::new(profile);
    let outcome = host
        .vm(&filter)
        .and_then(|mut vm| Ok((vm.start(b"")?, vm.configure(&args.config)?)));
    for line in host.logs() {
        println!("{}: {}", level(line.level), line.message);
    }
    match outcome {
        Ok((true, true)) => {
            println!(
                "check-config: accepted by {} ({kind} host profile)",
                args.module
            );
            Ok(0)
        }
        Ok((started, _)) => {
            let step = if started {
                "on_configure"
            } else {
                "on_vm_start"
            };
            eprintln!("check-config: refused by the filter ({step} returned false)");
            // The filter's own error line last: it is the one naming the field.
            if let Some(line) = host.logs_at_least(LogLevel::Error).last() {
                eprintln!("{}", line.message);
            }
            Ok(1)
        }
        Err(error @ HarnessError::Load(_)) => Err(error.to_string()),
        Err(HarnessError::Trap {
            callback, message, ..
        }) => {
            // The cause is the last line; the wasm backtrace before it names no source.
            let cause = message
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            eprintln!("check-config: the filter trapped in {callback} ({kind} host profile)");
            if kind == "ngx" && cause.contains("shm") {
                eprintln!(
                    "check-config: nginx.conf needs `shm_kv <shared_data_prefix> SIZE;` in its \
                     wasm {{}} block (default prefix: msr)"
                );
            }
            eprintln!("{}", cause.trim());
            Ok(2)
        }
        Err(error) => {
            eprintln!("check-config: {error}");
            Ok(2)
        }
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => ExitCode::from(code),
        Err(message) => {
            eprintln!("check-config: {message}");
            ExitCode::from(3)
        }
    }
}
