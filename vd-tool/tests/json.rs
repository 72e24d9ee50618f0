//! `--output json` of every command: typed documents with a schema version, errors as JSON on
//! stdout, and `docs/json.md` checked against what the commands print.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Output;

use serde_json::Value;
use vd_tests::corpus::decompress;
use vd_tests::process::{stderr, stdout};
use vd_tests::tool::qemu_io_holding;

const VD: &str = env!("CARGO_BIN_EXE_vd-tool");

vd_tests::vd_tool_fns!();

/// The JSON document on stdout of a run that exited with `code`.
#[track_caller]
fn doc(o: &Output, code: i32) -> Value {
    assert_eq!(
        o.status.code(),
        Some(code),
        "stdout: {} stderr: {}",
        stdout(o),
        stderr(o)
    );
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {}", stdout(o)))
}

/// A folder holding corpus images under fixed names: `dynamic.vhdx`, `dirty.vhdx`, and the
/// differencing child `child.avhdx` beside its (stand-in) parent.
fn corpus_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    decompress(
        "dissect.hypervisor/dynamic.vhdx.gz",
        &d.join("dynamic.vhdx"),
    );
    decompress(
        "synthetic/qemu-blkdebug-dirty-log.vhdx.gz",
        &d.join("dirty.vhdx"),
    );
    decompress(
        "dissect.hypervisor/differencing.avhdx.gz",
        &d.join("child.avhdx"),
    );
    decompress(
        "synthetic/differencing-avhdx-standin-parent.vhdx.gz",
        &d.join("Generation 1_49C4BAF3-4B25-4406-8C4B-D39E65C32385.avhdx"),
    );
    dir
}

#[test]
fn errors_are_a_json_document_on_stdout_with_the_same_exit_code() {
    let dir = corpus_dir();
    let d = dir.path();
    let o = vd_in(d, &["info", "--output", "json", "missing.vhdx"]);
    let v = doc(&o, 2);
    assert_eq!(v["schema_version"], 1);
    assert_eq!(v["error"]["kind"], "not_found", "{v}");
    let message = v["error"]["message"].as_str().expect("a message");
    assert!(message.contains("missing.vhdx"), "{message}");
    // The one-line message is still on stderr, and it is the same.
    assert_eq!(stderr(&o).trim_end(), format!("error: {message}"));
    assert!(v["error"].get("hint").is_none(), "{v}");

    // A corrupt image: the kind says so.
    decompress("adversarial/huge-log-length.vhdx.gz", &d.join("bad.vhdx"));
    let v = doc(&vd_in(d, &["dump", "--output", "json", "bad.vhdx"]), 2);
    assert_eq!(v["error"]["kind"], "corrupt", "{v}");

    // Without --output json, stdout stays empty.
    let o = vd_in(d, &["info", "missing.vhdx"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(o.stdout.is_empty(), "{}", stdout(&o));
}

#[test]
fn a_locked_image_error_carries_the_hint() {
    let dir = corpus_dir();
    let img = dir.path().join("dynamic.vhdx");
    let _holder = qemu_io_holding(VD, &img, false);
    let o = vd_in(dir.path(), &["info", "--output", "json", "dynamic.vhdx"]);
    let v = doc(&o, 2);
    assert_eq!(v["error"]["kind"], "locked", "{v}");
    let hint = v["error"]["hint"].as_str().expect("a hint");
    assert!(hint.contains("-U"), "{hint}");
    assert!(
        stderr(&o).contains(&format!("hint: {hint}")),
        "{}",
        stderr(&o)
    );
}

#[test]
fn io_reports_each_command() {
    let dir = corpus_dir();
    let d = dir.path();
    let o = vd_in(
        d,
        &[
            "io",
            "--output",
            "json",
            "-c",
            "write -P 0x5a 1M 64k",
            "-c",
            "read -P 0x5a 1M 64k",
            "-c",
            "flush",
            "-c",
            "read -P 0x5a 1040384 8k",
            "dynamic.vhdx",
        ],
    );
    // The last read runs past the written range: a mismatch, exit code 1.
    let v = doc(&o, 1);
    assert_eq!(v["schema_version"], 1);
    assert_eq!(v["file"], "dynamic.vhdx");
    let cmds = v["commands"].as_array().expect("commands");
    assert_eq!(cmds.len(), 4, "{v}");
    assert_eq!(cmds[0]["op"], "write");
    assert_eq!(
        (&cmds[0]["offset"], &cmds[0]["length"], &cmds[0]["pattern"]),
        (
            &Value::from(1 << 20),
            &Value::from(65536),
            &Value::from(0x5a)
        )
    );
    assert_eq!(cmds[1]["result"], "ok");
    assert_eq!(cmds[2]["op"], "flush");
    assert_eq!(cmds[3]["result"], "mismatch");
    // 1040384 is 1 MiB - 8 KiB: the first byte read is not the pattern.
    assert_eq!(cmds[3]["mismatch_offset"], 1_040_384);
    // The human form is qemu-io's lines.
    let o = vd_in(d, &["io", "-c", "read -P 0x5a 1M 4k", "dynamic.vhdx"]);
    assert_eq!(stdout(&o), "read 4096/4096 bytes at offset 1048576\n");
}

#[test]
fn setuuid_reports_the_old_and_new_uuids() {
    let dir = corpus_dir();
    let d = dir.path();
    let before = doc(&vd_in(d, &["info", "--output", "json", "dynamic.vhdx"]), 0);
    let new = "01234567-89ab-cdef-0123-456789abcdef";
    let v = doc(
        &vd_in(
            d,
            &["setuuid", "--output", "json", "--uuid", new, "dynamic.vhdx"],
        ),
        0,
    );
    assert_eq!(v["uuid"]["old"], before["uuid"], "{v}");
    assert_eq!(v["uuid"]["new"], new);
    assert!(v.get("parent_uuid").is_none(), "{v}");
    let after = doc(&vd_in(d, &["info", "--output", "json", "dynamic.vhdx"]), 0);
    assert_eq!(after["uuid"], new);
}

/// The documented fields of each section of docs/json.md: name and whether it is always
/// present.
fn documented() -> BTreeMap<String, BTreeMap<String, bool>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/json.md");
    let text = std::fs::read_to_string(&path).expect("docs/json.md");
    let mut sections: BTreeMap<String, BTreeMap<String, bool>> = BTreeMap::new();
    let mut current = None;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("## ") {
            current = Some(name.trim().to_string());
        } else if let (Some(section), Some(row)) = (&current, line.strip_prefix("| `")) {
            let cells: Vec<&str> = row.split(" | ").collect();
            let field = cells[0].trim_end_matches('`');
            let always = cells.get(2).expect("a present column").trim() == "always";
            let fields = sections.entry(section.clone()).or_default();
            assert!(
                fields.insert(field.to_string(), always).is_none(),
                "{section}: {field} documented twice"
            );
        }
    }
    sections
}

