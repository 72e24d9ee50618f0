//! The error type shared by every backend, mapped from VirtualBox's VBox status codes.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// A specialised `Result` for vd operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, in categories that cover VirtualBox's VD status codes.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Not supported by this implementation: an operation the backend does not implement
    /// (`VERR_NOT_SUPPORTED`), or a valid image using a feature it does not support
    /// (`VERR_VD_..._UNSUPPORTED_VERSION`, unknown required regions). One kind for both, so a
    /// caller has one thing to match.
    NotSupported,
    /// The image was opened read-only (`VERR_VD_IMAGE_READ_ONLY`).
    ReadOnly,
    /// A header or signature is not what the format requires (`VERR_VD_GEN_INVALID_HEADER`).
    InvalidHeader,
    /// A structure inside the image is inconsistent (`VERR_VD_..._INVALID_HEADER`, corrupt images).
    Corrupt,
    /// An offset or size lies outside the image (`VERR_OUT_OF_RANGE`).
    OutOfRange,
    /// A caller-supplied argument is invalid (`VERR_INVALID_PARAMETER`).
    InvalidArgument,
    /// A file, backend or parent could not be found (`VERR_FILE_NOT_FOUND`,
    /// `VERR_VD_BACKEND_NOT_FOUND`).
    NotFound,
    /// A file that must not exist already does (`VERR_ALREADY_EXISTS`).
    AlreadyExists,
    /// No backend recognises the file (`VERR_NOT_SUPPORTED` from `VDGetFormat`).
    UnknownFormat,
    /// A parent image does not match the identity its child recorded
    /// (`VERR_VD_PARENT_UUID_MISMATCH`... in spirit).
    ParentMismatch,
    /// A disk chain loops back on itself or is deeper than the cap.
    BadChain,
    /// The underlying storage failed (`VERR_IO_*`, `VERR_DISK_FULL`, ...).
    Io,
    /// Another process has the image open in a way that conflicts with this open
    /// (`VERR_FILE_LOCK_VIOLATION`, QEMU's "Failed to get ... lock").
    Locked,
}

impl ErrorKind {
    /// A short lowercase description of the kind.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotSupported => "not supported",
            Self::ReadOnly => "read-only",
            Self::InvalidHeader => "invalid header",
            Self::Corrupt => "corrupt image",
            Self::OutOfRange => "out of range",
            Self::InvalidArgument => "invalid argument",
            Self::NotFound => "not found",
            Self::AlreadyExists => "already exists",
            Self::UnknownFormat => "unknown format",
            Self::ParentMismatch => "parent mismatch",
            Self::BadChain => "bad disk chain",
            Self::Io => "i/o error",
            Self::Locked => "image locked",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an error happened: the image, the structure field and the byte offset, where known.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context {
    /// The image file the error concerns.
    pub path: Option<PathBuf>,
    /// The on-disk structure or field (for example `"header 1 checksum"`).
    pub field: Option<String>,
    /// The byte offset in the image file.
    pub offset: Option<u64>,
}

/// A vd error: a kind, a message, where it happened and the underlying cause.
///
/// `Display` prints `path: message (field at offset 0x...)`; the cause is available through
/// [`std::error::Error::source`], so `{:#}` in `anyhow` prints the whole chain.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    ctx: Context,
    source: Option<Box<dyn StdError + Send + Sync + 'static>>,
    linkage: Option<Box<LinkageMismatch>>,
}

