//! docs/architecture.md stays true: every repository path it names exists, every
//! `file.rs::item` (or `file.rs::Type::method`) is defined in that file, and its
//! crate table lists every workspace crate with exactly the workspace crates its
//! Cargo.toml depends on.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn map() -> String {
    std::fs::read_to_string(repo().join("docs/architecture.md")).expect("docs/architecture.md")
}

/// Every `code span` of the page, outside code blocks (a fence's backticks would
/// shift every span after it).
fn spans(text: &str) -> Vec<String> {
    let mut prose = String::new();
    let mut fenced = false;
    for l in text.lines() {
        if l.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            prose.push_str(l);
            prose.push('\n');
        }
    }
    assert!(!fenced, "an unclosed code block");
    let parts: Vec<&str> = prose.split('`').collect();
    assert!(parts.len() % 2 == 1, "an unpaired backtick");
    parts
        .iter()
        .skip(1)
        .step_by(2)
        .map(|s| s.to_string())
        .collect()
}

/// A span that names a source or script file (`dir/file.rs`, `x.sh`, ...).
fn names_a_file(s: &str) -> bool {
    let path = s.split_once("::").map_or(s, |(p, _)| p);
    [".rs", ".toml", ".sh", ".md", ".yaml", ".py"]
        .iter()
        .any(|e| path.ends_with(e))
}

/// The top-level directories of the repository a span may name.
fn is_repo_path(s: &str) -> bool {
    const TOP: &[&str] = &[
        "agent/",
        "cni/",
        "shim/",
        "delegate/",
        "devices/",
        "device-plugin/",
        "ebpf/",
        "rig/",
        "fuzz/",
        "deploy/",
        "scripts/",
        "docs/",
        ".ci/",
    ];
    TOP.iter().any(|t| s.starts_with(t)) && !s.contains(' ') && !s.contains('<')
}

/// Whether `file` defines `name` (a fn, type, trait, const, static or module).
fn defines(text: &str, name: &str) -> bool {
    const KINDS: &[&str] = &[
        "fn", "struct", "enum", "trait", "const", "static", "mod", "type",
    ];
    text.lines().any(|l| {
        let l = l.trim_start();
        let l = l
            .strip_prefix("pub(crate) ")
            .or_else(|| l.strip_prefix("pub(super) "))
            .or_else(|| l.strip_prefix("pub "))
            .unwrap_or(l);
        // `async fn` and `const fn` as well as `const NAME`.
        let bare = l
            .strip_prefix("async ")
            .or_else(|| l.strip_prefix("const "))
            .unwrap_or(l);
        [l, bare].iter().any(|l| {
            KINDS.iter().any(|k| {
                l.strip_prefix(k)
                    .and_then(|r| r.strip_prefix(' '))
                    .and_then(|r| r.strip_prefix(name))
                    .is_some_and(|r| !r.starts_with(|c: char| c.is_alphanumeric() || c == '_'))
            })
        })
    })
}

/// The bodies of `file`'s top-level `impl` blocks for `ty` (inherent or of a trait
/// for it), up to each block's closing brace at column 0.
fn impl_blocks(text: &str, ty: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for l in text.lines() {
        if !inside && l.starts_with("impl") {
            // The type the block is for: after `for` if a trait's, else after `impl`.
            let head = l.split_once(" for ").map_or(l, |(_, t)| t);
            inside = head
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .any(|w| w == ty);
            continue;
        }
        if inside {
            if l.starts_with('}') {
                inside = false;
            } else {
                out.push_str(l);
                out.push('\n');
            }
        }
    }
    out
}

