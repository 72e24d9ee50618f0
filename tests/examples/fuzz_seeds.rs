//! Writes the seed corpus of every fuzz target (`vd_tests::fuzzing::seeds`) under the folder
//! given as the only argument (default `fuzz/corpus`), one folder per target:
//! `cargo run --release -p vd-tests --example fuzz_seeds -- fuzz/corpus`. (It lives here, not
//! in the fuzz crate, whose binaries are built with coverage instrumentation.)

use std::path::PathBuf;

fn main() {
    let root = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/corpus".into()),
    );
    for target in vd_tests::fuzzing::TARGETS {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("create the corpus folder");
        let seeds = vd_tests::fuzzing::seeds(target);
        for (name, bytes) in &seeds {
            std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write a seed");
        }
        println!("{}: {} seeds", dir.display(), seeds.len());
    }
}
