//! Azure's rule for VHD sizes: Azure takes only fixed VHDs whose virtual size is a whole number
//! of MiB (the file is that size plus the 512-byte footer). `create` with `azure=on` rounds
//! the size up with [`azure_size`]; callers that tell the user (vd-tool prints a note) compare
//! the created image's size with the one asked, so this is the only place the rule is written.

/// Azure's size unit: 1 MiB.
pub const AZURE_ALIGN: u64 = 1 << 20;

/// `size` rounded up to a whole MiB, as Azure requires; None when that overflows a `u64`.
pub fn azure_size(size: u64) -> Option<u64> {
    size.checked_next_multiple_of(AZURE_ALIGN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_up_to_whole_mib() {
        const MIB: u64 = 1 << 20;
        for (asked, got) in [
            (0, Some(0)),
            (1, Some(MIB)),
            (512, Some(MIB)),
            (MIB, Some(MIB)),
            (MIB + 512, Some(2 * MIB)),
            (64 * MIB, Some(64 * MIB)),
            (64 * MIB + 512, Some(65 * MIB)),
            (10 * MIB - 512, Some(10 * MIB)),
            (u64::MAX - MIB + 1, Some(u64::MAX - MIB + 1)),
            (u64::MAX - MIB + 2, None),
        ] {
            assert_eq!(azure_size(asked), got, "{asked}");
        }
    }
}
