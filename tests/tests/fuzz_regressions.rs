//! Every input a fuzz target ever failed on (`fuzz/regressions/<target>/`, each with its
//! reason in `fuzz/regressions/README.md`), and every target's seeds, run through the target's
//! logic in `vd_tests::fuzzing`: the harness itself is exercised in CI and each finding stays
//! fixed.

use std::path::{Path, PathBuf};

use vd_tests::fuzzing::{TARGETS, run, seeds};

fn regressions_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("fuzz")
        .join("regressions")
}

/// The stored inputs of `target`, sorted by name.
fn stored(target: &str) -> Vec<PathBuf> {
    let dir = regressions_dir().join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n != ".gitkeep"))
        .collect();
    files.sort();
    files
}

fn replay(target: &str) {
    let readme = std::fs::read_to_string(regressions_dir().join("README.md")).expect("README.md");
    for path in stored(target) {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("UTF-8 name");
        assert!(
            readme.contains(&format!("`{target}/{name}`")),
            "{target}/{name} has no reason in fuzz/regressions/README.md"
        );
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        eprintln!("{target}/{name}");
        run(target, &data);
    }
}

fn seeds_pass(target: &str) {
    let seeds = seeds(target);
    assert!(!seeds.is_empty(), "{target} has no seeds");
    for (name, data) in seeds {
        eprintln!("{target} seed {name}");
        run(target, &data);
    }
}

#[test]
fn every_target_has_a_regression_folder() {
    for target in TARGETS {
        assert!(regressions_dir().join(target).is_dir(), "{target}");
    }
}

macro_rules! target_tests {
    ($($target:ident),*) => {
        mod regressions {
            $(#[test]
            fn $target() {
                super::replay(stringify!($target));
            })*
        }
        mod seeds {
            $(#[test]
            fn $target() {
                super::seeds_pass(stringify!($target));
            })*
        }
    };
}

target_tests!(probe, open, open_read_all, log_replay, chain, write_model);
