//! The probe tells the formats apart on every VHDX corpus image, in the static table's order
//! (vhdx, vhd, raw): each is named `vhdx` with certainty, whatever state its log is in. (The VHD
//! corpus is probed by `vhd_corpus.rs`, image by image.)

use backend_raw as _;
use backend_vhd as _;
use backend_vhdx as _;
use vd_core::{Confidence, Registry};
use vd_tests::corpus;

#[test]
fn every_vhdx_corpus_image_probes_as_vhdx() {
    let registry = Registry::builtin();
    let names: Vec<&str> = registry.backends().iter().map(|b| b.name()).collect();
    assert_eq!(names, ["vhdx", "vhd", "raw"]);
    let mut files: Vec<String> = corpus::expected()
        .iter()
        .map(|c| c["file"].as_str().unwrap().to_string())
        .collect();
    files.sort();
    files.dedup();
    assert!(files.len() >= 17, "{files:?}");
    let tmp = tempfile::tempdir().unwrap();
    for file in files {
        let image = tmp.path().join(corpus::image_name(&file));
        corpus::decompress(&file, &image);
        let m = registry.probe(&image).unwrap();
        assert_eq!(
            (m.backend.name(), m.confidence),
            ("vhdx", Confidence::Certain),
            "{file}"
        );
        std::fs::remove_file(&image).unwrap();
    }
}
