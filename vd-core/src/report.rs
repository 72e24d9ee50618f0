//! Typed results an image reports: the deviations tolerated at open ([`Warning`]), the
//! findings of a check ([`CheckReport`]), and the format-specific facts of
//! [`Image::details`](crate::Image::details) and [`Image::dump`](crate::Image::dump)
//! ([`Facts`]). Front ends render them as text or JSON; nothing here is preformatted text
//! beyond each problem's one-line message.

use std::fmt;

use serde::{Serialize, Serializer};

use crate::error::{Error, ErrorKind, error_chain};

/// A byte offset in an image file.
///
/// Serialised as a newtype struct named [`Offset::NAME`] around the number: JSON shows the
/// number, and a text renderer that knows the name prints it in hex.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Offset(pub u64);

impl Offset {
    /// The newtype name a serializer sees.
    pub const NAME: &'static str = "vd::Offset";
}

impl Serialize for Offset {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_newtype_struct(Self::NAME, &self.0)
    }
}

/// A number of bytes.
///
/// Serialised as a newtype struct named [`ByteSize::NAME`] around the number: JSON shows the
/// number, and a text renderer that knows the name prints it with a binary unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// The newtype name a serializer sees.
    pub const NAME: &'static str = "vd::ByteSize";
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_newtype_struct(Self::NAME, &self.0)
    }
}

/// A deviation from the format that an open tolerated (a damaged redundant copy, an unknown
/// optional item, a file shorter than a structure on a tolerant read-only open, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Warning {
    /// The category, as the error a strict open would have returned.
    pub kind: ErrorKind,
    /// The on-disk structure or field, where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The byte offset in the image file, where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// One line for people, naming the structure and the offset.
    pub message: String,
}

impl Warning {
    /// A warning of `kind` with a message and no location.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            field: None,
            offset: None,
            message: message.into(),
        }
    }

    /// The error a strict open would have returned, tolerated: its kind, field and offset, and
    /// its whole chain of causes as the message.
    pub fn from_error(e: &Error) -> Self {
        Self {
            kind: e.kind(),
            field: e.context().field.clone(),
            offset: e.context().offset,
            message: error_chain(e),
        }
    }
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Severity of a [`Finding`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Tolerated deviation from the format.
    Warning,
    /// Corruption or inconsistency.
    Error,
}

/// One problem found by a check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// How bad it is.
    pub severity: Severity,
    /// The category of the problem.
    pub kind: ErrorKind,
    /// The on-disk structure or field, where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The byte offset in the image file, where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// What is wrong, naming the structure and offset.
    pub message: String,
    /// Whether a repair fixed it.
    pub repaired: bool,
}

impl Finding {
    /// An unrepaired finding of `kind` with a message and no location.
    pub fn new(severity: Severity, kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            severity,
            kind,
            field: None,
            offset: None,
            message: message.into(),
            repaired: false,
        }
    }

    /// An unrepaired finding from an error: its kind, field and offset, and its whole chain of
    /// causes as the message.
    pub fn from_error(severity: Severity, e: &Error) -> Self {
        Self::from_warning(severity, &Warning::from_error(e))
    }

    /// An unrepaired finding from a warning of the open, at `severity`.
    pub fn from_warning(severity: Severity, w: &Warning) -> Self {
        Self {
            severity,
            kind: w.kind,
            field: w.field.clone(),
            offset: w.offset,
            message: w.message.clone(),
            repaired: false,
        }
    }

    /// The same finding, marked repaired or not.
    #[must_use]
    pub fn repaired(mut self, repaired: bool) -> Self {
        self.repaired = repaired;
        self
    }
}

/// The result of [`Image::repair`](crate::Image::repair).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    /// Everything found.
    pub findings: Vec<Finding>,
}

impl CheckReport {
    /// Whether nothing (not even a warning) was found.
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }
}

/// Format-specific facts a backend reports ([`Image::details`](crate::Image::details),
/// [`Image::dump`](crate::Image::dump)): a value of the backend's own `Serialize` type, behind
/// a type-erased box so that the `Image` trait stays object-safe.
///
/// Front ends serialise it: to JSON as it is, or to text with a renderer that walks the serde
/// data model (struct fields, sequences, [`Offset`] and [`ByteSize`] newtypes).
pub struct Facts(Box<dyn erased_serde::Serialize + Send + Sync>);

impl Facts {
    /// Wraps a backend's typed facts.
    pub fn new<T: Serialize + Send + Sync + 'static>(value: T) -> Self {
        Self(Box::new(value))
    }
}

impl Serialize for Facts {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        erased_serde::serialize(self.0.as_ref(), s)
    }
}

impl fmt::Debug for Facts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match serde_json::to_string(self) {
            Ok(json) => write!(f, "Facts({json})"),
            Err(_) => f.write_str("Facts(..)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Sample {
        at: Offset,
        size: ByteSize,
        name: &'static str,
    }

    #[test]
    fn newtypes_serialise_as_plain_numbers_in_json() {
        let facts = Facts::new(Sample {
            at: Offset(0x30_0000),
            size: ByteSize(1 << 20),
            name: "bat",
        });
        assert_eq!(
            serde_json::to_value(&facts).expect("json"),
            serde_json::json!({"at": 0x30_0000, "size": 1 << 20, "name": "bat"})
        );
        assert!(format!("{facts:?}").contains("\"name\":\"bat\""));
    }

    #[test]
    fn warnings_and_findings_keep_the_error_location() {
        let e = Error::corrupt("header 1 checksum", 0x1_0004, "checksum mismatch")
            .with_source(std::io::Error::other("cause"));
        let w = Warning::from_error(&e);
        assert_eq!(w.kind, ErrorKind::Corrupt);
        assert_eq!(w.field.as_deref(), Some("header 1 checksum"));
        assert_eq!(w.offset, Some(0x1_0004));
        assert_eq!(
            w.to_string(),
            "checksum mismatch (header 1 checksum at offset 0x10004): cause"
        );
        let f = Finding::from_error(Severity::Error, &e).repaired(true);
        assert_eq!(
            (f.severity, f.kind, f.repaired),
            (Severity::Error, ErrorKind::Corrupt, true)
        );
        assert_eq!(f.offset, w.offset);
        let plain = Warning::new(ErrorKind::NotSupported, "odd");
        assert_eq!(
            serde_json::to_value(&plain).expect("json"),
            serde_json::json!({"kind": "not_supported", "message": "odd"})
        );
    }

    #[test]
    fn reports_are_clean_without_findings() {
        let mut r = CheckReport::default();
        assert!(r.is_clean());
        r.findings
            .push(Finding::new(Severity::Warning, ErrorKind::Corrupt, "odd"));
        assert!(!r.is_clean(), "a warning is a finding");
        assert_eq!(
            serde_json::to_value(&r).expect("json")["findings"][0]["severity"],
            "warning"
        );
    }
}
