//! The real-image corpus in `tests/data/` (provenance and licences in `tests/data/SOURCES.md`,
//! expected readings in `tests/data/expected.json`). Images stay compressed as their sources
//! ship them (`.gz`, `.bz2`, or a `.zip` holding one image) and are decompressed here with the
//! flate2, bzip2 and zip crates.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

/// The corpus folder, `tests/data/` of this repository.
///
/// # Panics
///
/// When `expected.json` is not there (a broken checkout).
pub fn dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("data");
    assert!(
        dir.join("expected.json").is_file(),
        "the corpus is missing at {} (it is part of the repository)",
        dir.display()
    );
    dir
}

/// The `images` array of `expected.json`: one entry per reading of a corpus image.
///
/// # Panics
///
/// When `expected.json` cannot be read or has no `images` array.
pub fn expected() -> Vec<Value> {
    let path = dir().join("expected.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
    v["images"]
        .as_array()
        .unwrap_or_else(|| panic!("{}: no images array", path.display()))
        .clone()
}

/// The name an image has once decompressed (`a/b.vhdx.gz` → `b.vhdx`).
///
/// # Panics
///
/// When `name` has no UTF-8 file name.
pub fn image_name(name: &str) -> &str {
    Path::new(name)
        .file_name()
        .and_then(|n| n.to_str())
        .expect("a UTF-8 file name")
        .trim_end_matches(".gz")
        .trim_end_matches(".bz2")
        .trim_end_matches(".zip")
}

/// Decompresses corpus file `name` (relative to [`dir`]) into `out`.
///
/// # Panics
///
/// When the file is missing, damaged, of an unknown compression, or a `.zip` without a disk
/// image inside.
pub fn decompress_into(name: &str, out: &mut dyn Write) {
    let src = dir().join(name);
    let f = File::open(&src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    let copied = if name.ends_with(".gz") {
        io::copy(&mut flate2::read::GzDecoder::new(f), out)
    } else if name.ends_with(".bz2") {
        io::copy(&mut bzip2::read::BzDecoder::new(f), out)
    } else if name.ends_with(".zip") {
        let mut archive =
            zip::ZipArchive::new(f).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
        let index = (0..archive.len())
            .find(|&i| {
                archive
                    .by_index(i)
                    .is_ok_and(|e| e.name().ends_with(".vhdx") || e.name().ends_with(".vhd"))
            })
            .unwrap_or_else(|| panic!("{name}: no disk image inside"));
        let mut entry = archive
            .by_index(index)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        io::copy(&mut entry, out)
    } else {
        panic!("{name}: unknown compression");
    };
    copied.unwrap_or_else(|e| panic!("decompressing {}: {e}", src.display()));
}

/// Decompresses corpus file `name` to the file `dest`.
///
/// # Panics
///
/// As [`decompress_into`], or when `dest` cannot be written.
pub fn decompress(name: &str, dest: &Path) {
    let mut out = File::create(dest).unwrap_or_else(|e| panic!("{}: {e}", dest.display()));
    decompress_into(name, &mut out);
}

/// Corpus file `name`, decompressed into memory.
///
/// # Panics
///
/// As [`decompress_into`].
pub fn read(name: &str) -> Vec<u8> {
    let mut bytes = Vec::new();
    decompress_into(name, &mut bytes);
    bytes
}

/// Every image file of the corpus (compressed names relative to [`dir`]), sorted.
///
/// # Panics
///
/// When the folder cannot be listed.
pub fn images() -> Vec<String> {
    fn walk(root: &Path, at: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(at).unwrap_or_else(|e| panic!("{}: {e}", at.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                walk(root, &path, out);
            } else if let Some(name) = path.to_str()
                && [".gz", ".bz2", ".zip"].iter().any(|x| name.ends_with(x))
            {
                let rel = path.strip_prefix(root).expect("below the root");
                out.push(rel.to_str().expect("UTF-8 names").to_string());
            }
        }
    }
    let root = dir();
    let mut out = Vec::new();
    walk(&root, &root, &mut out);
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every stored image has a row in the `SOURCES.md` of its folder (the VHD corpus keeps its
    /// own in `vhd/`) holding the SHA-256 of the file as stored, and the VHDX readings name only
    /// stored images.
    #[test]
    fn every_image_has_its_provenance_row_and_checksum() {
        let root = dir();
        let images = images();
        assert!(images.len() >= 34, "{images:?}");
        for name in &images {
            let (sources, rel) = match name.strip_prefix("vhd/") {
                Some(rel) => (root.join("vhd/SOURCES.md"), rel),
                None => (root.join("SOURCES.md"), name.as_str()),
            };
            let text = std::fs::read_to_string(&sources).expect("SOURCES.md");
            let row = text
                .lines()
                .find(|l| l.starts_with(&format!("| `{rel}` |")))
                .unwrap_or_else(|| panic!("{name}: no row in {}", sources.display()));
            let sum = crate::hash::sha256_file(&root.join(name));
            assert!(
                row.contains(&sum),
                "{name}: stored sha256 {sum} is not in its row"
            );
        }
        for case in expected() {
            let file = case["file"].as_str().expect("file");
            assert!(images.iter().any(|i| i == file), "{file} is not stored");
        }
    }

    #[test]
    fn each_compression_decompresses_to_a_disk_image() {
        for (name, signature) in [
            ("coreos-hyperv/config2_base.vhdx.bz2", &b"vhdxfile"[..]),
            ("discutils/swap.vhdx.gz", b"vhdxfile"),
            ("velociraptor/test.vhdx.zip", b"vhdxfile"),
        ] {
            let bytes = read(name);
            assert!(bytes.starts_with(signature), "{name}");
            assert_eq!(
                image_name(name),
                name.rsplit('/').next().unwrap().rsplit_once('.').unwrap().0
            );
        }
    }
}
