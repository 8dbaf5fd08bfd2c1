//! The shape of the code, checked: no import circles between the files of
//! `proxy/src`, and every file and function that `docs/architecture.md`
//! points at exists. Plain text reading, like a reviewer's grep.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `session/relay.rs` -> ["session", "relay"]; `pool/mod.rs` -> ["pool"].
fn module_path(root: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(root).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
}

/// Code without tests and comments: what the product itself imports.
fn product_code(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or("");
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The longest prefix of `base + parts` that names a file.
fn resolve(
    modules: &BTreeMap<Vec<String>, PathBuf>,
    base: &[String],
    parts: &[String],
) -> Option<PathBuf> {
    (1..=parts.len()).rev().find_map(|n| {
        let mut key = base.to_vec();
        key.extend_from_slice(&parts[..n]);
        modules.get(&key).cloned()
    })
}

fn import_graph() -> BTreeMap<PathBuf, BTreeSet<PathBuf>> {
    let root = src_root();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let modules: BTreeMap<Vec<String>, PathBuf> = files
        .iter()
        .filter(|f| !f.ends_with("main.rs"))
        .map(|f| (module_path(&root, f), f.clone()))
        .collect();
    let path_re = regex::Regex::new(r"\b(crate|super)((?:::[a-z_][a-z0-9_]*)+)").unwrap();
    let group_re =
        regex::Regex::new(r"\b(crate|super)((?:::[a-z_][a-z0-9_]*)*)::(?:\{([^;]*)\}|\*)").unwrap();
    let use_re =
        regex::Regex::new(r"(?m)^\s*(?:pub(?:\([a-z]+\))? )?use ([a-z_][a-z0-9_]*)::").unwrap();
    let mut graph = BTreeMap::new();
    for f in &files {
        if f.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let code = product_code(&std::fs::read_to_string(f).unwrap());
        let me = module_path(&root, f);
        let mut deps = BTreeSet::new();
        for c in path_re.captures_iter(&code) {
            let parts: Vec<String> = c[2]
                .trim_start_matches("::")
                .split("::")
                .map(str::to_string)
                .collect();
            // `super` in `a/b.rs` and in `a/b/mod.rs` both name `a`.
            let base: Vec<String> = if &c[1] == "crate" {
                Vec::new()
            } else {
                me[..me.len().saturating_sub(1)].to_vec()
            };
            if let Some(target) = resolve(&modules, &base, &parts) {
                if &target != f {
                    deps.insert(target);
                }
            }
        }
        // `use super::{A, b::C}` and `use super::*`: the module itself for
        // plain names, its child module for paths inside the braces.
        for c in group_re.captures_iter(&code) {
            let mut base: Vec<String> = if &c[1] == "crate" {
                Vec::new()
            } else {
                me[..me.len().saturating_sub(1)].to_vec()
            };
            base.extend(
                c[2].split("::")
                    .filter(|p| !p.is_empty())
                    .map(str::to_string),
            );
            let mut targets = Vec::new();
            let items = c.get(3).map_or("*", |m| m.as_str());
            for item in items.split(',') {
                let item = item.trim();
                let segs: Vec<String> = match item.rsplit_once("::") {
                    Some((path, _)) => path.split("::").map(str::to_string).collect(),
                    None => Vec::new(),
                };
                if segs
                    .iter()
                    .all(|s| s.starts_with(|ch: char| ch.is_ascii_lowercase() || ch == '_'))
                    && !segs.is_empty()
                {
                    if let Some(t) = resolve(&modules, &base, &segs) {
                        targets.push(t);
                        continue;
                    }
                }
                if !item.is_empty() {
                    targets.extend(modules.get(&base).cloned());
                }
            }
            for t in targets {
                if &t != f {
                    deps.insert(t);
                }
            }
        }
        // `use child::x;` in a mod.rs names its own child module.
        if f.ends_with("mod.rs") || f.ends_with("lib.rs") {
            for c in use_re.captures_iter(&code) {
                if let Some(t) = resolve(&modules, &me, &[c[1].to_string()]) {
                    if &t != f {
                        deps.insert(t);
                    }
                }
            }
        }
        graph.insert(f.clone(), deps);
    }
    graph
}

fn find_cycle(graph: &BTreeMap<PathBuf, BTreeSet<PathBuf>>) -> Option<Vec<PathBuf>> {
    fn visit(
        u: &PathBuf,
        graph: &BTreeMap<PathBuf, BTreeSet<PathBuf>>,
        state: &mut BTreeMap<PathBuf, u8>,
        stack: &mut Vec<PathBuf>,
    ) -> Option<Vec<PathBuf>> {
        state.insert(u.clone(), 1);
        stack.push(u.clone());
        for v in graph.get(u).into_iter().flatten() {
            match state.get(v).copied().unwrap_or(0) {
                0 => {
                    if let Some(c) = visit(v, graph, state, stack) {
                        return Some(c);
                    }
                }
                1 => {
                    let at = stack.iter().position(|x| x == v).unwrap();
                    let mut c = stack[at..].to_vec();
                    c.push(v.clone());
                    return Some(c);
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(u.clone(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for u in graph.keys() {
        if state.get(u).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(u, graph, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn no_import_circles_between_files_of_proxy_src() {
    let graph = import_graph();
    let root = src_root();
    // The graph is read at all: the session imports the pool layer.
    let session = root.join("session/connect.rs");
    assert!(
        graph[&session]
            .iter()
            .any(|d| d.starts_with(root.join("pool"))),
        "the reader found no import of pool/ in session/connect.rs"
    );
    if let Some(cycle) = find_cycle(&graph) {
        let names: Vec<String> = cycle
            .iter()
            .map(|p| p.strip_prefix(&root).unwrap().display().to_string())
            .collect();
        panic!("import circle: {}", names.join(" -> "));
    }
}

/// The pool layer imports only itself and helpers below it: modules from
/// which no chain of imports leads back into pool/ (`fds.rs`: is an error
/// the proxy's own shortage; `throttle.rs` under it). Every module above
/// the pool layer imports it, so nothing the pool imports can be above it.
#[test]
fn the_pool_layer_imports_nothing_above_it() {
    let graph = import_graph();
    let pool = src_root().join("pool");
    // Whether a chain of imports from `from` reaches pool/.
    let reaches_pool = |from: &PathBuf| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.clone()];
        while let Some(f) = todo.pop() {
            if f.starts_with(&pool) {
                return true;
            }
            if seen.insert(f.clone()) {
                todo.extend(graph.get(&f).into_iter().flatten().cloned());
            }
        }
        false
    };
    let mut helpers = 0;
    for (file, deps) in &graph {
        if file.starts_with(&pool) {
            for d in deps.iter().filter(|d| !d.starts_with(&pool)) {
                helpers += 1;
                assert!(
                    !reaches_pool(d),
                    "{} imports {}, which is outside pool/ and leads back into it",
                    file.display(),
                    d.display()
                );
            }
        }
    }
    // The check looked at something: pool/ uses `fds.rs`.
    assert!(helpers > 0, "no import from pool/ to outside it was found");
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    let (a, b) = (PathBuf::from("a.rs"), PathBuf::from("b.rs"));
    let graph = BTreeMap::from([
        (a.clone(), BTreeSet::from([b.clone()])),
        (b.clone(), BTreeSet::from([a.clone()])),
    ]);
    assert!(find_cycle(&graph).is_some());
}

/// Every `file.rs` and `Type::item` the architecture page names exists.
#[test]
fn architecture_pointers_resolve() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let doc = std::fs::read_to_string(repo.join("docs/architecture.md")).unwrap();
    let mut all = Vec::new();
    for crate_dir in ["proxy", "config", "control", "chaos-tests"] {
        rust_files(&repo.join(crate_dir).join("src"), &mut all);
    }
    let sources: Vec<(PathBuf, String)> = all
        .iter()
        .map(|p| (p.clone(), std::fs::read_to_string(p).unwrap()))
        .collect();

    let file_re = regex::Regex::new(r"`((?:[a-z_-]+/)*[a-z_]+\.rs)`").unwrap();
    let mut checked = 0;
    for c in file_re.captures_iter(&doc) {
        let f = &c[1];
        let found = [src_root().join(f), repo.join(f)]
            .iter()
            .any(|p| p.is_file());
        assert!(
            found,
            "docs/architecture.md names {f}, which does not exist"
        );
        checked += 1;
    }
    assert!(checked > 20, "only {checked} file pointers read");

    let item_re = regex::Regex::new(r"`([A-Za-z_]+)::([A-Za-z_]+)`").unwrap();
    for c in item_re.captures_iter(&doc) {
        let (owner, item) = (&c[1], &c[2]);
        if ["tokio", "agiproxy", "std"].contains(&owner) {
            continue;
        }
        let is_type = owner.starts_with(|ch: char| ch.is_ascii_uppercase());
        let owner_def = regex::Regex::new(&if is_type {
            format!(r"(struct|enum|trait|impl(<[^>]*>)?( [A-Za-z:]+ for)?) {owner}\b")
        } else {
            format!(r"mod {owner}\b")
        })
        .unwrap();
        let item_def = regex::Regex::new(&format!(
            r"(fn|struct|enum|const|type) {item}\b|\b{item}(: | \{{|\(|,)"
        ))
        .unwrap();
        let ok = sources.iter().any(|(path, text)| {
            let owns = if is_type {
                owner_def.is_match(text)
            } else {
                path.file_stem().is_some_and(|s| s == owner)
                    || path
                        .parent()
                        .and_then(|p| p.file_name())
                        .is_some_and(|d| d == owner)
                        && path.ends_with("mod.rs")
            };
            owns && item_def.is_match(text)
        });
        assert!(
            ok,
            "docs/architecture.md names `{owner}::{item}`, not found in the code"
        );
    }
}
