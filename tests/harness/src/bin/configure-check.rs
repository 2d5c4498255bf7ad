//! `configure-check [--host envoy|ngx] [--cluster NAME]... [--zone NAME]... [--ngx-var NAME]...
//! FILTER.wasm < config`: loads a compiled proxy-wasm filter into the harness, starts its VM and
//! hands it the plugin configuration read from stdin, exactly as the host would at start-up. It
//! lets configuration files outside Rust (Kong's kong.yml, nginx.conf) be checked offline
//! against the filter's own configuration parser.
//!
//! Prints `accepted` or `refused` on the first line, then every line the filter logged as
//! `LEVEL<TAB>message`. Exit status: 0 accepted, 1 refused, 2 the VM trapped or could not load
//! (the error is printed after `error`).
//!
//! `--zone` adds an ngx_wasm_module `shm_kv` zone (named zones replace the default `*` zone, as
//! in an nginx.conf that declares only named zones); `--cluster` an Envoy cluster name;
//! `--ngx-var` a changeable nginx variable.

use std::io::Read;
use std::process::ExitCode;

use proxy_wasm_harness::{Eviction, Filter, HarnessError, Host, HostKind, Profile};

struct Args {
    kind: HostKind,
    clusters: Vec<String>,
    zones: Vec<String>,
    ngx_vars: Vec<String>,
    filter: String,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        kind: HostKind::Ngx,
        clusters: Vec::new(),
        zones: Vec::new(),
        ngx_vars: Vec::new(),
        filter: String::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--host" => {
                args.kind = match value()?.as_str() {
                    "envoy" => HostKind::Envoy,
                    "ngx" => HostKind::Ngx,
                    other => return Err(format!("unknown host {other:?} (envoy or ngx)")),
                }
            }
            "--cluster" => args.clusters.push(value()?),
            "--zone" => args.zones.push(value()?),
            "--ngx-var" => args.ngx_vars.push(value()?),
            _ if arg.starts_with("--") => return Err(format!("unknown option {arg}")),
            _ if args.filter.is_empty() => args.filter = arg,
            _ => return Err(format!("unexpected argument {arg}")),
        }
    }
    if args.filter.is_empty() {
        return Err("missing FILTER.wasm".into());
    }
    Ok(args)
}

fn profile(args: &Args) -> Profile {
    let mut profile = match args.kind {
        HostKind::Envoy => Profile::envoy(),
        HostKind::Ngx => Profile::ngx("matrix_sync_router"),
    };
    if !args.zones.is_empty() {
        profile = profile.without_default_zone();
    }
    for zone in &args.zones {
        profile = profile.with_zone(zone, None, Eviction::Lru);
    }
    for cluster in &args.clusters {
        profile = profile.with_cluster(cluster);
    }
    profile
        .writable_ngx_vars
        .extend(args.ngx_vars.iter().cloned());
    profile
}

/// Whether the filter accepted `config`, and the host that recorded its log lines.
fn configure(args: &Args, config: &[u8]) -> Result<(bool, Host), HarnessError> {
    let filter = Filter::from_file(&args.filter)?;
    let host = Host::new(profile(args));
    let mut vm = host.vm(&filter)?;
    vm.start(b"")?;
    let accepted = vm.configure(config)?;
    Ok((accepted, host))
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("configure-check: {message}");
            return ExitCode::from(2);
        }
    };
    let mut config = Vec::new();
    if let Err(error) = std::io::stdin().read_to_end(&mut config) {
        eprintln!("configure-check: reading stdin: {error}");
        return ExitCode::from(2);
    }
    match configure(&args, &config) {
        Ok((accepted, host)) => {
            println!("{}", if accepted { "accepted" } else { "refused" });
            for line in host.logs() {
                println!("{:?}\t{}", line.level, line.message);
            }
            ExitCode::from(if accepted { 0 } else { 1 })
        }
        Err(error) => {
            println!("error\n{error}");
            ExitCode::from(2)
        }
    }
}
