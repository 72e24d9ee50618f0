//! Support shared by the integration tests of the vd workspace (this crate's `tests/` and
//! vd-tool's `tests/`): one process runner, the peers we check our results against (qemu-img,
//! qemu-io, libvhdi's `pyvhdi`, `dissect.hypervisor`), hashing, VHDX field offsets with CRC-32C
//! re-sealing, and the real-image corpus in `tests/data/`.
//!
//! A missing peer fails the calling test with one line naming the peer and the command that
//! installs it ([`peers`]); tests never skip.

pub mod corpus;
pub mod fuzzing;
pub mod hash;
pub mod peers;
pub mod process;
pub mod qemu;
pub mod readers;
pub mod tool;
pub mod vhdx;

/// The path of the `vd-tool` binary, for vd-tool's own integration tests (Cargo sets
/// `CARGO_BIN_EXE_vd-tool` only there, so this expands at the caller).
#[macro_export]
macro_rules! vd_tool_bin {
    () => {
        env!("CARGO_BIN_EXE_vd-tool")
    };
}

/// A path as UTF-8 (temporary and repository paths are).
///
/// # Panics
///
/// When the path is not UTF-8.
pub fn s(path: &std::path::Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}
