//! `vd-tool serve` against real NBD clients: qemu-img and qemu-io read (and write) what it
//! exports over a Unix socket, and the bytes are checked against the corpus's expected content
//! hashes, `vd-tool map`, and the image reopened after the server has stopped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vd_tests::hash::{sha256_file, sha256_sparse};
use vd_tests::peers::{Peer, require};
use vd_tests::process::{output, run_ok, show, stdout};
use vd_tests::{corpus, qemu, s};

vd_tests::vd_tool_fns!();

/// A running `vd-tool serve`, killed when the test ends however it ends.
struct Served {
    child: Option<Child>,
    socket: PathBuf,
    stderr: PathBuf,
    stdout: PathBuf,
}

impl Served {
    /// Starts `vd-tool [global] serve [args] --socket DIR/nbd.sock image` and waits until it
    /// says it is serving.
    fn start(dir: &Path, image: &Path, global: &[&str], args: &[&str]) -> Self {
        let socket = dir.join("nbd.sock");
        let stderr = dir.join("serve.stderr");
        let stdout = dir.join("serve.stdout");
        let child = Command::new(vd_tests::vd_tool_bin!())
            .args(global)
            .arg("serve")
            .args(args)
            .arg("--socket")
            .arg(&socket)
            .arg(image)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("vd-tool serve starts");
        let mut served = Served {
            child: Some(child),
            socket,
            stderr,
            stdout,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !served.log().contains("serving ") {
            if let Some(status) = served.child().try_wait().expect("wait") {
                panic!("vd-tool serve exited with {status}: {}", served.log());
            }
            assert!(Instant::now() < deadline, "no socket after 60 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(served.socket.exists());
        served
    }

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("running")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// Sends SIGTERM and requires a clean exit (0) within 60 s, the socket removed.
    fn stop(mut self) {
        let pid = self.child().id().to_string();
        run_ok("kill", &["-TERM", &pid]);
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = self.child().try_wait().expect("wait") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "still running 60 s after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        self.child = None;
        assert_eq!(status.code(), Some(0), "vd-tool serve: {}", self.log());
        assert!(!self.log().contains("panicked"), "{}", self.log());
        assert!(!self.socket.exists(), "the socket is removed on exit");
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The corpus entry for `file` (with a parent when `with_parent`).
fn expected(file: &str, with_parent: bool) -> Value {
    corpus::expected()
        .into_iter()
        .find(|e| e["file"] == file && e.get("parent").is_some() == with_parent)
        .unwrap_or_else(|| panic!("{file} is not in expected.json"))
}

/// Runs of (start, length, data) with adjacent runs of one kind merged.
fn merged(runs: impl IntoIterator<Item = (u64, u64, bool)>) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for (start, len, data) in runs {
        match out.last_mut() {
            Some(last) if last.2 == data && last.0 + last.1 == start => last.1 += len,
            _ => out.push((start, len, data)),
        }
    }
    out
}

/// Serves `image` read-only and checks what qemu-img reads and maps over NBD; the files in
/// `dir` must be byte-identical afterwards.
fn check_read_only(dir: &Path, image: &Path, content_sha256: &str, size: u64) {
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .collect();
    let before: Vec<String> = files.iter().map(|f| sha256_file(f)).collect();
    let served = Served::start(dir, image, &[], &[]);

    let out = dir.join("out.raw");
    run_ok(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &served.uri(), s(&out)],
    );
    assert_eq!(std::fs::metadata(&out).expect("out").len(), size);
    assert_eq!(
        sha256_sparse(&out),
        content_sha256,
        "{}: what qemu-img read over NBD is not the disk's content",
        image.display()
    );
    std::fs::remove_file(&out).expect("remove");

    let map = run_ok(
        "qemu-img",
        &["map", "-f", "raw", "--output=json", &served.uri()],
    );
    let theirs: Vec<Value> = serde_json::from_str(&stdout(&map)).expect("qemu-img map JSON");
    let theirs = merged(theirs.iter().map(|e| {
        let data = e["data"].as_bool().expect("data");
        assert_eq!(e["zero"].as_bool(), Some(!data), "{e}");
        (
            e["start"].as_u64().expect("start"),
            e["length"].as_u64().expect("length"),
            data,
        )
    }));
    let ours = vd_ok(&["--output", "json", "map", s(image)]);
    let ours = merged(stdout(&ours).lines().skip(1).map(|l| {
        let e: Value = serde_json::from_str(l).expect("a JSON line");
        (
            e["start"].as_u64().expect("start"),
            e["length"].as_u64().expect("length"),
            e["state"] == "data",
        )
    }));
    assert_eq!(theirs, ours, "{}: qemu-img map over NBD", image.display());
    assert!(ours.iter().any(|r| r.2), "the image holds some data");

    served.stop();
    let after: Vec<String> = files.iter().map(|f| sha256_file(f)).collect();
    assert_eq!(before, after, "serving read-only changed a file");
}

fn corpus_image(name: &str, place_as: &str) {
    require(&[Peer::QemuImg]);
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join(place_as);
    corpus::decompress(name, &image);
    let e = expected(name, false);
    let hash = e["content_sha256"].as_str().expect("a content hash");
    check_read_only(
        dir.path(),
        &image,
        hash,
        e["virtual_size"].as_u64().unwrap(),
    );
}

/// Every corpus image that reads on its own (dirty logs, 4K sectors, fixed, dynamic; the
/// differencing child needs its parent: see the next test), served read-only: qemu-img reads
/// its content hash and maps its ranges over NBD, and no file changes.
#[test]
fn every_corpus_image_reads_over_nbd() {
    let mut served = 0;
    for e in corpus::expected() {
        let (Some(file), Some(_)) = (e["file"].as_str(), e["content_sha256"].as_str()) else {
            continue;
        };
        if e.get("parent").is_some() {
            continue;
        }
        corpus_image(file, corpus::image_name(file));
        served += 1;
    }
    // The corpus has 16 such images: a filter that let none through would prove nothing.
    assert!(served >= 16, "only {served} corpus images were served");
}

#[test]
fn differencing_chain_reads_through_its_parent() {
    require(&[Peer::QemuImg]);
    let name = "dissect.hypervisor/differencing.avhdx.gz";
    let e = expected(name, true);
    let dir = tempfile::tempdir().expect("temp dir");
    let child = dir.path().join("child.avhdx");
    corpus::decompress(name, &child);
    let parent = &e["parent"];
    corpus::decompress(
        parent["file"].as_str().expect("parent file"),
        &dir.path()
            .join(parent["place_as"].as_str().expect("parent name")),
    );
    check_read_only(
        dir.path(),
        &child,
        e["content_sha256"].as_str().expect("a content hash"),
        e["virtual_size"].as_u64().unwrap(),
    );
}

#[test]
fn writable_export_writes_and_closes_the_image_cleanly() {
    require(&[Peer::QemuImg, Peer::QemuIo]);
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("w.vhdx");
    qemu::create(&image, None, "64M");

    // Read-only by default: the write is refused, and the ready line on stdout is JSON.
    let served = Served::start(dir.path(), &image, &["--output", "json"], &[]);
    let ready: Value = serde_json::from_str(
        std::fs::read_to_string(&served.stdout)
            .expect("stdout")
            .trim(),
    )
    .expect("a JSON line on stdout");
    assert_eq!(ready["writable"], false);
    assert_eq!(ready["uri"], served.uri().as_str());
    let o = output(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x5a 1M 1M", &served.uri()],
    );
    assert!(
        !o.status.success() || show(&o).contains("Operation not permitted"),
        "a read-only export took a write: {}",
        show(&o)
    );
    served.stop();
    qemu::assert_reads(&image, &[(0, 0, 4 << 20)]);

    let served = Served::start(dir.path(), &image, &[], &["--writable"]);
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x5a 1M 1M", &served.uri()],
    );
    served.stop();
    run_ok("qemu-img", &["check", "-f", "vhdx", s(&image)]);
    qemu::assert_reads(
        &image,
        &[
            (0, 0, 1 << 20),
            (0x5a, 1 << 20, 1 << 20),
            (0, 2 << 20, 1 << 20),
        ],
    );
}

#[test]
fn tcp_export_by_name_on_the_loopback() {
    require(&[Peer::QemuImg]);
    let name = "dissect.hypervisor/dynamic.vhdx.gz";
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("dynamic.vhdx");
    corpus::decompress(name, &image);
    let stdout_file = dir.path().join("serve.stdout");
    let stderr_file = dir.path().join("serve.stderr");
    let child = Command::new(vd_tests::vd_tool_bin!())
        .args([
            "--output",
            "json",
            "serve",
            "--port",
            "0",
            "--export-name",
            "sda",
        ])
        .arg(&image)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_file).expect("stdout file"))
        .stderr(std::fs::File::create(&stderr_file).expect("stderr file"))
        .spawn()
        .expect("vd-tool serve starts");
    let mut served = Served {
        child: Some(child),
        socket: dir.path().join("no-socket"),
        stderr: stderr_file,
        stdout: stdout_file,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let ready: Value = loop {
        let text = std::fs::read_to_string(&served.stdout).unwrap_or_default();
        if let Ok(v) = serde_json::from_str(text.trim()) {
            break v;
        }
        if let Some(status) = served.child().try_wait().expect("wait") {
            panic!("vd-tool serve exited with {status}: {}", served.log());
        }
        assert!(Instant::now() < deadline, "not serving after 60 s");
        std::thread::sleep(Duration::from_millis(50));
    };
    let uri = ready["uri"].as_str().expect("uri");
    assert!(
        uri.starts_with("nbd://127.0.0.1:") && uri.ends_with("/sda"),
        "{uri}"
    );
    let out = dir.path().join("out.raw");
    run_ok(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", uri, s(&out)],
    );
    assert_eq!(
        sha256_file(&out),
        expected(name, false)["content_sha256"].as_str().unwrap()
    );
    // Another export name is refused.
    let other = uri.replace("/sda", "/sdb");
    let o = output("qemu-img", &["info", "-f", "raw", &other]);
    assert!(!o.status.success(), "{}", show(&o));
    served.stop();
}

#[test]
fn concurrent_writers_on_one_writable_export() {
    require(&[Peer::QemuImg, Peer::QemuIo]);
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("w.vhdx");
    qemu::create(&image, None, "64M");
    let served = Served::start(dir.path(), &image, &[], &["--writable"]);
    let uri = served.uri();
    let writers: Vec<_> = (1u8..=4)
        .map(|i| {
            let uri = uri.clone();
            std::thread::spawn(move || {
                let cmd = format!("write -P {i} {}M 3M", u32::from(i) * 8);
                run_ok("qemu-io", &["-f", "raw", "-c", &cmd, "-c", "flush", &uri]);
            })
        })
        .collect();
    for w in writers {
        w.join().expect("a writer");
    }
    served.stop();
    run_ok("qemu-img", &["check", "-f", "vhdx", s(&image)]);
    let reads: Vec<(u8, u64, u64)> = (1u8..=4)
        .map(|i| (i, u64::from(i) * (8 << 20), 3 << 20))
        .chain([(0, 0, 8 << 20)])
        .collect();
    qemu::assert_reads(&image, &reads);
}
