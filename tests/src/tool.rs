//! Helpers for vd-tool's own integration tests: running the `vd-tool` binary, its error exits,
//! and processes that hold an image open (and locked) in the background.
//!
//! Cargo tells only vd-tool's integration tests where its binary is
//! (`CARGO_BIN_EXE_vd-tool`), so [`vd_tool_fns!`](crate::vd_tool_fns) expands `vd` and `vd_ok`
//! in the calling test file, and the helpers here take the binary's path.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::peers::{Peer, require};
use crate::process::{output, stderr, stdout};
use crate::s;

/// Defines `vd(args) -> Output` (runs vd-tool), `vd_in(dir, args) -> Output` (runs it in `dir`)
/// and `vd_ok(args) -> Output` (requires exit 0) in the calling test file of vd-tool.
#[macro_export]
macro_rules! vd_tool_fns {
    () => {
        /// Runs vd-tool with `args`.
        #[allow(dead_code, reason = "each test file uses its own subset")]
        fn vd<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> std::process::Output {
            $crate::process::output($crate::vd_tool_bin!(), args)
        }

        /// Runs vd-tool with `args` in `dir` (so that file names in its output are the
        /// relative ones given).
        #[allow(dead_code, reason = "each test file uses its own subset")]
        fn vd_in(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
            std::process::Command::new($crate::vd_tool_bin!())
                .args(args)
                .current_dir(dir)
                .output()
                .expect("vd-tool runs")
        }

        /// Runs vd-tool with `args` and requires exit code 0.
        #[allow(dead_code, reason = "each test file uses its own subset")]
        fn vd_ok<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> std::process::Output {
            $crate::process::run_ok($crate::vd_tool_bin!(), args)
        }
    };
}

/// An error exit (code 2) whose stderr names `needle`, without a panic.
#[track_caller]
pub fn assert_fails(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(2),
        "stdout: {} stderr: {err}",
        stdout(o)
    );
    assert!(err.contains(needle), "{err:?} should name {needle:?}");
    assert!(!err.contains("panicked"), "{err}");
}

/// A background process, killed when the test ends however it ends.
#[derive(Debug)]
pub struct Background(pub Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Byte offsets of the open-file-description locks held on `img` (by any process), read from
/// `/proc/locks` (granted locks only; waiters are left out). Reading this takes no lock.
fn ofd_locked_bytes(img: &Path) -> Vec<u64> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(img) else {
        return Vec::new();
    };
    let inode = meta.ino().to_string();
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    locks
        .lines()
        .filter(|l| !l.contains("->"))
        .filter_map(|l| {
            // "1: OFDLCK ADVISORY READ -1 fe:00:5874598 100 100"
            let f: Vec<&str> = l.split_whitespace().collect();
            let ino = f.get(5)?.rsplit(':').next()?;
            (f.get(1) == Some(&"OFDLCK") && ino == inode).then(|| f.get(6)?.parse().ok())?
        })
        .collect()
}

/// Waits (a bounded time) until another process has `img` open for writing, as QEMU locks it,
/// then checks that a plain reader (`vd_bin info`) is refused. `holder`, when given, is that
/// process: its early exit is reported.
///
/// The wait reads `/proc/locks` instead of trying to open the image: a trial open holds a read
/// lock for a moment, and a writer starting at that moment would be refused its own lock.
///
/// # Panics
///
/// When the holder exits first, the image is not locked within 30 s, or the reader gets in.
#[track_caller]
pub fn wait_until_locked(vd_bin: &str, img: &Path, holder: Option<&mut Child>) {
    wait_for_qemu_locks(img, holder);
    let o = output(vd_bin, &["info", s(img)]);
    assert!(
        o.status.code() == Some(2) && stderr(&o).contains("lock"),
        "a plain reader opened {} while it is locked for writing: {}",
        img.display(),
        stderr(&o)
    );
}

/// Waits (a bounded time) until a QEMU process holds all its locks on `img`. A writer takes
/// bytes 100, 101, 103, 201 and 203, a reader 100, 201 and 203, in that order: 203 comes last.
#[track_caller]
fn wait_for_qemu_locks(img: &Path, mut holder: Option<&mut Child>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ofd_locked_bytes(img).contains(&203) {
        if let Some(child) = holder.as_deref_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("the lock holder exited ({status}) before locking: {err}");
        }
        assert!(
            Instant::now() < deadline,
            "QEMU never locked {} (locked bytes: {:?})",
            img.display(),
            ofd_locked_bytes(img)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `qemu-io` holding `img` open for writing (or reading, with `read_only`) for 60 s, once it
/// holds its locks (checked with `vd_bin`).
///
/// # Panics
///
/// When qemu-io is missing or does not take its lock.
#[track_caller]
pub fn qemu_io_holding(vd_bin: &str, img: &Path, read_only: bool) -> Background {
    require(&[Peer::QemuIo]);
    let mut args = vec!["-f", "vhdx"];
    if read_only {
        args.push("-r");
    }
    args.extend(["-c", "sleep 60000", s(img)]);
    let child = Command::new("qemu-io")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-io runs");
    let mut held = Background(child);
    if read_only {
        wait_for_qemu_locks(img, Some(&mut held.0));
    } else {
        wait_until_locked(vd_bin, img, Some(&mut held.0));
    }
    held
}

/// `vd-tool map --output json`'s JSON Lines, parsed: the header line, then the extents.
///
/// # Panics
/// When a line is not JSON, the header is not the first line of schema version 1, or there is
/// no header.
#[track_caller]
pub fn map_lines(stdout: &[u8]) -> (serde_json::Value, Vec<serde_json::Value>) {
    let text = std::str::from_utf8(stdout).expect("map prints UTF-8");
    let mut lines = text.lines().map(|l| {
        serde_json::from_str::<serde_json::Value>(l)
            .unwrap_or_else(|e| panic!("map line {l:?} is not JSON: {e}"))
    });
    let header = lines.next().expect("map prints a header line");
    assert_eq!(header["schema_version"], 1, "header: {header}");
    assert_eq!(header["format"], "jsonl", "header: {header}");
    (header, lines.collect())
}