impl Error {
    /// A new error of `kind` with a lowercase message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            ctx: Context::default(),
            source: None,
            linkage: None,
        }
    }

    /// `NotSupported` for the named operation.
    pub fn not_supported(op: &str) -> Self {
        Self::new(ErrorKind::NotSupported, format!("{op} is not supported"))
    }

    /// `ReadOnly` for the named operation.
    pub fn read_only(op: &str) -> Self {
        Self::new(
            ErrorKind::ReadOnly,
            format!("{op} needs the image opened read-write"),
        )
    }

    /// `Corrupt`, naming the field and the offset it was read from.
    pub fn corrupt(field: impl Into<String>, offset: u64, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, message)
            .with_field(field)
            .with_offset(offset)
    }

    /// `OutOfRange` for an access of `len` bytes at `offset` on a disk of `size` bytes.
    pub fn out_of_range(offset: u64, len: u64, size: u64) -> Self {
        Self::new(
            ErrorKind::OutOfRange,
            format!(
                "access of {len} bytes at offset {offset:#x} is beyond the disk size {size:#x}"
            ),
        )
    }

    /// `InvalidArgument` with a message.
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }

    /// An I/O failure during `op`, keeping the `io::Error` as the source.
    pub fn io(op: impl Into<String>, err: io::Error) -> Self {
        let kind = match err.kind() {
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
            io::ErrorKind::ResourceBusy => ErrorKind::Locked,
            io::ErrorKind::InvalidInput => ErrorKind::InvalidArgument,
            _ => ErrorKind::Io,
        };
        Self::new(kind, op).with_source(err)
    }

    /// Attaches the image path (kept if one is already set).
    #[must_use]
    pub fn with_path(mut self, path: impl AsRef<Path>) -> Self {
        if self.ctx.path.is_none() {
            self.ctx.path = Some(path.as_ref().to_path_buf());
        }
        self
    }

    /// Attaches the structure field.
    #[must_use]
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.ctx.field = Some(field.into());
        self
    }

    /// Attaches the byte offset.
    #[must_use]
    pub fn with_offset(mut self, offset: u64) -> Self {
        self.ctx.offset = Some(offset);
        self
    }

    /// Attaches the underlying cause.
    #[must_use]
    pub fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Re-frames an error of a parent image as an error of the child that needed it: the
    /// message says where the parent was found, the path becomes the child's; kind, field,
    /// offset and source stay.
    pub(crate) fn in_parent_of(mut self, child: &Path, parent: &Path) -> Self {
        self.message = format!(
            "the parent image found at {} cannot be used: {}",
            parent.display(),
            self.message
        );
        self.ctx.path = Some(child.to_path_buf());
        self
    }

    /// The category of the error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message without context.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Where the error happened.
    pub fn context(&self) -> &Context {
        &self.ctx
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(path) = &self.ctx.path {
            write!(f, "{}: ", path.display())?;
        }
        f.write_str(&self.message)?;
        match (&self.ctx.field, self.ctx.offset) {
            (Some(field), Some(off)) => write!(f, " ({field} at offset {off:#x})"),
            (Some(field), None) => write!(f, " ({field})"),
            (None, Some(off)) => write!(f, " (at offset {off:#x})"),
            (None, None) => Ok(()),
        }
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

/// A parent was found where its child looks for it, but it is not the image the child was made
/// from: its identity (VHDX: DataWriteGuid) is not the one the child recorded. Kept as the
/// source of a [`ErrorKind::ParentMismatch`] error, so a front end can say exactly what differs
/// and offer to relink the child once the user has checked the parent is the right one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkageMismatch {
    /// The child image whose recorded parent identity does not match.
    pub child: PathBuf,
    /// Where the parent was found.
    pub parent: PathBuf,
    /// The parent's identity ([`Image::modification_uuid`](crate::Image::modification_uuid)).
    pub found: uuid::Uuid,
    /// The identity the child recorded ([`Image::parent_uuid`](crate::Image::parent_uuid)).
    pub expected: uuid::Uuid,
}

impl fmt::Display for LinkageMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "parent found at {} has id {{{}}}, but the child expects {{{}}}: the parent's data \
             changed after the child was made, or it is another image",
            self.parent.display(),
            self.found,
            self.expected
        )
    }
}

impl StdError for LinkageMismatch {}

impl Error {
    /// `ParentMismatch` carrying a [`LinkageMismatch`] (its text is the message), with the
    /// child's path attached.
    pub fn linkage(m: LinkageMismatch) -> Self {
        let mut e = Self::new(ErrorKind::ParentMismatch, m.to_string()).with_path(m.child.clone());
        e.linkage = Some(Box::new(m));
        e
    }

    /// The [`LinkageMismatch`] this error reports, if it is one.
    pub fn linkage_mismatch(&self) -> Option<&LinkageMismatch> {
        self.linkage.as_deref()
    }
}

