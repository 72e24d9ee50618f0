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
use crate::options::CreateOption;
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
    /// The format options `create` takes (`-o key=value`), with their values and defaults
    /// (VirtualBox's `paConfigInfo`). A backend parses its options through this same table
    /// ([`parse_create_options`](crate::parse_create_options)), so what `-o help` lists is
    /// what `create` accepts.
    fn create_options(&self) -> &'static [CreateOption] {
        &[]
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use crate::storage::{MemFileSystem, MemStorage};
    use crate::testing::backends::{TagBackend, tagged_file};

    #[test]
    fn confidence_is_ordered_no_fallback_likely_certain() {
        let order = [
            Confidence::No,
            Confidence::Fallback,
            Confidence::Likely,
            Confidence::Certain,
        ];
        for w in order.windows(2) {
            assert!(w[0] < w[1], "{:?} < {:?}", w[0], w[1]);
        }
        assert_eq!(order.iter().max(), Some(&Confidence::Certain));
        assert_eq!(
            serde_json::to_value(Confidence::Fallback).expect("json"),
            "fallback"
        );
    }

    #[test]
    fn create_and_priority_have_defaults() {
        let b = TagBackend::new("tagger", 7, Confidence::Likely);
        assert_eq!(b.priority(), 7);
        let fs: Arc<dyn StorageProvider> = Arc::new(MemFileSystem::new());
        let params = CreateParams::default();
        let req = CreateRequest {
            path: Path::new("/n.img"),
            storage: Arc::new(MemStorage::new()),
            provider: fs,
            params: &params,
            parent: None,
        };
        assert!(format!("{req:?}").contains("/n.img"));
        let e = b.create(req).expect_err("the default create");
        assert_eq!(e.kind(), ErrorKind::NotSupported);
        assert!(e.to_string().contains("tagger"), "names the backend: {e}");

        /// A backend that leaves `priority` alone.
        struct Plain;
        impl Backend for Plain {
            fn name(&self) -> &'static str {
                "plain"
            }
            fn description(&self) -> &'static str {
                "default priority"
            }
            fn extensions(&self) -> &'static [&'static str] {
                &[]
            }
            fn capabilities(&self) -> Capabilities {
                Capabilities::empty()
            }
            fn probe(&self, _: &dyn Storage, _: &Path) -> Result<Confidence> {
                Ok(Confidence::No)
            }
            fn open(&self, _: OpenRequest<'_>) -> Result<Box<dyn Image>> {
                Err(Error::not_supported("opening"))
            }
        }
        assert_eq!(Plain.priority(), 0);
        assert!(
            Plain.create_options().is_empty(),
            "no options unless declared"
        );
    }

    #[test]
    fn a_probe_answers_from_the_signature_and_short_files_are_not_errors() {
        let b = TagBackend::new("t", 0, Confidence::Certain);
        let p = Path::new("/p");
        let probe = |bytes: Vec<u8>| b.probe(&MemStorage::from_bytes(bytes), p);
        assert_eq!(probe(tagged_file(8)).expect("probe"), Confidence::Certain);
        assert_eq!(probe(vec![0; 4096]).expect("probe"), Confidence::No);
        assert_eq!(probe(b"TAG".to_vec()).expect("short"), Confidence::No);
        assert_eq!(probe(Vec::new()).expect("empty"), Confidence::No);
    }
}
