//! The layout's rules, checked on the source: the layers only import downwards
//! (`vocabulary` ← `engine` ← `services` ← `runtime` ← `cli`), and no two files import each
//! other, directly or around a cycle. A file's imports are the `crate::…` and `super::…`
//! paths outside its `#[cfg(test)]` module; a module's own `mod.rs` (which declares and
//! re-exports its children) does not count as an import of or by them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/runtime/worker/mod.rs` → `[runtime, worker]`; `src/lib.rs` → `[]`.
fn module_of(src: &Path, file: &Path) -> Module {
    let rel = file
        .strip_prefix(src)
        .expect("under src/")
        .with_extension("");
    let mut parts: Module = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// The longest prefix of `path` that is a module with a file.
fn resolve(modules: &BTreeSet<Module>, path: &[String]) -> Option<Module> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|m| modules.contains(m))
}

/// The paths a file names: `crate::a::b`, `super::c`, and the items of `use crate::{…}` /
/// `use super::{…}` lists, as segments (relative paths resolved against `me`).
fn named_paths(code: &str, me: &Module) -> Vec<Vec<String>> {
    // `super` of `a/b/c.rs` and of `a/b/c/mod.rs` alike is `a/b`.
    let parent: Module = me[..me.len().saturating_sub(1)].to_vec();
    let mut out = Vec::new();
    for (root, base) in [("crate::", Vec::new()), ("super::", parent)] {
        let mut rest = code;
        while let Some(at) = rest.find(root) {
            let before = rest[..at].chars().last();
            rest = &rest[at + root.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let items: Vec<&str> = if let Some(list) = rest.strip_prefix('{') {
                let end = list.find('}').unwrap_or(list.len());
                list[..end].split(',').collect()
            } else {
                let end = rest
                    .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                    .unwrap_or(rest.len());
                vec![&rest[..end]]
            };
            for item in items {
                let segments: Vec<String> = item
                    .trim()
                    .split("::")
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect();
                if !segments.is_empty() {
                    out.push(base.iter().cloned().chain(segments).collect());
                }
            }
        }
    }
    out
}

/// Each file's imports of other files (not counting its ancestors and descendants).
fn imports() -> BTreeMap<Module, BTreeSet<Module>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<Module> = files.iter().map(|f| module_of(&src, f)).collect();
    let mut graph = BTreeMap::new();
    for file in &files {
        let me = module_of(&src, file);
        let text = std::fs::read_to_string(file).expect("read a source file");
        let code: String = text
            .split("#[cfg(test)]")
            .next()
            .unwrap_or_default()
            .lines()
            .map(|l| l.split("//").next().unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n");
        let deps: BTreeSet<Module> = named_paths(&code, &me)
            .iter()
            .filter_map(|p| resolve(&modules, p))
            .filter(|d| !d.starts_with(&me) && !me.starts_with(d))
            .collect();
        graph.insert(me, deps);
    }
    graph
}

fn name(m: &Module) -> String {
    if m.is_empty() {
        "lib".into()
    } else {
        m.join("/")
    }
}

#[test]
fn layers_import_only_downwards() {
    let rank = |m: &Module| match m.first().map(String::as_str) {
        Some("vocabulary") => 0,
        Some("engine") => 1,
        Some("services") => 2,
        Some("runtime") => 3,
        Some("cli") => 4,
        _ => 5,
    };
    let graph = imports();
    assert!(
        graph.len() > 40,
        "the walk found only {} files",
        graph.len()
    );
    let upward: Vec<String> = graph
        .iter()
        .flat_map(|(from, deps)| deps.iter().map(move |to| (from, to)))
        .filter(|(from, to)| rank(from) < rank(to))
        .map(|(from, to)| format!("{} -> {}", name(from), name(to)))
        .collect();
    assert!(upward.is_empty(), "imports against the layers: {upward:#?}");
}

#[test]
fn no_file_imports_itself_around_a_cycle() {
    let graph = imports();
    // Depth-first search with colours: reaching a file still on the stack closes a cycle.
    fn visit(
        m: &Module,
        graph: &BTreeMap<Module, BTreeSet<Module>>,
        state: &mut BTreeMap<Module, bool>,
        stack: &mut Vec<Module>,
        cycles: &mut Vec<String>,
    ) {
        match state.get(m) {
            Some(true) => return,
            Some(false) => {
                let start = stack.iter().position(|s| s == m).unwrap_or(0);
                let cycle: Vec<String> = stack[start..].iter().chain([m]).map(name).collect();
                cycles.push(cycle.join(" -> "));
                return;
            }
            None => {}
        }
        state.insert(m.clone(), false);
        stack.push(m.clone());
        for d in graph.get(m).into_iter().flatten() {
            visit(d, graph, state, stack, cycles);
        }
        stack.pop();
        state.insert(m.clone(), true);
    }
    let (mut state, mut cycles) = (BTreeMap::new(), Vec::new());
    for m in graph.keys() {
        visit(m, &graph, &mut state, &mut Vec::new(), &mut cycles);
    }
    assert!(cycles.is_empty(), "import cycles: {cycles:#?}");
}