/// An error and all its causes on one line, joined by `": "`.
pub fn error_chain(e: &(dyn StdError + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

impl From<io::Error> for Error {
    fn from(err: io::Error) -> Self {
        Self::io("i/o failed", err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_path_field_and_offset() {
        let e =
            Error::corrupt("header 1 checksum", 0x10004, "checksum mismatch").with_path("a.vhdx");
        assert_eq!(
            e.to_string(),
            "a.vhdx: checksum mismatch (header 1 checksum at offset 0x10004)"
        );
        assert_eq!(e.kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn io_not_found_maps_to_not_found() {
        let e = Error::io("opening", io::Error::from(io::ErrorKind::NotFound));
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.source().is_some());
    }

    #[test]
    fn display_shows_only_the_context_that_is_known() {
        let e = Error::new(ErrorKind::Corrupt, "bad");
        assert_eq!(e.to_string(), "bad");
        assert_eq!((e.kind(), e.message()), (ErrorKind::Corrupt, "bad"));
        assert_eq!(e.with_offset(0x200).to_string(), "bad (at offset 0x200)");
        let e = Error::new(ErrorKind::Corrupt, "bad").with_field("bat");
        assert_eq!(e.to_string(), "bad (bat)");
        let e = e.with_path("/a").with_path("/b");
        assert_eq!(e.to_string(), "/a: bad (bat)", "the first path is kept");
        assert_eq!(e.context().path.as_deref(), Some(Path::new("/a")));
    }

    #[test]
    fn constructors_pick_their_kinds() {
        for (e, kind) in [
            (Error::not_supported("x"), ErrorKind::NotSupported),
            (Error::read_only("x"), ErrorKind::ReadOnly),
            (Error::corrupt("f", 1, "m"), ErrorKind::Corrupt),
            (Error::out_of_range(1, 2, 3), ErrorKind::OutOfRange),
            (Error::invalid_argument("x"), ErrorKind::InvalidArgument),
        ] {
            assert_eq!(e.kind(), kind, "{e}");
            assert!(e.source().is_none());
        }
        for (io_kind, kind) in [
            (io::ErrorKind::NotFound, ErrorKind::NotFound),
            (io::ErrorKind::AlreadyExists, ErrorKind::AlreadyExists),
            (io::ErrorKind::ResourceBusy, ErrorKind::Locked),
            (io::ErrorKind::InvalidInput, ErrorKind::InvalidArgument),
            (io::ErrorKind::UnexpectedEof, ErrorKind::Io),
            (io::ErrorKind::PermissionDenied, ErrorKind::Io),
        ] {
            let e = Error::io("op", io::Error::from(io_kind));
            assert_eq!(e.kind(), kind, "{io_kind:?}");
            let src = e.source().expect("the io error is the source");
            assert_eq!(
                src.downcast_ref::<io::Error>().map(io::Error::kind),
                Some(io_kind)
            );
            assert_eq!(Error::from(io::Error::from(io_kind)).kind(), kind);
        }
    }

    #[test]
    fn kinds_have_distinct_lowercase_names() {
        let kinds = [
            ErrorKind::NotSupported,
            ErrorKind::ReadOnly,
            ErrorKind::InvalidHeader,
            ErrorKind::Corrupt,
            ErrorKind::OutOfRange,
            ErrorKind::InvalidArgument,
            ErrorKind::NotFound,
            ErrorKind::AlreadyExists,
            ErrorKind::UnknownFormat,
            ErrorKind::ParentMismatch,
            ErrorKind::BadChain,
            ErrorKind::Io,
            ErrorKind::Locked,
        ];
        let names: std::collections::HashSet<&str> = kinds.iter().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), kinds.len());
        for k in kinds {
            assert_eq!(k.to_string(), k.as_str());
            assert_eq!(k.as_str(), k.as_str().to_lowercase());
            assert!(!k.as_str().ends_with('.'));
        }
        assert_eq!(
            serde_json::to_value(ErrorKind::OutOfRange).expect("json"),
            "out_of_range"
        );
    }

    #[test]
    fn in_parent_of_moves_the_error_to_the_child() {
        let e = Error::corrupt("bat", 0x3000, "bad entry")
            .with_path("/d/base.vhdx")
            .with_source(io::Error::other("inner"))
            .in_parent_of(Path::new("/d/child.vhdx"), Path::new("/d/base.vhdx"));
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert_eq!(
            e.to_string(),
            "/d/child.vhdx: the parent image found at /d/base.vhdx cannot be used: bad entry \
             (bat at offset 0x3000)"
        );
        assert_eq!(e.context().field.as_deref(), Some("bat"));
        assert_eq!(e.context().offset, Some(0x3000));
        assert_eq!(
            e.source().map(ToString::to_string).as_deref(),
            Some("inner")
        );
    }

    #[test]
    fn linkage_errors_carry_the_mismatch() {
        let m = LinkageMismatch {
            child: PathBuf::from("/c.vhdx"),
            parent: PathBuf::from("/p.vhdx"),
            found: uuid::Uuid::from_u128(1),
            expected: uuid::Uuid::from_u128(2),
        };
        let e = Error::linkage(m.clone());
        assert_eq!(e.kind(), ErrorKind::ParentMismatch);
        assert_eq!(e.linkage_mismatch(), Some(&m));
        assert_eq!(e.context().path.as_deref(), Some(Path::new("/c.vhdx")));
        assert!(e.message().contains("00000000-0000-0000-0000-000000000001"));
        assert!(e.message().contains("00000000-0000-0000-0000-000000000002"));
        assert!(Error::not_supported("x").linkage_mismatch().is_none());
    }

    #[test]
    fn error_chain_joins_every_cause() {
        #[derive(Debug)]
        struct Outer(io::Error);
        impl fmt::Display for Outer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("outer")
            }
        }
        impl StdError for Outer {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(&self.0)
            }
        }
        let e = Error::new(ErrorKind::Io, "reading").with_source(Outer(io::Error::other("disk")));
        assert_eq!(error_chain(&e), "reading: outer: disk");
        let alone = Error::invalid_argument("no cause");
        assert_eq!(error_chain(&alone), "no cause");
    }
}
