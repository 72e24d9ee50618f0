//! The mutable state of a writable session ([MS-VHDX] 2.2.2.1, 2.3): whether the session's
//! header update happened, the log position, and the metadata pages waiting for the next
//! commit. The engine holds it behind its write mutex; `write` works on it.

use std::collections::{BTreeMap, BTreeSet};

use vd_core::Result;

use crate::error::overflow;
use crate::format::MIB;
use crate::guid::Guid;

/// The mutable state of a writable session.
#[derive(Debug, Default)]
pub struct WriteState {
    pub(crate) started: bool,
    pub(crate) verified: bool,
    pub(crate) data_changed: bool,
    pub(crate) log_guid: Option<Guid>,
    pub(crate) header_has_guid: bool,
    pub(crate) log_pos: u64,
    pub(crate) sequence: u64,
    pub(crate) dirty_bat: BTreeSet<u64>,
    pub(crate) dirty_bitmaps: BTreeSet<u64>,
    pub(crate) dirty_pages: BTreeMap<u64, Vec<u8>>,
    pub(crate) file_end: u64,
}

impl WriteState {
    /// The next allocation offset (the 1 MiB-aligned end of the file).
    pub fn file_end(&self) -> u64 {
        self.file_end
    }

    /// Sets the end of the file after truncation.
    ///
    /// # Errors
    /// `OutOfRange` when the 1 MiB-aligned end overflows.
    pub fn set_file_end(&mut self, end: u64) -> Result<()> {
        self.file_end = aligned_end(end)?;
        Ok(())
    }

    /// Records that the whole BAT was checked (by an open that replayed the log).
    pub fn set_verified(&mut self) {
        self.verified = true;
    }

    /// Queues a whole 4 KiB page of metadata for the next commit.
    pub fn queue_page(&mut self, offset: u64, page: Vec<u8>) {
        self.dirty_pages.insert(offset, page);
    }

    /// A session over a file of `file_len` bytes.
    ///
    /// # Errors
    /// `OutOfRange` when the 1 MiB-aligned end of the file overflows (a file within 1 MiB of
    /// 2^64 bytes): new blocks could not be placed after it.
    pub fn new(file_len: u64) -> Result<Self> {
        Ok(Self {
            file_end: aligned_end(file_len)?,
            sequence: 1,
            ..Self::default()
        })
    }
}

/// `len` rounded up to a whole MiB, where the next block goes.
fn aligned_end(len: u64) -> Result<u64> {
    len.checked_next_multiple_of(MIB)
        .ok_or_else(|| overflow("1 MiB-aligned end of the file"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_end_is_rounded_up_to_a_mib() {
        let mut ws = WriteState::new(MIB + 1).unwrap();
        assert_eq!(ws.file_end(), 2 * MIB);
        assert_eq!(ws.sequence, 1);
        ws.set_file_end(3 * MIB).unwrap();
        assert_eq!(ws.file_end(), 3 * MIB);
        ws.set_file_end(0).unwrap();
        assert_eq!(ws.file_end(), 0);
        ws.queue_page(4096, vec![1; 4096]);
        ws.queue_page(4096, vec![2; 4096]);
        assert_eq!(ws.dirty_pages.len(), 1);
        assert_eq!(ws.dirty_pages[&4096][0], 2);
        assert!(!ws.verified);
        ws.set_verified();
        assert!(ws.verified);
    }

    #[test]
    fn a_file_end_that_cannot_be_rounded_to_a_mib_is_an_error_not_zero() {
        // Rounding u64::MAX - 5 up to a MiB wraps to 0 without the check: new blocks would be
        // placed over the header section.
        let e = WriteState::new(u64::MAX - 5).unwrap_err();
        assert_eq!(e.kind(), vd_core::ErrorKind::OutOfRange);
        assert!(e.to_string().contains("aligned end of the file"), "{e}");
        let mut ws = WriteState::new(0).unwrap();
        assert!(ws.set_file_end(u64::MAX).is_err());
        assert_eq!(ws.file_end(), 0);
    }
}
