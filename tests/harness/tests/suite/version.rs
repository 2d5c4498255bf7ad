//! The `configured` log line names the release: the version in the root Cargo.toml (which the
//! release workflow checks against the git tag), so an operator can tell from the proxy's log
//! which release is running.

use proxy_wasm_harness::LogLevel;
use serde_json::json;

use crate::common::*;

/// `version = "..."` of the root Cargo.toml's [package] table (the filter's crate).
fn crate_version() -> Option<String> {
    let manifest = concat!("\n", include_str!("../../../../Cargo.toml"));
    let package = manifest.split("\n[").find(|t| t.starts_with("package]"))?;
    package.lines().find_map(|line| {
        let value = line
            .strip_prefix("version")?
            .trim_start()
            .strip_prefix('=')?;
        Some(value.trim().trim_matches('"').to_string())
    })
}

#[test]
fn the_configured_line_carries_the_crate_version() -> TestResult {
    let version = crate_version().ok_or("no [package] version in Cargo.toml")?;
    assert!(!version.is_empty() && version.chars().next().is_some_and(|c| c.is_ascii_digit()));
    for kind in BOTH {
        let (host, _vm) = start(kind, json!({}))?;
        let infos = host.logs_at_least(LogLevel::Info);
        let configured: Vec<_> = infos
            .iter()
            .filter(|line| line.message.contains("configured: "))
            .collect();
        assert_eq!(configured.len(), 1, "{kind:?}: {infos:?}");
        let expected = format!("configured: matrix-sync-router {version}, ");
        assert!(
            configured
                .iter()
                .all(|line| line.message.contains(&expected)),
            "{kind:?}: {configured:?} does not say {expected:?}"
        );
    }
    Ok(())
}
