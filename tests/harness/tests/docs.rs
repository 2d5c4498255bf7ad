//! Docs that cannot drift.
//!
//! - `docs/configuration.md`'s field table and default-path blocks against the Kong schema
//!   `nginx-wasm/matrix_sync_router.meta.json`, which `suite/kong_schema.rs` holds to the compiled
//!   filter's configuration type (fields, types, integer bounds, defaults). Together: a field, a
//!   default or a bound that changes in the filter fails one of the two until the docs follow.
//! - Every relative link (and `#anchor`) in README.md, docs/, tests/harness/README.md and
//!   fuzz/README.md resolves, and every repository file those pages name in code spans exists.
//! - tests/harness/README.md's example is `suite/readme.rs`, which keeps it compiling and passing.
//!
//! Needs no compiled filter.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(relative: &str) -> Result<String, String> {
    fs::read_to_string(repo().join(relative)).map_err(|e| format!("{relative}: {e}"))
}

fn schema_properties() -> Result<BTreeMap<String, Value>, Box<dyn std::error::Error>> {
    let meta: Value = serde_json::from_str(&read("nginx-wasm/matrix_sync_router.meta.json")?)?;
    let properties = meta["config_schema"]["properties"]
        .as_object()
        .ok_or("meta.json: config_schema.properties is not an object")?;
    Ok(properties
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect())
}

/// Splits a Markdown table row into trimmed cells (`\|` stays inside a cell).
fn cells(row: &str) -> Vec<String> {
    let inner = row.trim().trim_start_matches('|').trim_end_matches('|');
    let mut out = vec![String::new()];
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                if let Some(cell) = out.last_mut() {
                    cell.push_str("\\|");
                }
                chars.next();
            }
            '|' => out.push(String::new()),
            _ => {
                if let Some(cell) = out.last_mut() {
                    cell.push(c);
                }
            }
        }
    }
    out.iter().map(|c| c.trim().to_string()).collect()
}

const TABLE_HEADER: &str = "| field | type | default | bounds | meaning |";

/// The rows of the field table: field name → its cells.
fn field_table(doc: &str) -> Result<BTreeMap<String, Vec<String>>, String> {
    let mut lines = doc.lines().skip_while(|l| l.trim() != TABLE_HEADER);
    lines.next().ok_or(format!(
        "docs/configuration.md: no table headed `{TABLE_HEADER}`"
    ))?;
    lines.next(); // |---|
    let mut rows = BTreeMap::new();
    for line in lines.take_while(|l| l.trim_start().starts_with('|')) {
        let row = cells(line);
        let field = row[0].trim_matches('`').to_string();
        if rows.insert(field.clone(), row).is_some() {
            return Err(format!("docs/configuration.md: `{field}` has two rows"));
        }
    }
    Ok(rows)
}

fn type_cell(spec: &Value) -> String {
    match spec["type"].as_str() {
        Some("array") => format!(
            "array of {}s",
            spec["items"]["type"].as_str().unwrap_or("?")
        ),
        Some(other) => other.to_string(),
        None => "?".to_string(),
    }
}

fn default_cell(spec: &Value) -> String {
    match &spec["default"] {
        Value::Array(_) => "see [Default paths](#default-paths)".to_string(),
        other => format!("`{other}`"),
    }
}

fn bounds_cell(spec: &Value) -> String {
    let mut parts = Vec::new();
    match spec["type"].as_str() {
        Some("integer") => parts.push(format!("`{}`–`{}`", spec["minimum"], spec["maximum"])),
        Some("string") => {
            if let Some(values) = spec["enum"].as_array() {
                let listed: Vec<String> = values.iter().map(|v| format!("`{v}`")).collect();
                parts.push(format!("one of {}", listed.join(", ")));
            }
            if let Some(pattern) = spec["pattern"].as_str() {
                parts.push(format!("`{}`", pattern.replace('|', "\\|")));
            }
            if let Some(n) = spec["maxLength"].as_u64() {
                parts.push(format!("at most {n} characters"));
            }
        }
        Some("array") => {
            if let Some(n) = spec["minItems"].as_u64() {
                parts.push(format!(
                    "at least {n} item{}",
                    if n == 1 { "" } else { "s" }
                ));
            }
            if let Some(n) = spec["maxItems"].as_u64() {
                parts.push(format!("at most {n} items"));
            }
            if let Some(n) = spec["items"]["maxLength"].as_u64() {
                parts.push(format!("each at most {n} characters"));
            }
        }
        _ => {}
    }
    if parts.is_empty() {
        "—".to_string()
    } else {
        parts.join(", ")
    }
}