#[test]
fn every_path_and_item_the_code_map_names_exists() {
    let root = repo();
    let mut missing = Vec::new();
    let mut checked = 0;
    for s in spans(&map()) {
        if !is_repo_path(&s) {
            if names_a_file(&s) {
                missing.push(format!("{s}: name files from the repository's root"));
            }
            continue;
        }
        let (path, item) = match s.split_once("::") {
            Some((p, i)) => (p, Some(i)),
            None => (s.as_str(), None),
        };
        let file = root.join(path);
        if !file.exists() {
            missing.push(format!("{s}: no {path}"));
            continue;
        }
        checked += 1;
        let Some(item) = item else { continue };
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let ok = match item.split_once("::") {
            Some((ty, method)) => defines(&impl_blocks(&text, ty), method),
            None => defines(&text, item.trim_end_matches("()")),
        };
        if !ok {
            missing.push(format!("{s}: {path} defines no {item}"));
        }
    }
    assert!(
        missing.is_empty(),
        "docs/architecture.md names what is not there:\n{}",
        missing.join("\n")
    );
    // A page whose spans stopped looking like paths would pass without checking.
    assert!(checked >= 40, "only {checked} paths checked");
}

/// The rows of the crate table: crate dir -> (package, the workspace crates it may
/// import).
fn crate_table(text: &str) -> BTreeMap<String, (String, BTreeSet<String>)> {
    let mut rows = BTreeMap::new();
    let mut in_table = false;
    for l in text.lines() {
        if l.starts_with("| crate ") {
            in_table = true;
            continue;
        }
        if !in_table {
            continue;
        }
        if !l.starts_with('|') {
            break;
        }
        let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
        if cells[0].starts_with("---") {
            continue;
        }
        let dir = cells[0].trim_matches('`').trim_end_matches('/').to_string();
        let imports = spans(cells[2])
            .into_iter()
            .filter(|s| s.starts_with("trellis-"))
            .collect();
        rows.insert(dir, (cells[1].to_string(), imports));
    }
    rows
}

/// The workspace crates `dir`'s Cargo.toml depends on (normal and build dependencies;
/// dev-dependencies are tests' business).
fn workspace_deps(doc: &toml::Table) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut tables: Vec<&toml::Table> = Vec::new();
    for key in ["dependencies", "build-dependencies"] {
        if let Some(t) = doc.get(key).and_then(|v| v.as_table()) {
            tables.push(t);
        }
    }
    if let Some(targets) = doc.get("target").and_then(|v| v.as_table()) {
        for t in targets.values().filter_map(|v| v.as_table()) {
            if let Some(d) = t.get("dependencies").and_then(|v| v.as_table()) {
                tables.push(d);
            }
        }
    }
    for t in tables {
        for (name, spec) in t {
            if spec.get("path").is_some() {
                out.insert(name.clone());
            }
        }
    }
    out
}

#[test]
fn the_crate_table_is_the_workspace_and_its_imports() {
    let root = repo();
    let ws: toml::Table = std::fs::read_to_string(root.join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let mut members: BTreeSet<String> = ws["workspace"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .collect();
    // Its own workspace (nightly, sanitizers), but a crate all the same.
    members.insert("fuzz".into());
    let table = crate_table(&map());
    assert_eq!(
        table.keys().cloned().collect::<BTreeSet<_>>(),
        members,
        "the crate table's rows vs the workspace members (+ fuzz)"
    );
    for (dir, (package, listed)) in &table {
        let toml: toml::Table = std::fs::read_to_string(root.join(dir).join("Cargo.toml"))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(
            toml["package"]["name"].as_str(),
            Some(package.as_str()),
            "{dir}: the package name"
        );
        let actual = workspace_deps(&toml);
        assert_eq!(
            &actual, listed,
            "{dir}/Cargo.toml depends on {actual:?}; docs/architecture.md says it may import {listed:?}"
        );
    }
}

/// The shim is exec'd on every ADD and DEL, statically linked: its dependencies (and
/// those of the CNI types it shares with the agent) stay the few it has. Adding one
/// is a decision to make here, not by accident.
#[test]
fn the_shim_stays_tiny() {
    let deps = |dir: &str| -> BTreeSet<String> {
        let doc: toml::Table = std::fs::read_to_string(repo().join(dir).join("Cargo.toml"))
            .unwrap()
            .parse()
            .unwrap();
        doc.get("dependencies")
            .and_then(|d| d.as_table())
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default()
    };
    let set = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(deps("shim"), set(&["trellis-cni", "serde", "serde_json"]));
    assert_eq!(deps("cni"), set(&["serde", "serde_json", "thiserror"]));
}
