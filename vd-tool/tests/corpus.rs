//! Every VHDX image of the corpus (`tests/data/` in the repository, made by Hyper-V, Windows,
//! Disk2VHD and QEMU) reads as `expected.json` says: `vd-tool convert -O raw` produces a disk whose SHA-256
//! is `content_sha256`, `vd-tool info` reports the recorded facts, and the source files are not
//! changed by reading them. The corpus is required: a missing one fails the tests.

use std::process::Output;

use serde_json::Value;
use vd_tests::corpus::{decompress, expected, image_name};
use vd_tests::hash::sha256_sparse;
use vd_tests::process::output;
use vd_tests::{s, vd_tool_bin};

fn vd_tool(args: &[&str]) -> Output {
    output(vd_tool_bin!(), args)
}

/// The expected.json entries for `file` (a differencing image has two: with and without its
/// parent).
fn cases(file: &str) -> Vec<Value> {
    let v: Vec<Value> = expected()
        .into_iter()
        .filter(|i| i["file"] == file)
        .collect();
    assert!(!v.is_empty(), "{file} is not in expected.json");
    v
}

fn check_image(file: &str) {
    for case in cases(file) {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join(image_name(file));
        decompress(file, &image);
        let mut sources = vec![image.clone()];
        if let Some(parent) = case.get("parent").filter(|p| !p.is_null()) {
            let place = dir.path().join(parent["place_as"].as_str().unwrap());
            decompress(parent["file"].as_str().unwrap(), &place);
            sources.push(place);
        }
        let before: Vec<String> = sources.iter().map(|p| sha256_sparse(p)).collect();
        let raw = dir.path().join("out.raw");

        // info reports the recorded facts.
        let o = vd_tool(&["info", "--output", "json", s(&image)]);
        assert!(
            o.status.success(),
            "{file}: info: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let info: Value = serde_json::from_slice(&o.stdout).unwrap();
        let fs = &info["format_specific"];
        assert_eq!(info["format"], "vhdx", "{file}");
        assert_eq!(info["virtual_size"], case["virtual_size"], "{file}");
        assert_eq!(fs["block_size"], case["block_size"], "{file}");
        assert_eq!(
            fs["logical_sector_size"], case["logical_sector_size"],
            "{file}"
        );
        assert_eq!(
            fs["physical_sector_size"], case["physical_sector_size"],
            "{file}"
        );
        assert_eq!(fs["creator"], case["creator"], "{file}");
        assert_eq!(fs["virtual_disk_id"], case["virtual_disk_id"], "{file}");
        assert_eq!(info["uuid"], case["virtual_disk_id"], "{file}");
        assert_eq!(fs["data_write_guid"], case["data_write_guid"], "{file}");
        assert_eq!(info["modification_uuid"], case["data_write_guid"], "{file}");
        assert_eq!(fs["log"]["dirty"], case["log_dirty"], "{file}");
        let kind = if case["has_parent"] == true {
            "differencing"
        } else if case["leave_blocks_allocated"] == true {
            "fixed"
        } else {
            "dynamic"
        };
        assert_eq!(fs["type"], kind, "{file}");
        if let Some(loc) = case.get("parent_locator") {
            for (k, v) in loc.as_object().unwrap() {
                assert_eq!(&fs["parent_locator"][k], v, "{file}: parent locator {k}");
            }
        }

        let o = vd_tool(&["convert", "-O", "raw", s(&image), s(&raw)]);
        match case["content_sha256"].as_str() {
            Some(want) => {
                assert!(
                    o.status.success(),
                    "{file}: convert: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
                assert_eq!(
                    std::fs::metadata(&raw).unwrap().len(),
                    case["virtual_size"].as_u64().unwrap()
                );
                assert_eq!(sha256_sparse(&raw), want, "{file}: content differs");
                // The chain reads identically to the plain raw copy.
                let o = vd_tool(&["compare", s(&image), s(&raw)]);
                assert_eq!(o.status.code(), Some(0), "{file}: compare");
            }
            None => {
                // The differencing child without its parent: a clear error naming the paths.
                assert_eq!(o.status.code(), Some(2), "{file}");
                let err = String::from_utf8_lossy(&o.stderr);
                assert_eq!(err.lines().count(), 1, "{err}");
                assert!(err.contains("parent image not found"), "{err}");
                let loc = &case["parent_locator"];
                let rel = loc["relative_path"].as_str().unwrap();
                let name = rel.rsplit('\\').next().unwrap();
                assert!(
                    err.contains(&format!("{}/{name}", dir.path().display())),
                    "{err}"
                );
                assert!(!raw.exists(), "no output after a failed convert");
            }
        }
        let after: Vec<String> = sources.iter().map(|p| sha256_sparse(p)).collect();
        assert_eq!(before, after, "{file}: reading changed a source file");
    }
}

macro_rules! corpus_tests {
    ($($name:ident => $file:literal,)*) => {
        $(
            #[test]
            fn $name() {
                check_image($file);
            }
        )*

        #[test]
        fn every_corpus_image_has_a_test() {
            let listed = [$($file),*];
            for img in expected() {
                let f = img["file"].as_str().unwrap();
                assert!(listed.contains(&f), "{f} has no test");
            }
        }
    };
}

corpus_tests! {
    adiskreader_small_ntfs_dirty_log => "adiskreader/small_ntfs_test.vhdx.gz",
    coreos_config2_base => "coreos-hyperv/config2_base.vhdx.bz2",
    discutils_btrfs => "discutils/btrfs.vhdx.gz",
    discutils_lvm2_unmapped_blocks => "discutils/lvm2.vhdx.gz",
    discutils_swap => "discutils/swap.vhdx.gz",
    discutils_log_replay => "discutils/vhdx-log-replay.vhdx.gz",
    discutils_xfs => "discutils/xfs.vhdx.gz",
    discutils_xfs5 => "discutils/xfs5.vhdx.gz",
    dissect_differencing => "dissect.hypervisor/differencing.avhdx.gz",
    dissect_dynamic => "dissect.hypervisor/dynamic.vhdx.gz",
    dissect_fixed => "dissect.hypervisor/fixed.vhdx.gz",
    qemu_dirtylog_10g => "qemu-iotests/iotest-dirtylog-10G-4M.vhdx.bz2",
    qemu_dynamic_1g => "qemu-iotests/iotest-dynamic-1G.vhdx.bz2",
    qemu_disk2vhd_equal_headers => "qemu-iotests/test-disk2vhd.vhdx.bz2",
    synthetic_blkdebug_dirty_log => "synthetic/qemu-blkdebug-dirty-log.vhdx.gz",
    synthetic_4k_logical => "synthetic/qemu-patched-4k-logical.vhdx.gz",
    velociraptor_test => "velociraptor/test.vhdx.zip",
}
