//! # backend-vhdx
//!
//! Microsoft's VHDX format ([MS-VHDX] 1.0) for vd.
//!
//! This first step registers the backend in vd-core's static table and probes: a file whose
//! first eight bytes are the file-type identifier signature `vhdxfile` is a VHDX image with
//! [`Confidence::Certain`]. Opening and creating images come next.
//!
//! Link it into a binary with `use backend_vhdx as _;`.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::io;
use std::path::Path;

use vd_core::linkme::distributed_slice;
use vd_core::{
    BACKENDS, Backend, Capabilities, Confidence, Error, ErrorKind, Image, OpenRequest, Result,
    Storage,
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
        Err(Error::new(
            ErrorKind::NotSupported,
            "opening VHDX images is not implemented yet",
        )
        .with_path(req.path))
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
