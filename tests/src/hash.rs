//! SHA-256 digests of bytes and files, in lowercase hex.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use sha2::{Digest, Sha256};

/// Bytes as lowercase hex.
pub fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of `bytes`, in hex.
pub fn sha256(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// SHA-256 of a file's contents, read whole.
///
/// # Panics
///
/// When the file cannot be read.
pub fn sha256_file(path: &Path) -> String {
    sha256(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

/// SHA-256 of the whole file and of each `chunk`-byte piece of it.
///
/// # Panics
///
/// When the file cannot be read or `chunk` is 0.
pub fn sha256_chunks(path: &Path, chunk: u64) -> (String, Vec<String>) {
    assert!(chunk > 0, "a chunk has bytes");
    let f = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let len = f.metadata().expect("metadata").len();
    let mut whole = Sha256::new();
    let mut chunks = Vec::new();
    let mut buf = vec![0u8; usize::try_from(chunk).expect("chunk fits in memory")];
    let mut off = 0;
    while off < len {
        let n = usize::try_from((len - off).min(chunk)).expect("chunk fits in memory");
        f.read_exact_at(&mut buf[..n], off)
            .expect("read for hashing");
        whole.update(&buf[..n]);
        chunks.push(sha256(&buf[..n]));
        off += n as u64;
    }
    (hex(&whole.finalize()), chunks)
}

/// SHA-256 of a file; holes (found with SEEK_DATA/SEEK_HOLE through vd-core's storage) are
/// hashed as zeros without reading them, which keeps whole-disk hashes of sparse 10 GiB outputs
/// cheap.
///
/// # Panics
///
/// When the file cannot be opened or read.
pub fn sha256_sparse(path: &Path) -> String {
    use vd_core::{FileStorage, OpenMode, Storage};
    let f = FileStorage::open(path, OpenMode::ReadOnly)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let len = f.len().expect("file length");
    let mut h = Sha256::new();
    let zeros = vec![0u8; 4 << 20];
    let mut buf = vec![0u8; 4 << 20];
    let mut pos = 0;
    while pos < len {
        let run = f
            .run_at(pos, (len - pos).min(buf.len() as u64))
            .expect("data/hole run");
        let n = usize::try_from(run.len.max(1).min(len - pos)).expect("at most 4 MiB");
        if run.data {
            f.read_exact_at(pos, &mut buf[..n]).expect("reading data");
            h.update(&buf[..n]);
        } else {
            h.update(&zeros[..n]);
        }
        pos += n as u64;
    }
    hex(&h.finalize())
}
