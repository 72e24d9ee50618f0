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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_names_list_the_set_flags_in_declaration_order() {
        assert!(flag_names(&OpenFlags::empty()).is_empty());
        assert_eq!(
            flag_names(&(OpenFlags::STRICT | OpenFlags::READ_ONLY)),
            vec!["READ_ONLY", "STRICT"]
        );
        assert_eq!(
            flag_names(&(ImageFlags::FIXED | ImageFlags::DIFF)),
            vec!["FIXED", "DIFF"]
        );
        assert_eq!(flag_names(&Capabilities::all()).len(), 11);
        // Unknown bits have no name.
        assert!(flag_names(&OpenFlags::from_bits_retain(1 << 31)).is_empty());
    }

    #[test]
    fn every_flag_is_a_distinct_single_bit() {
        fn check<B: bitflags::Flags<Bits = u32>>() {
            let mut seen = 0u32;
            for f in B::FLAGS {
                let bits = f.value().bits();
                assert_eq!(bits.count_ones(), 1, "{}", f.name());
                assert_eq!(seen & bits, 0, "{} reuses a bit", f.name());
                seen |= bits;
            }
        }
        check::<OpenFlags>();
        check::<ImageFlags>();
        check::<Capabilities>();
    }

    #[test]
    fn flags_serialise_as_names() {
        // In human-readable formats (JSON) bitflags 2 writes the names joined by " | ".
        let v =
            serde_json::to_value(OpenFlags::READ_ONLY | OpenFlags::FORCE_SHARE).expect("serialise");
        assert_eq!(v, serde_json::json!("READ_ONLY | FORCE_SHARE"));
        assert_eq!(OpenFlags::default(), OpenFlags::empty());
        assert_eq!(Capabilities::MAP.bits(), 1 << 10);
        assert_eq!(ImageFlags::DIFF.bits(), 2);
    }
}
