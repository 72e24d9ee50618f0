//! QEMU as a peer: `qemu-img` and `qemu-io` runs, images made by QEMU, and [`dirty_vhdx`], a
//! VHDX whose log holds one valid entry that was never replayed.

use std::path::Path;
use std::process::Output;

use crate::process::{output, run_ok, show, stdout};
use crate::s;
use crate::vhdx::{self, REGION_BAT};

/// Runs `qemu-img args` and requires success.
#[track_caller]
pub fn img(args: &[&str]) -> Output {
    run_ok("qemu-img", args)
}

/// Runs `qemu-io args` and requires success.
#[track_caller]
pub fn io(args: &[&str]) -> Output {
    run_ok("qemu-io", args)
}

/// Fails the test unless qemu-io verifies every `(pattern, offset, len)` of `reads` in the VHDX
/// `image` (opened read-only). Both the exit code and the output are read (qemu-io has exited
/// 0 on a mismatch in some versions).
#[track_caller]
pub fn assert_reads(image: &Path, reads: &[(u8, u64, u64)]) {
    assert_reads_as("vhdx", image, reads);
}

/// [`assert_reads`] for an image in QEMU's format `format` (`vhdx`, `vpc`, `raw`).
#[track_caller]
pub fn assert_reads_as(format: &str, image: &Path, reads: &[(u8, u64, u64)]) {
    let cmds: Vec<String> = reads
        .iter()
        .map(|(pattern, off, len)| format!("read -q -P {pattern:#x} {off} {len}"))
        .collect();
    let mut args = vec!["-r", "-f", format];
    for c in &cmds {
        args.extend(["-c", c]);
    }
    args.push(s(image));
    let o = output("qemu-io", &args);
    assert!(
        o.status.success() && !stdout(&o).contains("Pattern verification failed"),
        "{}: {}",
        image.display(),
        show(&o)
    );
}

/// `qemu-img create -f vhdx [-o opts] path size`.
#[track_caller]
pub fn create(path: &Path, opts: Option<&str>, size: &str) {
    let mut args = vec!["create", "-q", "-f", "vhdx"];
    if let Some(opts) = opts {
        args.extend(["-o", opts]);
    }
    args.extend([s(path), size]);
    img(&args);
}

/// A VHDX made by qemu-img, holding `pattern` in its first `len` bytes.
#[track_caller]
pub fn vhdx(path: &Path, size: &str, pattern: u8, len: &str) {
    create(path, None, size);
    let cmd = format!("write -P {pattern} 0 {len}");
    io(&["-f", "vhdx", "-c", &cmd, s(path)]);
}

/// `qemu-img convert -f vhdx -O raw image raw`: the disk as QEMU reads it, into a file.
#[track_caller]
pub fn vhdx_to_raw(image: &Path, raw: &Path) {
    img(&["convert", "-f", "vhdx", "-O", "raw", s(image), s(raw)]);
}

/// The raw contents of an image as qemu-img reads them.
#[track_caller]
pub fn raw(image: &Path) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("raw");
    img(&["convert", "-O", "raw", s(image), s(&out)]);
    std::fs::read(out).expect("raw output")
}

/// What [`dirty_vhdx`] makes.
#[derive(Debug, Clone)]
pub struct DirtyLog<'a> {
    /// Virtual size in bytes.
    pub size: u64,
    /// `qemu-img create -o` options (for example `subformat=dynamic,block_size=1M`), or none.
    pub opts: Option<&'a str>,
    /// The byte written.
    pub pattern: u8,
    /// Bytes written from offset 0.
    pub len: u64,
    /// Bytes from offset 0 that hold `pattern` after a replay: the blocks whose BAT update made
    /// it into the log before the injected failure stopped qemu. Everything else reads zeros.
    pub replayed: u64,
}

impl Default for DirtyLog<'_> {
    /// 64 MiB, qemu's default options, 0xab over the first MiB.
    fn default() -> Self {
        DirtyLog {
            size: 64 << 20,
            opts: None,
            pattern: 0xab,
            len: 1 << 20,
            replayed: 1 << 20,
        }
    }
}