/// The top-level fields of a document (of each element, for an array).
fn fields(v: &Value) -> Vec<BTreeSet<String>> {
    match v {
        Value::Object(m) => vec![m.keys().cloned().collect()],
        Value::Array(items) => items.iter().flat_map(fields).collect(),
        _ => panic!("not a JSON object or array: {v}"),
    }
}

#[test]
fn docs_json_md_matches_the_documents() {
    let dir = corpus_dir();
    let d = dir.path();
    let run = |args: &[&str], code: i32| -> Value {
        let mut a = args.to_vec();
        a.insert(1, "--output");
        a.insert(2, "json");
        doc(&vd_in(d, &a), code)
    };
    std::fs::write(d.join("zeros.raw"), vec![0u8; 1 << 20]).unwrap();
    std::fs::write(d.join("ones.raw"), vec![1u8; 1 << 20]).unwrap();
    let mut runs: Vec<(&str, Value)> = vec![
        ("backends", run(&["backends"], 0)),
        ("probe", run(&["probe", "dynamic.vhdx"], 0)),
        ("info", run(&["info", "dynamic.vhdx"], 0)),
        ("info", run(&["info", "child.avhdx"], 0)),
        ("info", run(&["info", "dirty.vhdx"], 0)),
        (
            "info --backing-chain",
            run(&["info", "--backing-chain", "child.avhdx"], 0),
        ),
        ("check", run(&["check", "dynamic.vhdx"], 0)),
        ("check", run(&["check", "child.avhdx"], 0)),
        ("layout", run(&["layout", "dynamic.vhdx"], 0)),
        ("layout", run(&["layout", "zeros.raw"], 0)),
        ("dump", run(&["dump", "dynamic.vhdx"], 0)),
        ("dump", run(&["dump", "zeros.raw"], 0)),
        ("compare", run(&["compare", "zeros.raw", "zeros.raw"], 0)),
        ("compare", run(&["compare", "zeros.raw", "ones.raw"], 1)),
        (
            "create",
            run(&["create", "-f", "vhdx", "base.vhdx", "8M"], 0),
        ),
        (
            "create",
            run(&["create", "-f", "vhdx", "-b", "base.vhdx", "top.vhdx"], 0),
        ),
        (
            "convert",
            run(&["convert", "-O", "raw", "dynamic.vhdx", "out.raw"], 0),
        ),
        ("io", run(&["io", "-c", "write -P 7 0 1M", "top.vhdx"], 0)),
        ("commit", run(&["commit", "top.vhdx"], 0)),
        ("resize", run(&["resize", "base.vhdx", "16M"], 0)),
        ("discard", run(&["discard", "base.vhdx", "0", "1M"], 0)),
        ("compact", run(&["compact", "base.vhdx"], 0)),
        ("geometry", run(&["geometry", "base.vhdx"], 0)),
        (
            "comment",
            run(&["comment", "--set", "hello", "base.vhdx"], 0),
        ),
        ("info", run(&["info", "base.vhdx"], 0)),
        ("bench", run(&["bench", "-c", "10", "base.vhdx"], 0)),
        ("error", run(&["info", "missing.vhdx"], 2)),
    ];
    // setuuid with every UUID set, on a child (which has a parent UUID).
    run(&["create", "-f", "vhdx", "-b", "base.vhdx", "top2.vhdx"], 0);
    let u = "01234567-89ab-cdef-0123-456789abcdef";
    runs.push((
        "setuuid",
        run(
            &[
                "setuuid",
                "--uuid",
                u,
                "--modification-uuid",
                u,
                "--parent-uuid",
                u,
                "top2.vhdx",
            ],
            0,
        ),
    ));
    {
        // An error with a hint: the image is locked by a writer.
        let _holder = qemu_io_holding(VD, &d.join("base.vhdx"), false);
        runs.push(("error", run(&["info", "base.vhdx"], 2)));
    }

    {
        // serve: one document on stdout once it is serving (it then runs until a signal).
        use std::io::BufRead;
        let mut server = vd_tests::tool::Background(
            std::process::Command::new(VD)
                .args(["--output", "json", "serve", "--socket", "nbd.sock"])
                .arg("dynamic.vhdx")
                .current_dir(d)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("vd-tool serve starts"),
        );
        let mut line = String::new();
        std::io::BufReader::new(server.0.stdout.take().expect("piped stdout"))
            .read_line(&mut line)
            .expect("a line from serve");
        let v = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("serve's line is not one JSON document ({e}): {line}"));
        runs.push(("serve", v));
    }

    // map: JSON Lines, a header and then one extent per line.
    for image in ["dynamic.vhdx", "child.avhdx"] {
        let o = vd_in(d, &["map", "--output", "json", image]);
        assert!(o.status.success(), "{}", stderr(&o));
        let text = String::from_utf8(o.stdout).expect("UTF-8");
        let mut lines = text.lines();
        let header: Value = serde_json::from_str(lines.next().expect("a header")).unwrap();
        runs.push(("map", header));
        for line in lines {
            runs.push(("map extent", serde_json::from_str(line).unwrap()));
        }
    }
    let docs = documented();
    let mut seen: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for (section, v) in &runs {
        let documented = docs
            .get(*section)
            .unwrap_or_else(|| panic!("docs/json.md has no section {section:?}"));
        for keys in fields(v) {
            for k in &keys {
                assert!(
                    documented.contains_key(k),
                    "{section}: field {k:?} is not documented in docs/json.md: {v}"
                );
            }
            for (k, always) in documented {
                assert!(
                    !always || keys.contains(k),
                    "{section}: {k:?} is documented as always present but missing: {v}"
                );
            }
            seen.entry(section).or_default().extend(keys);
        }
    }
    for (section, documented) in &docs {
        let prose = ["Schema versions"];
        if prose.contains(&section.as_str()) {
            continue;
        }
        let seen = seen
            .get(section.as_str())
            .unwrap_or_else(|| panic!("no run covers the section {section:?}"));
        for k in documented.keys() {
            assert!(
                seen.contains(k),
                "{section}: documented field {k:?} was printed by no run"
            );
        }
    }
}