#[test]
fn the_configuration_table_is_the_filter_configuration() -> TestResult {
    let doc = read("docs/configuration.md")?;
    let rows = field_table(&doc)?;
    let properties = schema_properties()?;
    let mut problems = Vec::new();
    for (field, spec) in &properties {
        let expected = [
            format!("`{field}`"),
            type_cell(spec),
            default_cell(spec),
            bounds_cell(spec),
        ];
        match rows.get(field) {
            None => problems.push(format!(
                "missing row: | {} | {} | {} | {} | <meaning> |",
                expected[0], expected[1], expected[2], expected[3]
            )),
            Some(row) => {
                let have = row.get(..4).unwrap_or(&[]);
                if have != expected.as_slice() || row.len() != 5 || row[4].is_empty() {
                    problems.push(format!(
                        "row `{field}`:\n  have     | {} |\n  expected | {} | <meaning> |",
                        row.join(" | "),
                        expected.join(" | ")
                    ));
                }
            }
        }
    }
    for field in rows.keys().filter(|f| !properties.contains_key(*f)) {
        problems.push(format!("row `{field}` names no field of the configuration"));
    }
    assert!(
        problems.is_empty(),
        "docs/configuration.md's field table differs from the configuration \
         (nginx-wasm/matrix_sync_router.meta.json, held to the filter by kong_schema.rs):\n{}",
        problems.join("\n")
    );
    Ok(())
}

/// The lines of the fenced block right after `Default `FIELD`:` (the marker
/// tests/e2e/test_config.py looks for too).
fn default_block(doc: &str, field: &str) -> Result<Vec<String>, String> {
    let marker = format!("Default `{field}`:");
    let mut lines = doc.lines().skip_while(|l| !l.contains(&marker));
    lines
        .next()
        .ok_or(format!("docs/configuration.md lost its `{marker}` block"))?;
    let block: Vec<String> = lines
        .skip_while(|l| !l.starts_with("```"))
        .skip(1)
        .take_while(|l| !l.starts_with("```"))
        .map(str::to_string)
        .collect();
    Ok(block)
}

#[test]
fn the_default_path_blocks_are_the_filter_defaults() -> TestResult {
    let doc = read("docs/configuration.md")?;
    let properties = schema_properties()?;
    for field in ["sync_paths", "room_paths"] {
        let expected: Vec<String> = properties
            .get(field)
            .and_then(|spec| spec["default"].as_array())
            .ok_or(format!("meta.json: no default list for {field}"))?
            .iter()
            .map(|v| v.as_str().unwrap_or("?").to_string())
            .collect();
        assert_eq!(
            default_block(&doc, field)?,
            expected,
            "docs/configuration.md: default {field}"
        );
    }
    Ok(())
}

// ---- links ----

/// The Markdown files whose links are checked.
fn checked_pages() -> Result<Vec<PathBuf>, Box<dyn std::error::Error>> {
    let root = repo();
    let mut pages = vec![
        root.join("README.md"),
        root.join("tests/harness/README.md"),
        root.join("fuzz/README.md"),
    ];
    for entry in fs::read_dir(root.join("docs"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "md") {
            pages.push(path);
        }
    }
    pages.sort();
    Ok(pages)
}

/// A checked page: its path, directory, name relative to the repository, and text.
struct Page {
    path: PathBuf,
    dir: PathBuf,
    name: String,
    text: String,
}

fn pages() -> Result<Vec<Page>, Box<dyn std::error::Error>> {
    let mut out = Vec::new();
    for path in checked_pages()? {
        let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let dir = path
            .parent()
            .ok_or("page without a directory")?
            .to_path_buf();
        let name = path
            .strip_prefix(repo())
            .unwrap_or(&path)
            .display()
            .to_string();
        out.push(Page {
            path,
            dir,
            name,
            text,
        });
    }
    Ok(out)
}

/// The page's lines outside fenced code blocks, with inline code spans blanked.
fn prose_lines(text: &str) -> Vec<String> {
    let mut fenced = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let mut kept = String::new();
        let mut in_code = false;
        for c in line.chars() {
            if c == '`' {
                in_code = !in_code;
                kept.push('`');
            } else if !in_code {
                kept.push(c);
            }
        }
        out.push(kept);
    }
    out
}

/// GitHub's anchor for a heading: lower case; letters, digits, `-`, `_` kept; spaces become `-`;
/// everything else dropped; repeats get `-1`, `-2`, ...
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        let title = line.trim_start_matches('#');
        if fenced || title.len() == line.len() || !title.starts_with(' ') {
            continue;
        }
        let slug: String = title
            .trim()
            .to_lowercase()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                _ => None,
            })
            .collect();
        let n = seen.entry(slug.clone()).or_insert(0);
        out.insert(if *n == 0 {
            slug.clone()
        } else {
            format!("{slug}-{n}")
        });
        *n += 1;
    }
    out
}

