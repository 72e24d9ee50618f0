//! The static backend table and the [`Registry`] that probes it.
//!
//! Each backend crate adds itself to [`BACKENDS`]:
//!
//! ```text
//! #[linkme::distributed_slice(vd_core::BACKENDS)]
//! static VHDX: &'static dyn vd_core::Backend = &VhdxBackend;
//! ```
//!
//! and a binary links it with `use backend_vhdx as _;`. Probing asks every backend, takes the
//! highest [`Confidence`], and breaks ties by [`Backend::priority`] (higher first), then by name.
//! Raw answers [`Confidence::Fallback`] with the lowest priority, so it is chosen only when
//! nothing else claims a file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use linkme::distributed_slice;

use crate::backend::{Backend, Confidence, CreateParams, CreateRequest, OpenRequest};
use crate::error::{Error, ErrorKind, Result};
use crate::flags::{Capabilities, ImageFlags, OpenFlags};
use crate::image::Image;
use crate::storage::{FileSystem, OpenMode, Storage, StorageProvider};

/// The static backend table: every linked backend crate registers itself here.
#[distributed_slice]
pub static BACKENDS: [&'static dyn Backend];

/// A backend from the static table, shared like a run-time one.
struct Static(&'static dyn Backend);

impl Backend for Static {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn description(&self) -> &'static str {
        self.0.description()
    }
    fn extensions(&self) -> &'static [&'static str] {
        self.0.extensions()
    }
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
    fn priority(&self) -> i32 {
        self.0.priority()
    }
    fn probe(&self, storage: &dyn Storage, path: &Path) -> Result<Confidence> {
        self.0.probe(storage, path)
    }
    fn open(&self, req: OpenRequest<'_>) -> Result<Box<dyn Image>> {
        self.0.open(req)
    }
    fn create_options(&self) -> &'static [crate::options::CreateOption] {
        self.0.create_options()
    }
    fn create(&self, req: CreateRequest<'_>) -> Result<Box<dyn Image>> {
        self.0.create(req)
    }
}

/// The outcome of probing one file.
#[derive(Clone)]
pub struct ProbeMatch {
    /// The backend that claimed the file.
    pub backend: Arc<dyn Backend>,
    /// How sure it is.
    pub confidence: Confidence,
}

impl std::fmt::Debug for ProbeMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeMatch")
            .field("backend", &self.backend.name())
            .field("confidence", &self.confidence)
            .finish()
    }
}

/// A set of backends in probe order, with the file system they open images through.
#[derive(Clone)]
pub struct Registry {
    backends: Vec<Arc<dyn Backend>>,
    provider: Arc<dyn StorageProvider>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field(
                "backends",
                &self.backends.iter().map(|b| b.name()).collect::<Vec<_>>(),
            )
            .field("provider", &self.provider)
            .finish()
    }
}

fn probe_order(a: &Arc<dyn Backend>, b: &Arc<dyn Backend>) -> std::cmp::Ordering {
    b.priority()
        .cmp(&a.priority())
        .then_with(|| a.name().cmp(b.name()))
}

impl Registry {
    /// Every backend in the static table, on the host file system.
    pub fn builtin() -> Self {
        Self::builtin_with_provider(Arc::new(FileSystem))
    }

    /// Every backend in the static table, on `provider`.
    pub fn builtin_with_provider(provider: Arc<dyn StorageProvider>) -> Self {
        let mut r = Self::empty(provider);
        for b in BACKENDS {
            // Two statics of the same name would be a build mistake; keep the first.
            if r.get(b.name()).is_none() {
                r.backends.push(Arc::new(Static(*b)));
            }
        }
        r.backends.sort_by(probe_order);
        r
    }

    /// No backends, on `provider`.
    pub fn empty(provider: Arc<dyn StorageProvider>) -> Self {
        Self {
            backends: Vec::new(),
            provider,
        }
    }