#[test]
fn dump_gives_typed_values_and_names_for_metadata_items() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ok = |args: &[&str]| {
        let o = vd_in(d, args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    };
    ok(&[
        "create",
        "-f",
        "vhdx",
        "-o",
        "block_size=1M",
        "a.vhdx",
        "8M",
    ]);
    ok(&["comment", "--set", "hello", "a.vhdx"]);
    ok(&["geometry", "--pchs", "100/16/63", "a.vhdx"]);
    let v = doc(&vd_in(d, &["dump", "--output", "json", "a.vhdx"]), 0);
    let items = v["structures"]["metadata"].as_array().expect("items");
    let item = |name: &str| {
        items
            .iter()
            .find(|i| i["name"] == name)
            .unwrap_or_else(|| panic!("no {name:?} item: {v}"))
    };
    assert_eq!(item("vd comment")["value"], "hello");
    assert_eq!(item("vd comment")["user"], true);
    assert_eq!(
        item("vd physical geometry")["value"],
        serde_json::json!({"cylinders": 100, "heads": 16, "sectors": 63})
    );
    assert_eq!(item("virtual disk size")["value"], 8 << 20);
    assert_eq!(item("logical sector size")["value"], 512);
    assert_eq!(item("file parameters")["value"]["block_size"], 1 << 20);
    assert_eq!(
        item("file parameters")["guid"],
        "caa16737-fa36-4d43-b3b6-33f0aa44e76b"
    );
    let regions = v["structures"]["region_table"]["regions"]
        .as_array()
        .expect("regions");
    assert_eq!(regions[0]["name"], "BAT");
    assert_eq!(regions[1]["name"], "metadata");
    // Both header and region table copies, each valid, one of each current.
    for key in ["headers", "region_tables"] {
        let copies = v["structures"][key].as_array().expect("copies");
        assert_eq!(copies.len(), 2, "{key}");
        assert!(copies.iter().all(|c| c["checksum_valid"] == true), "{key}");
        let current = copies.iter().filter(|c| c["current"] == true).count();
        assert_eq!(current, 1, "{key}");
    }
    // The human form names them too.
    let text = stdout(&vd_in(d, &["dump", "a.vhdx"]));
    assert!(text.contains("name:         vd comment"), "{text}");
    assert!(text.contains("value:        hello"), "{text}");
}
