//! # vd-core
//!
//! The framework every vd image backend plugs into, modelled on VirtualBox's VD layer:
//!
//! - [`Backend`] and [`Image`]: the two halves of VirtualBox's `VDIMAGEBACKEND` vtable (the
//!   per-format half and the per-opened-image half). Each method's documentation names the
//!   VirtualBox callback it mirrors. Optional operations return [`ErrorKind::NotSupported`] and
//!   are advertised by [`Capabilities`].
//! - [`BACKENDS`]: the static backend table, a `linkme` distributed slice each backend crate
//!   registers itself into; [`Registry`] probes it in a documented order and accepts more
//!   backends at run time.
//! - [`Storage`] and [`StorageProvider`]: the I/O interface. Backends never touch `std::fs`.
//! - [`Disk`]: a chain of images (child over parents) read and written as one disk, with
//!   `std::io::{Read, Write, Seek}`.
//! - With the `test-util` feature, the `testing` module: a fault-injecting storage and the backend
//!   conformance suite.
//!
//! ```
//! use std::sync::Arc;
//! use vd_core::{MemFileSystem, Registry};
//!
//! // A registry of every linked backend, on an in-memory file system.
//! let registry = Registry::builtin_with_provider(Arc::new(MemFileSystem::new()));
//! for b in registry.backends() {
//!     println!("{} (priority {})", b.name(), b.priority());
//! }
//! ```

// `deny`, not `forbid`: the `lock` module needs fcntl(2), and allows it there alone.
#![deny(unsafe_code)]
#![deny(missing_docs)]
// Library code reports errors; an `expect` states its invariant. The test doubles of
// `testing` may panic (they are test code), and are exempt below.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::arithmetic_side_effects
    )
)]

mod backend;
mod candidates;
pub mod copy;
mod disk;
mod error;
mod flags;
mod geometry;
mod image;
mod layout;
mod lock;
mod mapping;
mod numbers;
mod options;
mod registry;
mod relocation;
mod report;
mod storage;

// Also built for vd-core's own unit tests, which use its test backends.
#[cfg(any(test, feature = "test-util"))]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects
)]
pub mod testing;

pub use backend::{Backend, Confidence, CreateParams, CreateRequest, OpenRequest};
pub use candidates::{ParentCandidates, relative_windows_path};
pub use disk::{Disk, DiskExtent, DiskOptions, MAX_CHAIN_DEPTH};
pub use error::{Context, Error, ErrorKind, LinkageMismatch, Result, error_chain};
pub use flags::{Capabilities, ImageFlags, OpenFlags, flag_names};
pub use geometry::Geometry;
pub use image::{Extent, ExtentKind, Image, Progress, check_parent_identity, check_range};
pub use layout::{BlockRuns, LayoutRegion, RegionKind};
pub use lock::LockConflict;
pub use mapping::{MappedExtent, Mapping, kind_runs, merge_extents, push_extent};
pub use numbers::{BYTE_SYNTAX, NumberError, SIZE_SYNTAX, parse_byte, parse_size};
pub use options::{
    CreateOption, CreateOptionValues, OptionKind, OptionValue, parse_create_options,
};
pub use registry::{BACKENDS, ProbeMatch, Registry, StagedImage};
pub use relocation::{LayoutHold, RelocationLock};
pub use report::{ByteSize, CheckReport, Facts, Finding, Offset, Severity, Warning};
pub use storage::{
    FileStorage, FileSystem, MemFileSystem, MemStorage, OpenMode, Storage, StorageProvider,
    StorageRun,
};

/// Re-exported so backends can register with `#[linkme::distributed_slice(vd_core::BACKENDS)]`
/// without naming `linkme` themselves.
pub use linkme;