/// `(line number, target)` of every inline link `[text](target)` in the page's prose.
fn links(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (i, line) in prose_lines(text).iter().enumerate() {
        let mut rest = line.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(end) = after.find(')') else { break };
            out.push((i + 1, after[..end].trim().to_string()));
            rest = &after[end..];
        }
    }
    out
}

#[test]
fn every_relative_link_and_anchor_resolves() -> TestResult {
    let mut broken = Vec::new();
    let mut checked = 0;
    for Page {
        path: page,
        dir,
        name,
        text,
    } in pages()?
    {
        for (line, target) in links(&text) {
            if target.starts_with("http://")
                || target.starts_with("https://")
                || target.starts_with("mailto:")
            {
                continue;
            }
            checked += 1;
            let (file, anchor) = match target.split_once('#') {
                Some((file, anchor)) => (file, Some(anchor)),
                None => (target.as_str(), None),
            };
            let resolved = if file.is_empty() {
                page.clone()
            } else {
                dir.join(file)
            };
            if !resolved.exists() {
                broken.push(format!("{name}:{line}: {target}: no such file"));
                continue;
            }
            if let Some(anchor) = anchor {
                let is_md = resolved.extension().is_some_and(|e| e == "md");
                let found = is_md
                    && fs::read_to_string(&resolved)
                        .map(|t| anchors(&t).contains(anchor))
                        .unwrap_or(false);
                if !found {
                    broken.push(format!("{name}:{line}: {target}: no heading #{anchor}"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    assert!(
        checked > 20,
        "only {checked} relative links found: is the parser broken?"
    );
    Ok(())
}

#[test]
fn the_anchor_rule_is_githubs() {
    let page = "# A\n## Path templates (`sync_paths`)\n## Not in kong.yml: the split\n\
                ```\n# not a heading\n```\n## A\n";
    let found = anchors(page);
    for anchor in [
        "a",
        "path-templates-sync_paths",
        "not-in-kongyml-the-split",
        "a-1",
    ] {
        assert!(found.contains(anchor), "{anchor} not in {found:?}");
    }
    assert!(!found.contains("not-a-heading"));
}

#[test]
fn the_harness_readme_example_is_the_suite_test() -> TestResult {
    let readme = read("tests/harness/README.md")?;
    let block: String = readme
        .lines()
        .skip_while(|l| l.trim() != "```rust")
        .skip(1)
        .take_while(|l| l.trim() != "```")
        .collect();
    let test: String = read("tests/harness/tests/suite/readme.rs")?
        .lines()
        .filter(|l| !l.starts_with("//!"))
        .collect();
    let squeeze = |s: &str| -> String { s.chars().filter(|c| !c.is_whitespace()).collect() };
    assert!(
        !block.is_empty(),
        "tests/harness/README.md has no ```rust example"
    );
    assert_eq!(
        squeeze(&block),
        squeeze(&test),
        "tests/harness/README.md's example and suite/readme.rs differ (beyond whitespace)"
    );
    Ok(())
}

/// The inline code spans of the page's prose: `(line number, span)`.
fn code_spans(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut fenced = false;
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let mut parts = line.split('`');
        parts.next();
        while let (Some(span), Some(_)) = (parts.next(), parts.next()) {
            out.push((i + 1, span.to_string()));
        }
    }
    out
}

/// A span that names a file of this repository: under one of its top-level directories, with a
/// source or configuration extension (`.c` files named in the docs are nginx's or the module's).
fn names_a_repository_file(span: &str) -> bool {
    const DIRS: &[&str] = &["src/", "tests/", "bench/", "fuzz/", "nginx-wasm/", ".ci/"];
    const EXTENSIONS: &[&str] = &[
        ".rs", ".py", ".yml", ".yaml", ".toml", ".json", ".conf", ".lua", ".txt", ".svg", ".md",
    ];
    !span.contains(|c: char| c.is_whitespace() || "<>*{}$:".contains(c))
        && DIRS.iter().any(|d| span.starts_with(d))
        && EXTENSIONS.iter().any(|e| span.ends_with(e))
}

#[test]
fn every_repository_file_the_docs_name_exists() -> TestResult {
    let mut missing = Vec::new();
    let mut checked = 0;
    for Page {
        dir, name, text, ..
    } in pages()?
    {
        for (line, span) in code_spans(&text) {
            if !names_a_repository_file(&span) {
                continue;
            }
            checked += 1;
            // From the repository root, or from the page's own directory.
            if !repo().join(&span).exists() && !dir.join(&span).exists() {
                missing.push(format!("{name}:{line}: `{span}`"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "the docs name files that do not exist (moved or removed? update the page):\n{}",
        missing.join("\n")
    );
    assert!(
        checked > 20,
        "only {checked} file names found: is the parser broken?"
    );
    Ok(())
}
