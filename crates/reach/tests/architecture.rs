//! The runtime's module structure, checked: each capability owns its state
//! and reaches the others only downwards (see docs/architecture.md,
//! "Dependencies"). A capability that imports one above it, or takes the
//! whole node (`Inner`) instead of the handles it needs, fails here with
//! the file and line.

use std::path::{Path, PathBuf};

/// The capabilities, lowest first, with their layer. A capability may use
/// those on a lower layer, never one on its own layer or above: what it
/// needs from above comes through a trait it defines and the composition
/// root (`node`) plugs in.
const LAYERS: &[(&str, u8)] = &[
    ("peers", 1),
    ("messaging", 2),
    ("dht", 2),
    ("outbox", 3),
    ("nat", 3),
    ("portmap", 4),
    ("advertise", 4),
    ("relay", 5),
    ("punch", 6),
    ("topics", 7),
];

/// Names only the composition root may use: the whole node, its facade and
/// its wiring.
const ROOT_ONLY: &[&str] = &[
    "Inner",
    "crate::Node",
    "node::builder",
    "node::bridge",
    "node::wiring",
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The files of capability `name`: its folder, or its single file.
fn files_of(name: &str) -> Vec<PathBuf> {
    let dir = src().join(name);
    if dir.is_dir() {
        let mut out = Vec::new();
        let mut stack = vec![dir];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).expect("read a source folder") {
                let p = e.expect("a dir entry").path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    out.push(p);
                }
            }
        }
        out
    } else {
        vec![src().join(format!("{name}.rs"))]
    }
}

/// The code of a line: without its `//` comment (doc comments included).
fn code(line: &str) -> &str {
    match line.find("//") {
        Some(i) => &line[..i],
        None => line,
    }
}

/// The crate-level modules a line of code names: `crate::x` and the
/// members of `crate::{x, y::z}`.
fn modules_named(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for member in group[..end].split(',') {
                let m = member.trim().split("::").next().unwrap_or("");
                out.push(m.to_string());
            }
        } else {
            let m: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.push(m);
        }
    }
    out
}

fn is_word(code: &str, word: &str) -> bool {
    code.match_indices(word).any(|(i, _)| {
        let before = code[..i].chars().next_back();
        let after = code[i + word.len()..].chars().next();
        let ident = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
        !ident(before) && !ident(after)
    })
}

#[test]
fn capabilities_depend_only_downwards_and_never_on_the_whole_node() {
    let layer_of = |m: &str| LAYERS.iter().find(|(n, _)| *n == m).map(|(_, l)| *l);
    let mut violations = Vec::new();
    for (name, layer) in LAYERS {
        let files = files_of(name);
        assert!(!files.is_empty(), "no source files for {name}");
        for file in files {
            let text = std::fs::read_to_string(&file).expect("read a source file");
            let shown = file
                .strip_prefix(src())
                .unwrap_or(&file)
                .display()
                .to_string();
            // Unit tests may build what they test however they like.
            let text = text.split("#[cfg(test)]").next().unwrap_or("");
            for (n, line) in text.lines().enumerate() {
                let code = code(line);
                for root in ROOT_ONLY {
                    if is_word(code, root) {
                        violations.push(format!("{shown}:{}: {name} names `{root}`", n + 1));
                    }
                }
                for m in modules_named(code) {
                    if m == *name {
                        continue;
                    }
                    if let Some(other) = layer_of(&m)
                        && other >= *layer
                    {
                        violations.push(format!(
                            "{shown}:{}: {name} (layer {layer}) uses {m} (layer {other})",
                            n + 1
                        ));
                    }
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "{} dependency violations:\n{}",
        violations.len(),
        violations.join("\n")
    );
}

#[test]
fn the_checker_sees_what_it_must() {
    assert_eq!(
        modules_named("use crate::{dht::Dht, relay, node::bus};"),
        ["dht", "relay", "node"]
    );
    assert_eq!(modules_named("let x = crate::punch::on(1);"), ["punch"]);
    assert!(is_word("fn f(inner: &Arc<Inner>)", "Inner"));
    assert!(!is_word("guard.into_inner()", "Inner"));
    assert!(!is_word("struct InnerState", "Inner"));
    assert_eq!(code("let a = 1; // crate::relay"), "let a = 1; ");
}