    /// Adds a backend at run time (a plugin).
    ///
    /// # Errors
    /// `AlreadyExists` when a backend of that name is registered.
    pub fn register(&mut self, backend: Arc<dyn Backend>) -> Result<()> {
        if self.get(backend.name()).is_some() {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("a backend named {} is already registered", backend.name()),
            ));
        }
        self.backends.push(backend);
        self.backends.sort_by(probe_order);
        Ok(())
    }

    /// The backends in probe order.
    pub fn backends(&self) -> &[Arc<dyn Backend>] {
        &self.backends
    }

    /// The backend called `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Backend>> {
        self.backends
            .iter()
            .find(|b| b.name().eq_ignore_ascii_case(name))
    }

    /// The file system images are opened through.
    pub fn provider(&self) -> &Arc<dyn StorageProvider> {
        &self.provider
    }

    /// The backend called `name`; `NotFound` listing the formats there are when there is none.
    ///
    /// # Errors
    /// `NotFound`: `unknown format "qcow2"; the formats are: vhdx, vhd, raw` (in probe order).
    pub fn backend(&self, name: &str) -> Result<&Arc<dyn Backend>> {
        self.get(name).ok_or_else(|| {
            let names: Vec<&str> = self.backends.iter().map(|b| b.name()).collect();
            Error::new(
                ErrorKind::NotFound,
                format!(
                    "unknown format {name:?}; the formats are: {}",
                    names.join(", ")
                ),
            )
        })
    }

    fn open_storage(&self, path: &Path, mode: OpenMode) -> Result<Arc<dyn Storage>> {
        self.provider
            .open(path, mode)
            .map_err(|e| Error::io("cannot open", e).with_path(path))
    }

    /// Asks every backend about `storage` and returns the best match.
    ///
    /// # Errors
    /// `UnknownFormat` when no backend claims it.
    pub fn probe_storage(&self, storage: &dyn Storage, path: &Path) -> Result<ProbeMatch> {
        let mut best: Option<ProbeMatch> = None;
        let mut io_failure: Option<Error> = None;
        for b in &self.backends {
            let confidence = match b.probe(storage, path) {
                Ok(c) => c,
                Err(e) => {
                    log::debug!("{}: probe by {} failed: {e}", path.display(), b.name());
                    if e.kind() == ErrorKind::Io && io_failure.is_none() {
                        io_failure = Some(e);
                    }
                    Confidence::No
                }
            };
            log::debug!("{}: {} says {confidence:?}", path.display(), b.name());
            if confidence > Confidence::No
                && best.as_ref().is_none_or(|m| confidence > m.confidence)
            {
                best = Some(ProbeMatch {
                    backend: b.clone(),
                    confidence,
                });
            }
        }
        // A backend that could not read the file might have claimed it: do not fall back to
        // raw (and expose its metadata as disk contents) on a transient I/O error.
        if let Some(e) = io_failure
            && best
                .as_ref()
                .is_none_or(|m| m.confidence <= Confidence::Fallback)
        {
            return Err(e.with_path(path));
        }
        let best = best.ok_or_else(|| {
            Error::new(ErrorKind::UnknownFormat, "no backend recognises the file").with_path(path)
        })?;
        log::info!(
            "{}: {} claims it ({:?})",
            path.display(),
            best.backend.name(),
            best.confidence
        );
        Ok(best)
    }

    /// Opens `path` read-only and probes it.
    ///
    /// # Errors
    /// The file cannot be opened; `Locked` when another process is writing it; `UnknownFormat`.
    pub fn probe(&self, path: &Path) -> Result<ProbeMatch> {
        let storage = self.open_storage(path, OpenMode::ReadOnly)?;
        self.probe_storage(storage.as_ref(), path)
    }

    /// Probes and opens the image at `path`. The file is opened once, in the mode `flags`
    /// ask for (and locked for it), then probed and handed to the backend that claims it.
    ///
    /// # Errors
    /// As [`probe`](Registry::probe) and [`Backend::open`]; `Locked` when another process has
    /// the image open in a conflicting mode.
    pub fn open(&self, path: &Path, flags: OpenFlags) -> Result<Box<dyn Image>> {
        let storage = self.open_storage(path, OpenMode::from_flags(flags)?)?;
        let m = self.probe_storage(storage.as_ref(), path)?;
        self.open_with(&m.backend, path, storage, flags)
    }

    /// Opens `path` with the backend called `name`, bypassing probing.
    ///
    /// # Errors
    /// `NotFound` for an unknown backend name; as [`Backend::open`].
    pub fn open_as(&self, name: &str, path: &Path, flags: OpenFlags) -> Result<Box<dyn Image>> {
        let b = self.backend(name)?.clone();
        let storage = self.open_storage(path, OpenMode::from_flags(flags)?)?;
        self.open_with(&b, path, storage, flags)
    }

    fn open_with(
        &self,
        backend: &Arc<dyn Backend>,
        path: &Path,
        storage: Arc<dyn Storage>,
        flags: OpenFlags,
    ) -> Result<Box<dyn Image>> {
        let image = backend
            .open(OpenRequest {
                path,
                storage,
                provider: self.provider.clone(),
                flags,
            })
            .map_err(|e| e.with_path(path))?;
        log::info!(
            "{}: opened as {} ({}), {} bytes",
            path.display(),
            backend.name(),
            if flags.contains(OpenFlags::READ_ONLY) {
                "read-only"
            } else {
                "read-write, locked for writing"
            },
            image.size()
        );
        Ok(image)
    }

    /// Creates a new image at `path` with the backend called `name`. A differencing image
    /// (`ImageFlags::DIFF`) needs `parent`.
    ///
    /// Without `overwrite` the file must not exist. With `overwrite` an existing file is
    /// emptied first (the provider refuses anything but a regular file); to keep it until the
    /// new image is complete, use [`create_staged`](Registry::create_staged) instead. A failed
    /// create deletes the partial file.
    ///
    /// # Errors
    /// `AlreadyExists` unless `overwrite`; `InvalidArgument` for a new image at its parent's
    /// file; as [`Backend::create`].
    pub fn create(
        &self,
        name: &str,
        path: &Path,
        params: &CreateParams,
        parent: Option<(&Path, &dyn Image)>,
        overwrite: bool,
    ) -> Result<Box<dyn Image>> {
        let backend = self.backend(name)?.clone();
        check_new_params(params, path, parent, self.provider.as_ref())?;
        let storage = self
            .provider
            .create(path, overwrite)
            .map_err(|e| Error::io("cannot create", e).with_path(path))?;
        create_in(
            &backend,
            path,
            storage,
            self.provider.clone(),
            params,
            parent,
        )
        .inspect_err(|_| {
            if let Err(del) = self.provider.delete(path) {
                log::warn!(
                    "{}: removing the partial image failed: {del}",
                    path.display()
                );
            }
        })
    }

    /// Creates a new image that will replace whatever is at `path` only when
    /// [`StagedImage::commit`] is called: the image is built in a new file beside `path` (beside
    /// the file a symbolic link at `path` leads to, keeping the link), and renamed over it on
    /// commit. Dropping the staged image instead deletes the new file and leaves `path` as it
    /// was. A `path` that exists and is not a regular file (a device, a FIFO, a directory) is
    /// refused before anything is written.
    ///
    /// # Errors
    /// `InvalidArgument` when `path` is not a regular file or is the parent itself; as
    /// [`Backend::create`].
    pub fn create_staged(
        &self,
        name: &str,
        path: &Path,
        params: &CreateParams,
        parent: Option<(&Path, &dyn Image)>,
    ) -> Result<StagedImage> {
        let backend = self.backend(name)?.clone();
        let target = self
            .provider
            .replace_target(path)
            .map_err(|e| Error::io("cannot replace the file", e).with_path(path))?;
        check_new_params(params, &target, parent, self.provider.as_ref())?;
        let (temp, storage) = self
            .provider
            .create_beside(&target)
            .map_err(|e| Error::io("cannot create a new file beside it", e).with_path(path))?;
        let mut staged = StagedImage {
            image: None,
            file: storage.clone(),
            temp,
            target,
            provider: self.provider.clone(),
        };
        let img = create_in(
            &backend,
            &staged.temp,
            storage,
            self.provider.clone(),
            params,
            parent,
        )
        .map_err(|e| e.with_path(path))?;
        staged.image = Some(img);
        Ok(staged)
    }
}

