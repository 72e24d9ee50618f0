//! The static, per-format half of VirtualBox's `VDIMAGEBACKEND`: naming, capabilities, probing,
//! opening and creating.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::flags::{Capabilities, ImageFlags, OpenFlags};
use crate::geometry::Geometry;
use crate::image::Image;
use crate::storage::{Storage, StorageProvider};

/// How sure a backend is that a file is in its format. Ordered: `No < Fallback < Likely <
/// Certain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Confidence {
    /// Not this format.
    No,
    /// Could be read as this format, but so could anything (raw).
    Fallback,
    /// Looks like this format, but without a definitive signature.
    Likely,
    /// The format's signature is present.
    Certain,
}

/// Everything a backend needs to open an image (VirtualBox `pfnOpen` arguments).
#[derive(Debug, Clone)]
pub struct OpenRequest<'a> {
    /// The image's path, used for messages and to resolve relative parent paths.
    pub path: &'a Path,
    /// The opened file.
    pub storage: Arc<dyn Storage>,
    /// The file system, for parents, rename and delete.
    pub provider: Arc<dyn StorageProvider>,
    /// How to open.
    pub flags: OpenFlags,
}

/// Parameters of a new image (VirtualBox `pfnCreate` arguments).
#[derive(Debug, Clone, Default)]
pub struct CreateParams {
    /// Virtual size in bytes.
    pub size: u64,
    /// `FIXED` for a preallocated image; `DIFF` for a differencing image.
    pub image_flags: ImageFlags,
    /// Format-specific options (`-o key=value`), validated by the backend.
    pub options: BTreeMap<String, String>,
    /// Physical geometry to store, if the format stores one.
    pub pchs: Option<Geometry>,
    /// Logical geometry to store, if the format stores one.
    pub lchs: Option<Geometry>,
    /// Image UUID; a random one when `None`.
    pub uuid: Option<uuid::Uuid>,
    /// Comment to store.
    pub comment: Option<String>,
}

/// Everything a backend needs to create an image.
pub struct CreateRequest<'a> {
    /// The new image's path.
    pub path: &'a Path,
    /// The newly created, empty file.
    pub storage: Arc<dyn Storage>,
    /// The file system.
    pub provider: Arc<dyn StorageProvider>,
    /// What to create.
    pub params: &'a CreateParams,
    /// For a differencing image: the opened parent and its path.
    pub parent: Option<(&'a Path, &'a dyn Image)>,
}

impl std::fmt::Debug for CreateRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateRequest")
            .field("path", &self.path)
            .field("params", &self.params)
            .field("parent", &self.parent.map(|(p, _)| p))
            .finish_non_exhaustive()
    }
}

/// One image format (VirtualBox `VDIMAGEBACKEND`'s static fields and `pfnProbe`, `pfnOpen`,
/// `pfnCreate`).
pub trait Backend: Send + Sync + 'static {
    /// Short unique name, e.g. `"vhdx"` (`pszBackendName`).
    fn name(&self) -> &'static str;
    /// One-line description.
    fn description(&self) -> &'static str;
    /// File extensions without the dot (`paFileExtensions`).
    fn extensions(&self) -> &'static [&'static str];
    /// What the backend can do (`uBackendCaps`).
    fn capabilities(&self) -> Capabilities;
    /// Probe priority: among equal confidences, higher probes first. Raw uses the lowest.
    fn priority(&self) -> i32 {
        0
    }
    /// Whether `storage` holds an image of this format (`pfnProbe`). Reads at most 64 KiB and
    /// never allocates from file values.
    ///
    /// # Errors
    /// I/O errors reading the storage.
    fn probe(&self, storage: &dyn Storage, path: &Path) -> Result<Confidence>;
    /// Opens an image (`pfnOpen`).
    ///
    /// # Errors
    /// Invalid or unsupported images, I/O errors.
    fn open(&self, req: OpenRequest<'_>) -> Result<Box<dyn Image>>;
    /// Creates an image (`pfnCreate`).
    ///
    /// # Errors
    /// `NotSupported` when the backend cannot create; invalid parameters; I/O errors.
    fn create(&self, req: CreateRequest<'_>) -> Result<Box<dyn Image>> {
        let _ = req;
        Err(Error::not_supported(&format!(
            "creating {} images",
            self.name()
        )))
    }
}
