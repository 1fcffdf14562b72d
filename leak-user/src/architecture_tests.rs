//! The layout is the architecture: each stage depends only on the stages before it. This
//! reads the sources and fails on an import that points the wrong way.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

/// Top-level modules, each with the modules it may use. `model` and `sys` are the base every
/// stage shares; `cli` and `main` sit at the edge.
const ALLOWED: &[(&str, &[&str])] = &[
    ("model", &[]),
    ("sys", &[]),
    ("kernel", &["model", "sys"]),
    ("decode", &["model"]),
    ("enrich", &["decode", "model", "sys"]),
    ("store", &["model"]),
    ("serve", &["kernel", "model", "store", "sys"]),
    (
        "agent",
        &[
            "decode", "enrich", "kernel", "model", "serve", "store", "sys",
        ],
    ),
    ("experiment", &["enrich", "model", "serve", "sys"]),
    ("cli", &["kernel", "sys"]),
];

/// The top-level modules named after `crate::` anywhere in `text`.
fn crate_references(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            found.insert(name);
        }
        // `use crate::{a, b::c}` names several.
        if rest.starts_with('{') {
            let group = &rest[1..rest.find('}').unwrap_or(rest.len())];
            for item in group.split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.insert(name);
                }
            }
        }
    }
    found
}

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in fs::read_dir(dir).expect("read src").flatten() {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_stage_depends_only_on_the_stages_before_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut wrong = Vec::new();
    for file in files {
        let relative = file.strip_prefix(&src).expect("under src");
        let top = relative
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .map(|name| name.trim_end_matches(".rs"))
            .unwrap_or_default();
        let Some(may_use) = allowed.get(top) else {
            continue;
        };
        // Tests may build their fixtures with any stage.
        if relative.to_string_lossy().ends_with("tests.rs") {
            continue;
        }
        let text = fs::read_to_string(&file).expect("read source");
        for used in crate_references(&text) {
            if used != top
                && allowed.contains_key(used.as_str())
                && !may_use.contains(&used.as_str())
            {
                wrong.push(format!("{} uses crate::{used}", relative.display()));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the stage order:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn no_source_file_is_a_monolith() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let long: Vec<String> = files
        .iter()
        .filter(|file| !file.to_string_lossy().contains("tests"))
        .filter_map(|file| {
            let lines = fs::read_to_string(file).ok()?.lines().count();
            (lines > 650).then(|| format!("{}: {lines} lines", file.display()))
        })
        .collect();
    assert!(
        long.is_empty(),
        "split these by concern:\n{}",
        long.join("\n")
    );
}
