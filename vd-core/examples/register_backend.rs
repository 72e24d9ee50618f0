//! A host application that brings its own image format and registers it at run time.
//!
//! The "pattern" format is a 24-byte header — the signature `VDPATTRN`, the virtual size
//! (little-endian `u64`) and a one-byte seed, padded to 24 bytes — and no data: every byte of
//! the virtual disk is computed from its offset and the seed. The example writes a sample file
//! to a temporary directory, lets [`Registry::probe`] find the backend by its signature, and
//! reads the disk through [`Disk`] and `std::io::Read`.
//!
//! ```text
//! cargo run -p vd-core --example register_backend
//! ```
//!
//! A backend crate would rather add itself to the static table
//! (`#[linkme::distributed_slice(vd_core::BACKENDS)]`) so that every binary linking it sees it;
//! [`Registry::register`] is for formats that only one host knows about, such as plugins.

use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vd_core::{
    Backend, ByteSize, Capabilities, Confidence, Disk, DiskOptions, Error, ErrorKind, Extent,
    ExtentKind, Facts, Image, ImageFlags, OpenFlags, OpenRequest, Registry, Result, Storage,
    check_range,
};

/// The file signature at offset 0.
const MAGIC: [u8; 8] = *b"VDPATTRN";
/// Size of the header: signature, virtual size, seed and padding.
const HEADER_LEN: usize = 24;

/// The byte at `pos` of a pattern disk with `seed`.
fn pattern_byte(pos: u64, seed: u8) -> u8 {
    ((pos ^ (pos >> 9) ^ (pos >> 17)).wrapping_mul(0x9E37_79B9) >> 24) as u8 ^ seed
}

/// The header of a pattern image of `size` bytes.
fn header(size: u64, seed: u8) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(&MAGIC);
    h[8..16].copy_from_slice(&size.to_le_bytes());
    h[16] = seed;
    h
}

/// The "pattern" format.
struct PatternBackend;

impl Backend for PatternBackend {
    fn name(&self) -> &'static str {
        "pattern"
    }

    fn description(&self) -> &'static str {
        "example: a computed test pattern described by a 24-byte header"
    }

    fn extensions(&self) -> &'static [&'static str] {
        &["pattern"]
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::FILE | Capabilities::MAP
    }

    /// Probed before formats with the default priority 0; the signature decides anyway.
    fn priority(&self) -> i32 {
        10
    }

    fn probe(&self, storage: &dyn Storage, path: &Path) -> Result<Confidence> {
        let mut sig = [0u8; 8];
        match storage.read_exact_at(0, &mut sig) {
            Ok(()) if sig == MAGIC => Ok(Confidence::Certain),
            Ok(()) => Ok(Confidence::No),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(Confidence::No),
            Err(e) => Err(Error::io("cannot read the signature", e).with_path(path)),
        }
    }

    fn open(&self, req: OpenRequest<'_>) -> Result<Box<dyn Image>> {
        let mut h = [0u8; HEADER_LEN];
        req.storage
            .read_exact_at(0, &mut h)
            .map_err(|e| Error::io("cannot read the header", e).with_path(req.path))?;
        if h[..8] != MAGIC {
            return Err(
                Error::new(ErrorKind::InvalidHeader, "no VDPATTRN signature").with_path(req.path),
            );
        }
        let mut size = [0u8; 8];
        size.copy_from_slice(&h[8..16]);
        Ok(Box::new(PatternImage {
            path: req.path.to_path_buf(),
            storage: req.storage,
            flags: req.flags,
            size: u64::from_le_bytes(size),
            seed: h[16],
        }))
    }
}

/// An opened pattern image.
struct PatternImage {
    path: PathBuf,
    storage: Arc<dyn Storage>,
    flags: OpenFlags,
    size: u64,
    seed: u8,
}

impl Image for PatternImage {
    fn format(&self) -> &'static str {
        "pattern"
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        for (pos, b) in (offset..).zip(buf.iter_mut()) {
            *b = pattern_byte(pos, self.seed);
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn close(self: Box<Self>, _delete: bool) -> Result<()> {
        Ok(())
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn file_size(&self) -> Result<u64> {
        self.storage
            .len()
            .map_err(|e| Error::io("cannot read the file size", e).with_path(&self.path))
    }

    fn image_flags(&self) -> ImageFlags {
        ImageFlags::empty()
    }

    fn open_flags(&self) -> OpenFlags {
        self.flags
    }

    fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(offset, len, self.size)?;
        Ok(vec![Extent {
            offset,
            length: len,
            kind: ExtentKind::Data,
        }])
    }

    /// The header's fields, typed: a front end renders them as text or JSON.
    fn dump(&self) -> Result<Facts> {
        Ok(Facts::new(PatternDump {
            virtual_size: ByteSize(self.size),
            seed: self.seed,
        }))
    }
}

/// What [`Image::dump`] reports about a pattern image.
#[derive(serde::Serialize)]
struct PatternDump {
    virtual_size: ByteSize,
    seed: u8,
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    // Every backend linked into this binary (none: vd-core alone links no backend crate),
    // on the host file system, plus ours.
    let mut registry = Registry::builtin();
    let linked: Vec<_> = registry.backends().iter().map(|b| b.name()).collect();
    println!("linked backends: {linked:?}");
    registry.register(Arc::new(PatternBackend))?;
    // A second registration of the same name is refused.
    let again = registry.register(Arc::new(PatternBackend)).unwrap_err();
    assert_eq!(again.kind(), ErrorKind::AlreadyExists);
    for b in registry.backends() {
        println!(
            "backend {} (priority {}): {}",
            b.name(),
            b.priority(),
            b.description()
        );
    }

    // A sample image in a fresh temporary directory, removed when `dir` is dropped.
    let dir = tempfile::Builder::new()
        .prefix("vd-register-backend-")
        .tempdir()?;
    let path = dir.path().join("sample.pattern");
    let size = 1 << 20;
    let seed = 0x5a;
    std::fs::write(&path, header(size, seed))?;

    let m = registry.probe(&path)?;
    println!(
        "{}: {} ({:?})",
        path.display(),
        m.backend.name(),
        m.confidence
    );

    let mut disk = Disk::open(&registry, &path, &DiskOptions::default())?;
    println!(
        "virtual size {} bytes, file size {} bytes",
        disk.size(),
        disk.top().file_size()?
    );
    let mut head = [0u8; 16];
    disk.read_exact(&mut head)?;
    println!("bytes 0..16:       {}", hex(&head));
    disk.seek(SeekFrom::Start(0x1_2345))?;
    disk.read_exact(&mut head)?;
    println!("bytes 0x12345..+16: {}", hex(&head));
    for (pos, b) in (0x1_2345..).zip(head) {
        assert_eq!(b, pattern_byte(pos, seed), "byte {pos:#x}");
    }
    println!("dump: {}", serde_json::to_string(&disk.top().dump()?)?);
    disk.close()?;

    // A file without the signature is not ours; nothing else is linked to claim it.
    let other = dir.path().join("other.bin");
    std::fs::write(&other, b"not a pattern image")?;
    match registry.probe(&other) {
        Ok(m) => println!(
            "{}: {} ({:?})",
            other.display(),
            m.backend.name(),
            m.confidence
        ),
        Err(e) => println!("{e}"),
    }
    Ok(())
}
