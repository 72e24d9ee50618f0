//! Helpers shared by vd-tool's integration tests: running vd-tool and the peers (qemu-img,
//! qemu-io), and reading their results.

#![allow(dead_code, reason = "each test file uses its own subset")]

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs vd-tool with `args`.
pub fn vd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vd-tool"))
        .args(args)
        .output()
        .expect("vd-tool runs")
}

/// Runs vd-tool and requires success.
pub fn vd_ok(args: &[&str]) -> Output {
    let o = vd(args);
    assert!(o.status.success(), "vd-tool {args:?}: {}", stderr(&o));
    o
}

/// A program that every development and CI machine has (CI installs it): a missing one is a
/// failure, not a skip.
pub fn require(program: &str) {
    let ok = Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(ok, "{program} is required (.ci/run installs it)");
}

/// Runs a peer (`qemu-img`, `qemu-io`, ...) with `args`.
pub fn peer(program: &str, args: &[&str]) -> Output {
    require(program);
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"))
}

/// Runs a peer and requires success.
pub fn peer_ok(program: &str, args: &[&str]) -> Output {
    let o = peer(program, args);
    assert!(
        o.status.success(),
        "{program} {args:?}: {}{}",
        stdout(&o),
        stderr(&o)
    );
    o
}

/// Standard output as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Standard error as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// An error exit (code 2) whose stderr names `needle`, without a panic.
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

/// A path as UTF-8 (temporary paths are).
pub fn s(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

/// SHA-256 of `bytes`, in hex.
pub fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// SHA-256 of a file's contents.
pub fn sha256_file(path: &Path) -> String {
    sha256(&std::fs::read(path).expect("file is readable"))
}

/// A VHDX made by qemu-img, holding `pattern` in its first `len` bytes.
pub fn qemu_vhdx(path: &Path, size: &str, pattern: u8, len: &str) {
    peer_ok("qemu-img", &["create", "-q", "-f", "vhdx", s(path), size]);
    let cmd = format!("write -P {pattern} 0 {len}");
    peer_ok("qemu-io", &["-f", "vhdx", "-c", &cmd, s(path)]);
}

/// The raw contents of an image as qemu-img reads them.
pub fn qemu_raw(image: &Path) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("raw");
    peer_ok("qemu-img", &["convert", "-O", "raw", s(image), s(&out)]);
    std::fs::read(out).expect("raw output")
}

/// A background process, killed when the test ends however it ends.
pub struct Background(pub Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (a bounded time) until a plain reader can no longer open `img`: another process has
/// it open for writing. `holder`, when given, is that process: its early exit is reported.
pub fn wait_until_locked(img: &Path, mut holder: Option<&mut Child>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = vd(&["info", s(img)]);
        if o.status.code() == Some(2) && stderr(&o).contains("lock") {
            return;
        }
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
            "the writer never locked {}: {}",
            img.display(),
            stderr(&o)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `qemu-io` holding `img` open for writing (or reading, with `read_only`) for 60 s, once it
/// holds its locks.
pub fn qemu_io_holding(img: &Path, read_only: bool) -> Background {
    require("qemu-io");
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
    if !read_only {
        wait_until_locked(img, Some(&mut held.0));
    }
    held
}
