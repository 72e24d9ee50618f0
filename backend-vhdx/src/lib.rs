//! # backend-vhdx
//!
//! Microsoft's VHDX format ([MS-VHDX] 1.0) for vd.
//!
//! Fixed, dynamic and differencing images, 512 and 4096-byte sectors, block sizes 1–256 MiB,
//! every payload and sector-bitmap state; dirty logs are replayed into the file on read-write
//! opens and into an in-memory overlay on read-only opens.
//!
//! | feature | support |
//! | --- | --- |
//! | read, every image kind, 4 KiB sectors | yes |
//! | log replay (read-write: into the file; read-only: in memory; or refuse) | yes |
//! | write, with BAT / sector-bitmap updates through a batched log | yes |
//! | create fixed / dynamic / differencing (incomplete-file marker while creating) | yes |
//! | discard, write-zeroes (whole blocks become ZERO) | yes |
//! | resize (grow, moving the BAT if needed; shrink when the cut-off part is empty) | yes |
//! | compact (move blocks into holes, truncate) | yes |
//! | check (both headers and region table copies, BAT states, offsets, overlaps, log, truncated files and missing blocks); repair of a damaged header or region table copy from the good one | yes |
//! | geometry and comment (vd's own non-required user metadata items) | yes |
//! | updating stale parent locator paths after a chain opens | no |
//!
//! ## Module map
//!
//! Each module imports only modules on lower lines, so none reaches itself through its
//! imports (`lib`, the backend, is the top).
//!
//! ```text
//! backend  lib         Backend: probe, open, create then open
//! image    image               VhdxImage: the vd_core::Image impl; puts the path on errors
//! engine   check, dump, compact, resize, meta_edit
//!          write, read         impl Engine blocks (see below)
//!          engine              Engine: the open image's state, and the open
//! format   report              typed facts: LogState, Details, Dump
//!          create              writes a new file and returns
//!          bat
//!          metadata
//!          header, log, region, locator, write_state
//!          format, checksum, error
//!          guid
//! ```
//!
//! `engine` holds the crate-private `Engine`: storage, header, region table, metadata, BAT, what
//! the open found and the write session's state (with the lock order), and the open that
//! builds it. `read` (mapping and reads), `write` (header protocol, allocation, the log
//! writer), `meta_edit`, `resize`, `compact`, `check` and `dump` add `impl Engine` blocks that
//! use its fields directly; none of them knows the image's path. `image` wraps an `Engine` with
//! the path and storage provider as `VhdxImage`, whose `Image` methods each hand their work to
//! the engine and attach the path to errors in one place. `report` holds the typed facts the
//! engine reports (the log's state, `details`, `dump`) as `Serialize` structs that front ends
//! render; warnings and check findings are `vd_core::Warning` and `vd_core::Finding`.
//! `create` writes a file with the format modules only; `lib` opens it afterwards. `metadata`
//! builds the table it parses and lists the known system items once; `locator` parses and
//! builds parent locators and lists where a parent may be; `write_state` holds a writable
//! session's state, which the engine owns and `write` works on.
//!
//! ## File layout
//!
//! ```text
//! 0        64K       128K      192K      256K      320K   1M
//! | ident  | header1 | header2 | region1 | region2 | ...  | log, BAT, metadata, blocks (1 MiB aligned)
//! ```
//!
//! ## Open lifecycle
//!
//! 1. File identifier (`vhdxfile`, creator string).
//! 2. Both headers; the current one is the valid one with the higher sequence number (identical
//!    headers with equal numbers, as Disk2VHD writes, are accepted).
//! 3. A non-zero LogGuid: find the active log sequence, validate every entry, and replay it
//!    into an in-memory overlay that the following steps read through.
//! 4. Both region tables (either valid copy), then the metadata table and system items.
//! 5. The BAT, lazily, page by page; each entry is validated when first used.
//! 6. A read-write open with a dirty log checks every BAT entry, then replays the log into the
//!    file: nothing is written before the whole image checked out.
//!
//! ## Truncated files
//!
//! A file that ends before a structure is truncated, and missing data never reads as zeros:
//!
//! | what ends past the end of the file | found | tolerant read-only | strict, or read-write |
//! | --- | --- | --- | --- |
//! | log region, metadata region | open | error | error |
//! | FlushedFileOffset of the log head | open | error ([`Corruption::LogTruncatedFile`]) | error |
//! | BAT region, other regions | open | warning ([`Corruption::Truncated`]); a read of a missing BAT entry is an error | error |
//! | log writes, LastFileOffset ([MS-VHDX] 2.3.3 allows them) | open | warning ([`Corruption::LogBeyondFile`]) | strict: error; read-write: replayed |
//! | a payload or sector-bitmap block, wholly or partly | read, `check`, first change | the read fails ([`Corruption::BatBeyondFile`], naming the block and its file range) | the first change of a session fails before writing |
//!
//! Blocks are not looked for at open, which would read the whole BAT (512 MiB for a 64 TiB disk
//! with 1 MiB blocks). `check` reports each missing block and each truncated structure as an
//! error, and repairs none of them: the file is never extended to make missing data read as
//! zeros. The first change of a read-write session (a write, discard, resize, compact, metadata
//! edit or log replay) checks every BAT entry in one pass of bounded memory before it writes
//! anything; `SKIP_CONSISTENCY_CHECKS` skips that pass.
//!
//! ## Write lifecycle and crash consistency
//!
//! The first change of a session checks the whole BAT (see above), then writes new
//! FileWriteGuid and DataWriteGuid values (both header
//! slots, flushed). Payload data goes in place or into new blocks appended at the 1 MiB-aligned
//! end of the file; BAT and sector-bitmap changes stay in memory. `flush` makes the data durable,
//! then writes the changed 4 KiB metadata pages as log entries, sets the session's LogGuid,
//! writes the pages to their places and flushes; `close` clears the LogGuid (as `compact` does
//! before it shrinks the file, so no pending log says the file is longer). A crash at any point
//! leaves an image that opens by replaying its log, with every flushed write intact.
//!
//! ## I/O model
//!
//! A read maps the request block by block to file ranges, zeros, or "the parent" (through the
//! sector bitmap for partially present blocks), coalescing contiguous file ranges into one read.
//! `vd_core::Disk` sends parent ranges down the chain.
//!
//! Reads from many threads share one image without sharing a written cache line: the layout,
//! the BAT's bounds and its page cache are kept once per thread shard, and a read holds only its
//! own shard's locks (changes lock every shard; the lock order is documented on the engine).
//!
//! ## Security
//!
//! Every byte of an image is untrusted. Malformed input yields a typed [`Corruption`] (inside a
//! `vd_core::Error` naming the structure and offset), never a panic, an unbounded allocation or
//! an unbounded loop: counts are capped by the specification's limits, ranges are checked
//! against the file and against each other, and the log may not write into the header area or
//! the log itself.
//!
//! Link it into a binary with `use backend_vhdx as _;`.

