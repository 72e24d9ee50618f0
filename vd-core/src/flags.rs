//! Flag sets that VirtualBox passes as integers (`VD_OPEN_FLAGS_*`, `VD_IMAGE_FLAGS_*`,
//! `VD_CAP_*`), as `bitflags` types.

use bitflags::bitflags;

bitflags! {
    /// How an image is opened (VirtualBox `VD_OPEN_FLAGS_*`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
    pub struct OpenFlags: u32 {
        /// Open read-only (`VD_OPEN_FLAGS_READONLY`).
        const READ_ONLY = 1 << 0;
        /// Open only to query information; no data I/O (`VD_OPEN_FLAGS_INFO`).
        const INFO = 1 << 1;
        /// Zero ranges must read back as zeros (`VD_OPEN_FLAGS_HONOR_ZEROES`).
        const HONOR_ZEROES = 1 << 2;
        /// The image may be shared with other processes (`VD_OPEN_FLAGS_SHAREABLE`).
        const SHAREABLE = 1 << 3;
        /// Skip expensive consistency checks (`VD_OPEN_FLAGS_SKIP_CONSISTENCY_CHECKS`).
        const SKIP_CONSISTENCY_CHECKS = 1 << 4;
        /// Allow discard requests (`VD_OPEN_FLAGS_DISCARD`).
        const DISCARD = 1 << 5;
        /// The caller reads or writes sequentially (`VD_OPEN_FLAGS_SEQUENTIAL`).
        const SEQUENTIAL = 1 << 6;
        /// Flushes may be ignored (`VD_OPEN_FLAGS_IGNORE_FLUSH`).
        const IGNORE_FLUSH = 1 << 7;
        /// Refuse to open an image whose log must be replayed, instead of replaying it.
        const REFUSE_DIRTY_LOG = 1 << 8;
        /// Treat tolerated deviations from the format as errors.
        const STRICT = 1 << 9;
        /// With `READ_ONLY`: let other processes write the image meanwhile, taking no lock
        /// that would exclude them (qemu-img's `-U`, `force-share=on`). What is read may
        /// change under the reader.
        const FORCE_SHARE = 1 << 10;
    }
}

bitflags! {
    /// What kind of image this is (VirtualBox `VD_IMAGE_FLAGS_*`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
    pub struct ImageFlags: u32 {
        /// Every block is preallocated (`VD_IMAGE_FLAGS_FIXED`).
        const FIXED = 1 << 0;
        /// A differencing image over a parent (`VD_IMAGE_FLAGS_DIFF`).
        const DIFF = 1 << 1;
    }
}

bitflags! {
    /// What a backend can do (VirtualBox `VD_CAP_*`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
    pub struct Capabilities: u32 {
        /// Stores a UUID (`VD_CAP_UUID`).
        const UUID = 1 << 0;
        /// Can create fixed images (`VD_CAP_CREATE_FIXED`).
        const CREATE_FIXED = 1 << 1;
        /// Can create dynamic (sparse) images (`VD_CAP_CREATE_DYNAMIC`).
        const CREATE_DYNAMIC = 1 << 2;
        /// Supports differencing images (`VD_CAP_DIFF`).
        const DIFF = 1 << 3;
        /// Images are plain files (`VD_CAP_FILE`).
        const FILE = 1 << 4;
        /// Supports discard (`VD_CAP_DISCARD`).
        const DISCARD = 1 << 5;
        /// Supports resizing.
        const RESIZE = 1 << 6;
        /// Supports compacting.
        const COMPACT = 1 << 7;
        /// Supports check and repair.
        const REPAIR = 1 << 8;
        /// Can write to opened images.
        const WRITE = 1 << 9;
        /// Reports block status through `map`.
        const MAP = 1 << 10;
    }
}

/// Names of the set flags, for human and JSON output.
pub fn flag_names<B: bitflags::Flags>(flags: &B) -> Vec<&'static str> {
    flags.iter_names().map(|(name, _)| name).collect()
}