/// Refuses a differencing image without a parent, and a new image at its parent's own file.
fn check_new_params(
    params: &CreateParams,
    path: &Path,
    parent: Option<(&Path, &dyn Image)>,
    provider: &dyn StorageProvider,
) -> Result<()> {
    if params.image_flags.contains(ImageFlags::DIFF) && parent.is_none() {
        return Err(Error::invalid_argument(
            "a differencing image needs a parent",
        ));
    }
    if let Some((p, _)) = parent
        && provider.same_file(p, path)
    {
        return Err(Error::invalid_argument(format!(
            "the new image would be its own parent ({} is the same file)",
            p.display()
        ))
        .with_path(path));
    }
    Ok(())
}

fn create_in(
    backend: &Arc<dyn Backend>,
    path: &Path,
    storage: Arc<dyn Storage>,
    provider: Arc<dyn StorageProvider>,
    params: &CreateParams,
    parent: Option<(&Path, &dyn Image)>,
) -> Result<Box<dyn Image>> {
    let image = backend
        .create(CreateRequest {
            path,
            storage,
            provider,
            params,
            parent,
        })
        .map_err(|e| e.with_path(path))?;
    log::info!(
        "{}: created as {}, {} bytes{}",
        path.display(),
        backend.name(),
        image.size(),
        parent.map_or(String::new(), |(p, _)| format!(
            ", differencing over {}",
            p.display()
        ))
    );
    Ok(image)
}