#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic,
        clippy::arithmetic_side_effects
    )
)]
#![warn(clippy::cast_possible_truncation)]

use std::io;
use std::path::Path;

use vd_core::linkme::distributed_slice;
use vd_core::{
    BACKENDS, Backend, Capabilities, Confidence, Error, Image, OpenFlags, OpenRequest, Result,
    Storage,
};

mod bat;
mod check;
mod checksum;
mod compact;
mod create;
mod dump;
mod engine;
mod error;
mod format;
mod guid;
mod header;
mod image;
mod locator;
mod log;
mod meta_edit;
mod metadata;
mod read;
mod region;
mod report;
mod resize;
mod shard;
mod write;
mod write_state;

pub use bat::{BatSummary, BlockState, Layout};
pub use error::{BlockRef, Corruption, corruption_of};
pub use guid::{USER_COMMENT, USER_LCHS, USER_PCHS};
pub use image::VhdxImage;
pub use log::EntrySummary;
/// The resource limits an image is held to: every count, length and size read from a file is
/// checked against one of these before it is used to allocate, loop or seek, and a value over
/// its limit is a typed error (`Corrupt`, naming the field), never an allocation. Each
/// constant's documentation gives its reason; `tests/tests/limits.rs` opens an image at and
/// just over each. The chain depth is vd-core's [`vd_core::MAX_CHAIN_DEPTH`].
pub mod limits {
    pub use crate::bat::{MAX_CACHED_BAT_PAGES, MAX_CACHED_BITMAP_PAGES};
    pub use crate::format::{
        MAX_BAT_SIZE, MAX_BLOCK_SIZE, MAX_LOCATOR_ENTRIES, MAX_LOG_SIZE, MAX_METADATA_ENTRIES,
        MAX_METADATA_ITEM, MAX_REGION_ENTRIES, MAX_VIRTUAL_SIZE, MIN_BLOCK_SIZE,
    };
    pub use crate::log::{MAX_LAST_FILE_OFFSET, MAX_REPLAY_SECTORS};
    pub use crate::meta_edit::MAX_COMMENT;
}
pub use report::{
    BatFacts, BlockCounts, Details, Dump, HeaderFacts, HeaderFields, IdentifierFacts, ImageType,
    ItemFacts, ItemValue, LogFacts, LogReplay, LogState, RegionFacts, RegionTableFacts,
    TableCopyFacts,
};

/// The file-type identifier signature at offset 0 ([MS-VHDX] 2.2.1).
pub const FILE_SIGNATURE: [u8; 8] = *b"vhdxfile";

