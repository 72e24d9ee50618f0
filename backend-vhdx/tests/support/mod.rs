//! Helpers shared by backend-vhdx's integration tests that run on an in-memory file system.

// Each test file uses the helpers it needs.
#![allow(dead_code)]

use std::path::Path;

use vd_core::{
    CreateParams, Disk, DiskOptions, Finding, Image, ImageFlags, OpenFlags, Registry, Result,
    Severity,
};

/// A new differencing image at `child` whose parent is the VHDX image at `parent`, created with
/// `params` (the differencing flag set here).
pub fn create_child(
    reg: &Registry,
    child: &str,
    parent: &str,
    params: &CreateParams,
) -> Box<dyn Image> {
    let p = reg
        .open(Path::new(parent), OpenFlags::READ_ONLY)
        .expect("open the parent");
    let params = CreateParams {
        image_flags: ImageFlags::DIFF,
        ..params.clone()
    };
    reg.create(
        "vhdx",
        Path::new(child),
        &params,
        Some((Path::new(parent), p.as_ref())),
        true,
    )
    .expect("create the child")
}

/// The image at `path`, with its parents, as a read-write disk (a dirty log is replayed).
pub fn open_rw(reg: &Registry, path: &str) -> Result<Disk> {
    Disk::open(
        reg,
        Path::new(path),
        &DiskOptions {
            flags: OpenFlags::empty(),
            ..DiskOptions::default()
        },
    )
}

/// Checks `img` and fails naming `ctx` when the check finds an error it did not repair.
pub fn assert_checks_clean(img: &dyn Image, ctx: &str) {
    let report = img.repair(true).expect("check");
    let errors: Vec<&Finding> = report
        .findings
        .iter()
        .filter(|f| f.severity == Severity::Error && !f.repaired)
        .collect();
    assert!(errors.is_empty(), "{ctx}: check: {errors:?}");
}
