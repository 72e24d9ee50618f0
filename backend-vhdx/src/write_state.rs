//! The mutable state of a writable session ([MS-VHDX] 2.2.2.1, 2.3): whether the session's
//! header update happened, the log position, and the metadata pages waiting for the next
//! commit. The engine holds it behind its write mutex; `write` works on it.

use std::collections::{BTreeMap, BTreeSet};

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
    pub fn set_file_end(&mut self, end: u64) {
        self.file_end = end.div_ceil(MIB) * MIB;
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
    pub fn new(file_len: u64) -> Self {
        Self {
            file_end: file_len.div_ceil(MIB) * MIB,
            sequence: 1,
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_end_is_rounded_up_to_a_mib() {
        let mut ws = WriteState::new(MIB + 1);
        assert_eq!(ws.file_end(), 2 * MIB);
        assert_eq!(ws.sequence, 1);
        ws.set_file_end(3 * MIB);
        assert_eq!(ws.file_end(), 3 * MIB);
        ws.set_file_end(0);
        assert_eq!(ws.file_end(), 0);
        ws.queue_page(4096, vec![1; 4096]);
        ws.queue_page(4096, vec![2; 4096]);
        assert_eq!(ws.dirty_pages.len(), 1);
        assert_eq!(ws.dirty_pages[&4096][0], 2);
        assert!(!ws.verified);
        ws.set_verified();
        assert!(ws.verified);
    }
}
