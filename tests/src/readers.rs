//! The Python readers we check our images with: libvhdi (`pyvhdi`) and `dissect.hypervisor`.
//! Each runs a small script in `python3`; a missing package fails the test with the command
//! that installs it ([`crate::peers`]).

use std::path::Path;

use crate::peers::{Peer, require};
use crate::process::{output, run_ok, stderr, stdout};
use crate::s;

/// What pyvhdi reads: the whole disk's SHA-256, per-MiB digests, the size, the logical sector
/// size.
#[derive(Debug)]
pub struct Libvhdi {
    /// SHA-256 of the whole disk.
    pub sha256: String,
    /// SHA-256 of each MiB of the disk.
    pub chunks: Vec<String>,
    /// The disk size.
    pub size: u64,
    /// The logical sector size.
    pub bytes_per_sector: u64,
}

const PYVHDI_HASH: &str = r#"
import hashlib, json, sys
import pyvhdi
files = []
for path in sys.argv[1:]:
    f = pyvhdi.file()
    f.open(path)
    files.append(f)
for child, parent in zip(files, files[1:]):
    child.set_parent(parent)
f = files[0]
size = f.get_media_size()
whole = hashlib.sha256()
chunks = []
off = 0
while off < size:
    n = min(1 << 20, size - off)
    buf = f.read_buffer_at_offset(n, off)
    if len(buf) != n:
        sys.exit(f"short read at {off}: {len(buf)} of {n} bytes")
    whole.update(buf)
    chunks.append(hashlib.sha256(buf).hexdigest())
    off += n
print(json.dumps({"sha256": whole.hexdigest(), "chunks": chunks, "size": size,
                  "bytes_per_sector": f.get_bytes_per_sector()}))
"#;

/// Reads `img` (with its parents, immediate parent first; libvhdi checks each child's parent
/// linkage itself) through pyvhdi.
///
/// # Panics
///
/// When pyvhdi is missing or cannot read the disk.
#[track_caller]
pub fn libvhdi_read(img: &Path, parents: &[&Path]) -> Libvhdi {
    require(&[Peer::Pyvhdi]);
    let mut args = vec!["-c", PYVHDI_HASH, s(img)];
    args.extend(parents.iter().map(|x| s(x)));
    let o = run_ok("python3", &args);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("the script's JSON");
    Libvhdi {
        sha256: v["sha256"].as_str().expect("sha256").to_string(),
        chunks: v["chunks"]
            .as_array()
            .expect("chunks")
            .iter()
            .map(|c| c.as_str().expect("digest").to_string())
            .collect(),
        size: v["size"].as_u64().expect("size"),
        bytes_per_sector: v["bytes_per_sector"].as_u64().expect("bytes_per_sector"),
    }
}

/// Whether dissect.hypervisor opens `img`, and its error when not.
///
/// # Panics
///
/// When dissect.hypervisor is missing or the script fails in another way.
#[track_caller]
pub fn dissect_opens(img: &Path) -> Result<(), String> {
    const SCRIPT: &str = r#"
import sys
from pathlib import Path
from dissect.hypervisor.disk import vhdx
try:
    vhdx.VHDX(Path(sys.argv[1]))
except Exception as e:
    print(f"{type(e).__name__}: {e}")
    sys.exit(3)
"#;
    require(&[Peer::Dissect]);
    let o = output("python3", &["-c", SCRIPT, s(img)]);
    match o.status.code() {
        Some(0) => Ok(()),
        Some(3) => Err(stdout(&o)),
        _ => panic!("dissect.hypervisor failed: {}", stderr(&o)),
    }
}