/// Makes `path` a VHDX whose log holds a valid entry that was never replayed, and proves it.
///
/// qemu-img creates the image; qemu-io then writes `pattern` over `[0, len)` through QEMU's
/// `blkdebug` driver, which fails (EIO, once) the in-place write of the first BAT sector. By
/// then QEMU has written the payload and flushed a log entry carrying the new BAT sector, with
/// the header's LogGuid set; the failed write stops it before the BAT lands.
///
/// The result is checked, not assumed: the current header's LogGuid is not nil, `qemu-io -r`
/// refuses to open the image (a dirty log cannot be replayed read-only), and a copy replayed by
/// `qemu-img check -r all` passes `qemu-img check` and reads `pattern` over `[0, replayed)` and
/// zeros over the rest of the disk.
///
/// # Panics
///
/// When qemu-img or qemu-io is missing, or any of the above does not hold.
#[track_caller]
pub fn dirty_vhdx(path: &Path, log: &DirtyLog<'_>) {
    assert!(
        log.replayed <= log.len && log.len <= log.size,
        "{log:?}: replayed ≤ len ≤ size"
    );
    let tmp = tempfile::tempdir().expect("temporary directory");
    let _ = std::fs::remove_file(path);
    create(path, log.opts, &log.size.to_string());

    let created = std::fs::read(path).expect("the new image");
    let bat_sector = vhdx::region(&created, REGION_BAT).0 / 512;
    let rules = tmp.path().join("rules.cfg");
    std::fs::write(
        &rules,
        format!(
            "[inject-error]\nevent = \"pwritev\"\nsector = \"{bat_sector}\"\nerrno = \"5\"\nonce = \"on\"\n"
        ),
    )
    .expect("blkdebug rules");
    let abs = std::fs::canonicalize(path).expect("absolute image path");
    let json = serde_json::json!({
        "driver": "vhdx",
        "file": {
            "driver": "blkdebug",
            "config": s(&rules),
            "image": { "driver": "file", "filename": s(&abs) },
        },
    });
    let write = format!("write -q -P {:#x} 0 {}", log.pattern, log.len);
    let o = output("qemu-io", &["-c", &write, &format!("json:{json}")]);
    assert!(
        !o.status.success(),
        "{}: the blkdebug write was meant to fail: {}",
        path.display(),
        show(&o)
    );

    // 1. The header asks for a replay.
    let b = std::fs::read(path).expect("the dirty image");
    assert!(
        vhdx::log_is_dirty(&b),
        "{}: the current header's LogGuid is nil: no dirty log was left",
        path.display()
    );
    // 2. QEMU refuses a read-only open.
    let ro = output(
        "qemu-io",
        &["-r", "-f", "vhdx", "-c", "read -q 0 512", s(path)],
    );
    assert!(
        !ro.status.success(),
        "{}: qemu-io -r opened the image, so its log is not dirty",
        path.display()
    );
    // 3. A replayed copy reads the pattern where the log put it, zeros elsewhere.
    let replayed = tmp.path().join("replayed.vhdx");
    std::fs::copy(path, &replayed).expect("copying the dirty image");
    // Exits non-zero when it repaired something; the plain check below must pass.
    let _ = output("qemu-img", &["check", "-q", "-r", "all", s(&replayed)]);
    img(&["check", "-q", s(&replayed)]);
    let mut reads = Vec::new();
    if log.replayed > 0 {
        reads.push((log.pattern, 0, log.replayed));
    }
    // qemu-io allocates a buffer per read: zeros are checked 64 MiB at a time.
    let mut off = log.replayed;
    while off < log.size {
        let n = (log.size - off).min(64 << 20);
        reads.push((0, off, n));
        off += n;
    }
    assert_reads(&replayed, &reads);
}

#[cfg(test)]
mod tests {
    use std::panic::{AssertUnwindSafe, catch_unwind};

    use super::*;

    /// The proof is real: the default image passes it, and a claim the image does not hold
    /// (nothing replayed, where the log in fact holds the first MiB) fails it.
    #[test]
    fn dirty_vhdx_proves_what_it_claims() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("dirty.vhdx");
        dirty_vhdx(&path, &DirtyLog::default());
        assert!(vhdx::log_is_dirty(&std::fs::read(&path).expect("image")));

        let wrong = DirtyLog {
            replayed: 0,
            ..DirtyLog::default()
        };
        let err = catch_unwind(AssertUnwindSafe(|| dirty_vhdx(&path, &wrong)))
            .expect_err("a wrong claim must fail the proof");
        let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("Pattern verification failed"), "{msg}");
    }
}