/// A newly created image that replaces its destination only when committed (see
/// [`Registry::create_staged`]). Until then it lives in a file of its own beside the
/// destination; dropping it without [`commit`](StagedImage::commit) deletes that file.
pub struct StagedImage {
    image: Option<Box<dyn Image>>,
    /// The new file, as created (the image writes through its own handle to it).
    file: Arc<dyn Storage>,
    temp: PathBuf,
    target: PathBuf,
    provider: Arc<dyn StorageProvider>,
}

impl std::fmt::Debug for StagedImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagedImage")
            .field("temp", &self.temp)
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl StagedImage {
    /// The new image, open for writing.
    #[allow(
        clippy::expect_used,
        reason = "`image` is Some from staging until `commit`, which consumes self"
    )]
    pub fn image(&self) -> &dyn Image {
        self.image
            .as_deref()
            .expect("a staged image holds its image until commit or drop")
    }

    /// The new image's file, as the provider created it: for a raw image, the disk byte for
    /// byte; for any image, what writeback hints ([`Storage::start_writeback`]) go to. Changes
    /// to an image's structures go through [`image`](Self::image), never through this.
    pub fn file(&self) -> &dyn Storage {
        &*self.file
    }

    /// The path the image will be renamed to.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Flushes and closes the image, then renames it over the destination.
    ///
    /// # Errors
    /// Errors of the flush, the close or the rename; the destination is then unchanged and
    /// the new file is deleted.
    #[allow(
        clippy::expect_used,
        reason = "`image` is Some from staging until here; only this takes it"
    )]
    pub fn commit(mut self) -> Result<()> {
        let img = self
            .image
            .take()
            .expect("a staged image holds its image until commit or drop");
        img.flush()?;
        img.close(false)?;
        self.provider
            .rename(&self.temp, &self.target)
            .map_err(|e| Error::io("cannot rename the new image into place", e))
            .map_err(|e| e.with_path(&self.target))?;
        log::info!(
            "{}: complete, renamed over {}",
            self.temp.display(),
            self.target.display()
        );
        // Renamed: nothing is left to delete.
        self.temp = PathBuf::new();
        Ok(())
    }
}

impl Drop for StagedImage {
    fn drop(&mut self) {
        if let Some(img) = self.image.take() {
            // Closing with delete removes the new file (only ever the one we created).
            if let Err(e) = img.close(true) {
                log::warn!("{}: removing the new image: {e}", self.temp.display());
            }
        } else if !self.temp.as_os_str().is_empty()
            && let Err(e) = self.provider.delete(&self.temp)
        {
            log::warn!("{}: removing the new image: {e}", self.temp.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{MemFileSystem, MemStorage};
    use crate::testing::FaultyStorage;
    use crate::testing::backends::{LayerBackend, LayerSpec, TagBackend, tag, tagged_file};

    /// A backend in vd-core's own static table (only this test binary links it).
    #[allow(
        unsafe_code,
        reason = "linkme places the entry with link_section, as in every backend crate"
    )]
    #[distributed_slice(BACKENDS)]
    static STATIC_TAG: &'static dyn Backend = &TagBackend::new("static-tag", 3, Confidence::Likely);

    fn fs_registry() -> (Arc<MemFileSystem>, Registry) {
        let fs = Arc::new(MemFileSystem::new());
        let r = Registry::empty(fs.clone());
        (fs, r)
    }

    fn put(fs: &MemFileSystem, path: &str, bytes: Vec<u8>) {
        fs.insert(path, Arc::new(MemStorage::from_bytes(bytes)));
    }

    fn names(r: &Registry) -> Vec<&'static str> {
        r.backends().iter().map(|b| b.name()).collect()
    }

