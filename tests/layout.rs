//! The source tree's shape: the modules under src/ name each other
//! (`crate::MODULE`) without a circle, and the kernel ABI (`uapi`) and the
//! CUDA driver layer (`cuda`) name none of the modules that use them.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src");

/// Each top-level module (`src/X.rs` with `src/X/`) and the top-level
/// modules its files name.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let modules: BTreeSet<String> = fs::read_dir(SRC)
        .expect("src/")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .map(|name| name.trim_end_matches(".rs").to_string())
        .filter(|name| name != "main")
        .collect();
    let mut graph = BTreeMap::new();
    for module in &modules {
        let mut text = fs::read_to_string(Path::new(SRC).join(format!("{module}.rs"))).unwrap_or_default();
        let dir = Path::new(SRC).join(module);
        if dir.is_dir() {
            for entry in fs::read_dir(&dir).expect("a module folder").flatten() {
                text += &fs::read_to_string(entry.path()).unwrap_or_default();
            }
        }
        let named: BTreeSet<String> = text
            .split("crate::")
            .skip(1)
            .flat_map(|rest| {
                // `crate::store::X`, or `crate::{store, swap::Y}`
                let first = |w: &str| w.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>();
                match rest.strip_prefix('{') {
                    Some(list) => list.split('}').next().unwrap_or("").split(',').map(first).collect::<Vec<_>>(),
                    None => vec![first(rest)],
                }
            })
            .filter(|name| modules.contains(name) && name != module)
            .collect();
        graph.insert(module.clone(), named);
    }
    graph
}

#[test]
fn modules_name_each_other_without_a_circle() {
    let graph = graph();
    assert!(graph.len() > 10, "{graph:?}");
    // Depth-first, with the path so far: a module met again on it is a circle.
    fn visit(graph: &BTreeMap<String, BTreeSet<String>>, path: &mut Vec<String>, done: &mut BTreeSet<String>) {
        let here = path.last().cloned().unwrap_or_default();
        for next in &graph[&here] {
            assert!(!path.contains(next), "a circle: {} -> {next}", path.join(" -> "));
            if done.insert(next.clone()) {
                path.push(next.clone());
                visit(graph, path, done);
                path.pop();
            }
        }
    }
    for module in graph.keys() {
        visit(&graph, &mut vec![module.clone()], &mut BTreeSet::new());
    }
}

#[test]
fn the_kernel_abi_and_the_driver_layer_name_no_module_above_them() {
    let graph = graph();
    assert_eq!(graph["uapi"], BTreeSet::new(), "uapi is bindgen's output and nothing else");
    let cuda: Vec<&String> = graph["cuda"].iter().filter(|m| !["log", "touch"].contains(&m.as_str())).collect();
    assert!(graph["touch"].is_empty(), "touch is a leaf: {:?}", graph["touch"]);
    assert!(cuda.is_empty(), "cuda names {cuda:?}");
    assert!(graph["nbd"].contains("uapi") && graph["swap"].contains("uapi"), "{graph:?}");
}
