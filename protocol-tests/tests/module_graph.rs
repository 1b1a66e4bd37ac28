//! kvd's and fsclient's modules import one way (issues 23 item 6, 21 item
//! 5): no top-level module names another (`crate::x`) that names it back.
//! Read from the sources, so a new circle fails here rather than in review.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module → the top-level modules its code names (comments and
/// test modules left out).
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap();
            let top = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string();
            let text = std::fs::read_to_string(&path).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap();
            for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
                for (i, _) in line.match_indices("crate::") {
                    let name: String = line[i + 7..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() && name != top {
                        edges.entry(top.clone()).or_default().insert(name);
                    }
                }
            }
        }
    }
    edges
}

fn no_module_imports_one_that_imports_it_back(krate: &str) {
    let edges = graph(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(krate)
            .join("src"),
    );
    assert!(edges.len() > 10, "the sources were not found: {edges:?}");
    let mut circles = Vec::new();
    for (a, names) in &edges {
        for b in names {
            if a < b && edges.get(b).is_some_and(|back| back.contains(a)) {
                circles.push(format!("{a} <-> {b}"));
            }
        }
    }
    assert!(circles.is_empty(), "import circles: {circles:?}");
}

#[test]
fn kvd_modules_import_one_way() {
    no_module_imports_one_that_imports_it_back("kvd");
}

#[test]
fn fsclient_modules_import_one_way() {
    no_module_imports_one_that_imports_it_back("fsclient");
}