    fn winner(r: &Registry, storage: &dyn Storage) -> Result<(&'static str, Confidence)> {
        r.probe_storage(storage, Path::new("/t/x.img"))
            .map(|m| (m.backend.name(), m.confidence))
    }

    #[test]
    fn builtin_holds_the_static_table_in_probe_order() {
        let fs = Arc::new(MemFileSystem::new());
        let mut r = Registry::builtin_with_provider(fs.clone());
        assert_eq!(names(&r), vec!["static-tag"]);
        let b = r
            .get("STATIC-TAG")
            .expect("case-insensitive lookup")
            .clone();
        assert_eq!((b.priority(), b.extensions()), (3, &["tag"][..]));
        assert_eq!(b.capabilities(), Capabilities::FILE);
        r.register(tag("run-time", 3, Confidence::Certain))
            .expect("a new name");
        assert_eq!(names(&r), vec!["run-time", "static-tag"], "ties by name");
        put(&fs, "/t/x.img", tagged_file(64));
        let m = r.probe(Path::new("/t/x.img")).expect("probe");
        assert_eq!(m.backend.name(), "run-time", "Certain beats Likely");
        // The static entry's calls go through to the static backend.
        let s = MemStorage::from_bytes(tagged_file(64));
        let p = Path::new("/t/x.img");
        assert_eq!(b.probe(&s, p).expect("probe"), Confidence::Likely);
        assert!(format!("{r:?}").contains("static-tag"));
    }

    #[test]
    fn register_sorts_by_priority_then_name_and_refuses_duplicates() {
        let (_fs, mut r) = fs_registry();
        for (name, prio) in [
            ("b", 0),
            ("min", i32::MIN),
            ("a", 0),
            ("max", i32::MAX),
            ("n", -1),
        ] {
            r.register(tag(name, prio, Confidence::Likely))
                .expect("a new name");
        }
        assert_eq!(names(&r), vec!["max", "a", "b", "n", "min"]);
        for dup in ["a", "A", "MAX"] {
            let e = r
                .register(tag(dup, 99, Confidence::Certain))
                .expect_err("duplicate name");
            assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{dup}");
        }
        assert_eq!(names(&r).len(), 5, "a refused backend is not added");
        assert!(r.get("nope").is_none());
    }

