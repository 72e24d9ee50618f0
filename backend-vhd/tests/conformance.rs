//! The vd-core conformance suite against VHD: random write / read / flush / reopen / discard /
//! write-zeroes sequences checked against an in-memory model, and power-loss runs in which
//! every write a completed flush covered must survive. Dynamic, fixed and differencing images.

use std::path::Path;

use backend_vhd as _;
use vd_core::testing::conformance::{Subject, check_power_loss, check_sequences};
use vd_core::testing::fill_pattern;
use vd_core::{CreateParams, Disk, DiskOptions, ImageFlags, OpenFlags, Registry, Result};

struct Vhd {
    name: &'static str,
    options: &'static [(&'static str, &'static str)],
    differencing: bool,
}

impl Vhd {
    fn params(&self, size: u64) -> CreateParams {
        CreateParams {
            size,
            options: self
                .options
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
            ..CreateParams::default()
        }
    }
}

const PARENT: &str = "/conformance/parent.vhd";
const PARENT_SEED: u8 = 0x5a;

impl Subject for Vhd {
    fn name(&self) -> String {
        self.name.into()
    }

    fn create(&self, registry: &Registry, path: &Path, size: u64) -> Result<Disk> {
        if !self.differencing {
            let img = registry.create("vhd", path, &self.params(size), None, true)?;
            return Disk::from_layers(vec![img]);
        }
        // A parent with a pattern over its first half, then a child over it.
        let parent_path = Path::new(PARENT);
        let parent = registry.create("vhd", parent_path, &self.params(size), None, true)?;
        let mut data = vec![0u8; usize::try_from(size / 2).unwrap()];
        fill_pattern(&mut data, 0, PARENT_SEED);
        parent.write_at(0, &data)?;
        parent.close(false)?;
        let parent = registry.open(parent_path, OpenFlags::READ_ONLY)?;
        let mut params = self.params(size);
        params.image_flags = ImageFlags::DIFF;
        let child = registry.create(
            "vhd",
            path,
            &params,
            Some((parent_path, parent.as_ref())),
            true,
        )?;
        child.close(false)?;
        parent.close(false)?;
        Disk::open(
            registry,
            path,
            &DiskOptions {
                flags: OpenFlags::empty(),
                ..DiskOptions::default()
            },
        )
    }

    fn initial(&self, size: u64) -> Vec<u8> {
        let mut v = vec![0u8; usize::try_from(size).unwrap()];
        if self.differencing {
            fill_pattern(&mut v[..usize::try_from(size / 2).unwrap()], 0, PARENT_SEED);
        }
        v
    }

    fn size_range(&self) -> (u64, u64) {
        (16 * 512, 6 << 20)
    }

    /// A differencing VHD cannot record "zero" for a sector (a clear bit reads the parent).
    fn supports_discard(&self) -> bool {
        !self.differencing
    }
}

const DYNAMIC: Vhd = Vhd {
    name: "vhd dynamic 512K",
    options: &[("block_size", "512K")],
    differencing: false,
};
const FIXED: Vhd = Vhd {
    name: "vhd fixed",
    options: &[("subformat", "fixed")],
    differencing: false,
};
const DIFF: Vhd = Vhd {
    name: "vhd differencing 512K",
    options: &[("block_size", "512K")],
    differencing: true,
};

#[test]
fn dynamic_sequences() {
    check_sequences(&DYNAMIC, 48);
}

#[test]
fn fixed_sequences() {
    check_sequences(&FIXED, 32);
}

#[test]
fn differencing_sequences() {
    check_sequences(&DIFF, 48);
}

#[test]
fn dynamic_power_loss() {
    check_power_loss(&DYNAMIC, 96);
}

#[test]
fn fixed_power_loss() {
    check_power_loss(&FIXED, 48);
}

#[test]
fn differencing_power_loss() {
    check_power_loss(&DIFF, 96);
}