/// The VHDX backend.
#[derive(Debug, Default, Clone, Copy)]
pub struct VhdxBackend;

#[distributed_slice(BACKENDS)]
static VHDX: &'static dyn Backend = &VhdxBackend;

impl Backend for VhdxBackend {
    fn name(&self) -> &'static str {
        "vhdx"
    }

    fn description(&self) -> &'static str {
        "Microsoft VHDX (Hyper-V virtual hard disk v2)"
    }

    fn extensions(&self) -> &'static [&'static str] {
        &["vhdx", "avhdx"]
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::FILE
            | Capabilities::UUID
            | Capabilities::DIFF
            | Capabilities::MAP
            | Capabilities::WRITE
            | Capabilities::DISCARD
            | Capabilities::CREATE_DYNAMIC
            | Capabilities::CREATE_FIXED
            | Capabilities::REPAIR
            | Capabilities::RESIZE
            | Capabilities::COMPACT
    }

    fn priority(&self) -> i32 {
        100
    }

    /// `Certain` when the file starts with `vhdxfile`, `No` otherwise (including files shorter
    /// than the signature). Reads eight bytes.
    fn probe(&self, storage: &dyn Storage, path: &Path) -> Result<Confidence> {
        let mut sig = [0u8; 8];
        match storage.read_exact_at(0, &mut sig) {
            Ok(()) if sig == FILE_SIGNATURE => Ok(Confidence::Certain),
            Ok(()) => Ok(Confidence::No),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(Confidence::No),
            Err(e) => Err(Error::io("cannot read the file identifier", e).with_path(path)),
        }
    }

    fn open(&self, req: OpenRequest<'_>) -> Result<Box<dyn Image>> {
        VhdxImage::open(req).map(|i| Box::new(i) as Box<dyn Image>)
    }

    fn create_options(&self) -> &'static [vd_core::CreateOption] {
        create::CREATE_OPTIONS
    }

    /// Creates a fixed, dynamic or differencing image, with the options of
    /// [`Backend::create_options`].
    fn create(&self, req: vd_core::CreateRequest<'_>) -> Result<Box<dyn Image>> {
        create::create(&req).map_err(|e| e.with_path(req.path))?;
        VhdxImage::open(OpenRequest {
            path: req.path,
            storage: req.storage,
            provider: req.provider,
            flags: OpenFlags::empty(),
        })
        .map(|i| Box::new(i) as Box<dyn Image>)
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Images created in memory for the unit tests of the modules that work on an open image.

    use std::collections::BTreeMap;
    use std::path::Path;
    use std::sync::Arc;

    use vd_core::{
        Backend, CreateParams, CreateRequest, Image, ImageFlags, MemFileSystem, MemStorage,
        OpenFlags, OpenRequest, Storage,
    };

    use crate::{VhdxBackend, VhdxImage};

    /// A new image of `size` bytes with the `-o` options `options`, and its storage.
    pub(crate) fn create(
        size: u64,
        options: &[(&str, &str)],
    ) -> (Arc<dyn Storage>, Box<dyn Image>) {
        let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
        let params = CreateParams {
            size,
            image_flags: ImageFlags::empty(),
            options: options
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect::<BTreeMap<_, _>>(),
            ..CreateParams::default()
        };
        let image = VhdxBackend
            .create(CreateRequest {
                path: Path::new("t.vhdx"),
                storage: storage.clone(),
                provider: Arc::new(MemFileSystem::new()),
                params: &params,
                parent: None,
            })
            .unwrap();
        (storage, image)
    }

    /// Opens `storage` again with `flags`.
    pub(crate) fn reopen(storage: &Arc<dyn Storage>, flags: OpenFlags) -> VhdxImage {
        VhdxImage::open(OpenRequest {
            path: Path::new("t.vhdx"),
            storage: storage.clone(),
            provider: Arc::new(MemFileSystem::new()),
            flags,
        })
        .unwrap()
    }

    /// The `len` bytes of `image` at `offset`.
    pub(crate) fn read(image: &dyn Image, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        image.read_at(offset, &mut buf).unwrap();
        buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vd_core::MemStorage;

    #[test]
    fn probe_needs_the_signature() {
        let mut bytes = b"vhdxfile".to_vec();
        bytes.resize(4096, 0);
        let p = Path::new("x.vhdx");
        assert_eq!(
            VhdxBackend
                .probe(&MemStorage::from_bytes(bytes), p)
                .unwrap(),
            Confidence::Certain
        );
        assert_eq!(
            VhdxBackend
                .probe(&MemStorage::from_bytes(b"vhdxfil".to_vec()), p)
                .unwrap(),
            Confidence::No
        );
        assert_eq!(
            VhdxBackend
                .probe(&MemStorage::from_bytes(b"conectix".to_vec()), p)
                .unwrap(),
            Confidence::No
        );
    }
}