    #[test]
    fn probing_takes_confidence_then_priority_then_name() {
        let tagged = MemStorage::from_bytes(tagged_file(512));
        /// Backends to register (name, priority, answer), and the expected winner.
        type Row = (
            &'static [(&'static str, i32, Confidence)],
            (&'static str, Confidence),
        );
        let rows: &[Row] = &[
            // Confidence beats priority.
            (
                &[
                    ("likely", 100, Confidence::Likely),
                    ("certain", -100, Confidence::Certain),
                ],
                ("certain", Confidence::Certain),
            ),
            // Equal confidence: higher priority.
            (
                &[
                    ("low", 1, Confidence::Likely),
                    ("high", 2, Confidence::Likely),
                ],
                ("high", Confidence::Likely),
            ),
            // Equal confidence and priority: name order.
            (
                &[
                    ("zeta", 5, Confidence::Likely),
                    ("alpha", 5, Confidence::Likely),
                ],
                ("alpha", Confidence::Likely),
            ),
            // A fallback wins only when nothing else claims the file.
            (
                &[
                    ("fallback", 100, Confidence::Fallback),
                    ("likely", -100, Confidence::Likely),
                ],
                ("likely", Confidence::Likely),
            ),
            (
                &[
                    ("fallback", 100, Confidence::Fallback),
                    ("no", 200, Confidence::No),
                ],
                ("fallback", Confidence::Fallback),
            ),
        ];
        for (backends, want) in rows {
            let (_fs, mut r) = fs_registry();
            for &(name, prio, conf) in *backends {
                r.register(tag(name, prio, conf)).expect("register");
            }
            assert_eq!(winner(&r, &tagged).expect("a match"), *want, "{backends:?}");
        }
    }

    #[test]
    fn unclaimed_files_are_unknown_format() {
        let (_fs, mut r) = fs_registry();
        let e = winner(&r, &MemStorage::from_bytes(tagged_file(16))).expect_err("no backends");
        assert_eq!(e.kind(), ErrorKind::UnknownFormat);
        assert_eq!(e.context().path.as_deref(), Some(Path::new("/t/x.img")));
        r.register(tag("t", 0, Confidence::Certain))
            .expect("register");
        for bytes in [vec![0u8; 512], b"TAGFILE".to_vec(), Vec::new()] {
            let e = winner(&r, &MemStorage::from_bytes(bytes)).expect_err("not tagged");
            assert_eq!(e.kind(), ErrorKind::UnknownFormat);
        }
    }

    #[test]
    fn an_io_failure_while_probing_is_not_hidden_behind_a_fallback() {
        let (_fs, mut r) = fs_registry();
        r.register(tag("first", 10, Confidence::Certain))
            .expect("register");
        r.register(tag("fallback", 0, Confidence::Fallback))
            .expect("register");
        // The first probe (by "first") fails; "fallback" reads the file fine.
        let s = FaultyStorage::from_bytes(tagged_file(64));
        s.fail_nth(0);
        let e = winner(&r, &s).expect_err("the I/O error, not raw-like fallback");
        assert_eq!(e.kind(), ErrorKind::Io);

        // A real claim still wins over another backend's I/O error.
        let (_fs, mut r) = fs_registry();
        r.register(tag("first", 10, Confidence::Certain))
            .expect("register");
        r.register(tag("likely", 0, Confidence::Likely))
            .expect("register");
        let s = FaultyStorage::from_bytes(tagged_file(64));
        s.fail_nth(0);
        assert_eq!(
            winner(&r, &s).expect("likely claims it"),
            ("likely", Confidence::Likely)
        );
    }

    #[test]
    fn open_goes_to_the_winner_and_open_as_bypasses_probing() {
        let (fs, mut r) = fs_registry();
        r.register(tag("weak", 0, Confidence::Likely))
            .expect("register");
        r.register(tag("strong", 0, Confidence::Certain))
            .expect("register");
        put(&fs, "/o/t.img", tagged_file(2048));
        put(&fs, "/o/plain.img", vec![7; 1024]);

        let img = r
            .open(Path::new("/o/t.img"), OpenFlags::READ_ONLY)
            .expect("open");
        assert_eq!(img.format(), "strong");
        assert_eq!(img.path(), Path::new("/o/t.img"));
        assert_eq!(img.size(), 2048);
        assert_eq!(img.open_flags(), OpenFlags::READ_ONLY);
        let mut head = [0u8; 8];
        img.read_at(0, &mut head).expect("read");
        assert_eq!(&head, b"TAGFILE!");

        let e = r
            .open(Path::new("/o/plain.img"), OpenFlags::READ_ONLY)
            .expect_err("nobody claims it");
        assert_eq!(e.kind(), ErrorKind::UnknownFormat);
        let img = r
            .open_as("WEAK", Path::new("/o/plain.img"), OpenFlags::READ_ONLY)
            .expect("open_as skips the probe");
        assert_eq!(img.format(), "weak");
        let mut b = [0u8; 4];
        img.read_at(1020, &mut b).expect("read");
        assert_eq!(b, [7; 4]);

        let e = r
            .open_as("nope", Path::new("/o/t.img"), OpenFlags::READ_ONLY)
            .expect_err("unknown backend");
        assert_eq!(e.kind(), ErrorKind::NotFound);
        // The formats there are, in probe order (equal priorities: by name).
        assert_eq!(
            e.to_string(),
            "unknown format \"nope\"; the formats are: strong, weak"
        );
        let e = r
            .open(Path::new("/o/missing.img"), OpenFlags::READ_ONLY)
            .expect_err("missing file");
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(
            e.context().path.as_deref(),
            Some(Path::new("/o/missing.img"))
        );
        let e = r.probe(Path::new("/o/missing.img")).expect_err("missing");
        assert_eq!(e.kind(), ErrorKind::NotFound);
    }

    fn layer_registry() -> (Arc<MemFileSystem>, Registry) {
        let (fs, mut r) = fs_registry();
        r.register(Arc::new(LayerBackend::default()))
            .expect("register");
        r.register(tag("tag", 0, Confidence::Certain))
            .expect("register");
        (fs, r)
    }

    fn params(size: u64) -> CreateParams {
        CreateParams {
            size,
            uuid: Some(uuid::Uuid::from_u128(0x1234)),
            ..CreateParams::default()
        }
    }

    #[test]
    fn create_goes_through_the_table_and_the_result_reopens() {
        let (fs, r) = layer_registry();
        let path = Path::new("/c/new.layer");
        let img = r
            .create("layer", path, &params(64 * 1024), None, false)
            .expect("create");
        img.write_at(4096, &[0xAB; 512]).expect("write");
        img.close(false).expect("close");
        assert!(fs.get(path).is_some());
        let img = r.open(path, OpenFlags::READ_ONLY).expect("reopen");
        assert_eq!((img.format(), img.size()), ("layer", 64 * 1024));
        assert_eq!(img.uuid().expect("uuid"), uuid::Uuid::from_u128(0x1234));
        let mut b = [0u8; 514];
        img.read_at(4095, &mut b).expect("read");
        assert_eq!((b[0], b[1], b[512], b[513]), (0, 0xAB, 0xAB, 0));

        // Not over an existing file unless asked.
        let e = r
            .create("layer", path, &params(4096), None, false)
            .expect_err("exists");
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        let img = r
            .create("layer", path, &params(4096), None, true)
            .expect("overwrite");
        assert_eq!(img.size(), 4096);
    }

    #[test]
    fn failed_creates_leave_no_file() {
        let (fs, r) = layer_registry();
        // The tag backend cannot create: the file the registry made is removed again.
        let e = r
            .create("tag", Path::new("/c/t.img"), &params(4096), None, false)
            .expect_err("tag cannot create");
        assert_eq!(e.kind(), ErrorKind::NotSupported);
        assert!(fs.get(Path::new("/c/t.img")).is_none());

        let e = r
            .create("nope", Path::new("/c/n.img"), &params(4096), None, false)
            .expect_err("unknown backend");
        assert_eq!(e.kind(), ErrorKind::NotFound);

        let diff = CreateParams {
            image_flags: ImageFlags::DIFF,
            ..params(4096)
        };
        let e = r
            .create("layer", Path::new("/c/d.layer"), &diff, None, false)
            .expect_err("no parent");
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(fs.paths().is_empty(), "{:?}", fs.paths());
    }

    #[test]
    fn a_new_image_cannot_be_its_own_parent() {
        let (fs, r) = layer_registry();
        LayerSpec::base(8192).put(&fs, "/c/base.layer");
        let base = r
            .open(Path::new("/c/base.layer"), OpenFlags::READ_ONLY)
            .expect("open");
        let diff = CreateParams {
            image_flags: ImageFlags::DIFF,
            ..params(8192)
        };
        let p = Path::new("/c/base.layer");
        let e = r
            .create("layer", p, &diff, Some((p, base.as_ref())), true)
            .expect_err("own parent");
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert_eq!(fs.get(p).expect("kept").len().expect("len"), 4096);

        let child = r
            .create(
                "layer",
                Path::new("/c/child.layer"),
                &diff,
                Some((p, base.as_ref())),
                false,
            )
            .expect("a child");
        assert_eq!(child.image_flags(), ImageFlags::DIFF);
        assert_eq!(child.parent_filename().expect("parent"), "/c/base.layer");
    }

    #[test]
    fn staged_images_replace_the_target_only_on_commit() {
        let (fs, r) = layer_registry();
        let path = Path::new("/s/disk.layer");
        put(&fs, "/s/disk.layer", b"old contents".to_vec());

        let staged = r
            .create_staged("layer", path, &params(8192), None)
            .expect("staged");
        assert_eq!(staged.target(), path);
        assert_eq!(fs.paths().len(), 2, "the new image lives beside the target");
        staged.image().write_at(0, &[1; 16]).expect("write");
        assert!(format!("{staged:?}").contains("disk.layer"));
        drop(staged);
        assert_eq!(
            fs.paths(),
            vec![path.to_path_buf()],
            "dropping deletes the new file"
        );
        let old = fs.get(path).expect("target");
        let mut b = [0u8; 12];
        old.read_exact_at(0, &mut b).expect("read");
        assert_eq!(&b, b"old contents");

        let staged = r
            .create_staged("layer", path, &params(8192), None)
            .expect("staged");
        staged.image().write_at(0, &[1; 16]).expect("write");
        staged.commit().expect("commit");
        assert_eq!(fs.paths(), vec![path.to_path_buf()]);
        let img = r.open(path, OpenFlags::READ_ONLY).expect("reopen");
        assert_eq!((img.format(), img.size()), ("layer", 8192));
        let mut b = [0u8; 17];
        img.read_at(0, &mut b).expect("read");
        assert_eq!(&b[..16], &[1; 16]);
        assert_eq!(b[16], 0);
    }
}
