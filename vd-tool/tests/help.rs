//! Help, completions, the man page, `-p` without a terminal and `-v`: what a person at a
//! terminal meets first.

use std::process::Command;

use vd_tests::process::{stderr, stdout};
use vd_tests::{qemu, s, vd_tool_fns};

vd_tool_fns!();

#[test]
fn short_and_long_help_open_with_the_same_line_and_group_the_commands() {
    let short = stdout(&vd_ok(&["-h"]));
    let long = stdout(&vd_ok(&["--help"]));
    assert_eq!(short.lines().next(), long.lines().next());
    for group in [
        "Inspect:",
        "Create and convert:",
        "Maintain:",
        "Test:",
        "Shell:",
    ] {
        assert!(short.contains(group), "{group} in:\n{short}");
    }
    // Commands sit under their group, in that order.
    let at = |needle: &str| short.find(needle).unwrap_or_else(|| panic!("{needle}"));
    assert!(at("Inspect:") < at("\n  info ") && at("\n  info ") < at("Create and convert:"));
    assert!(at("Maintain:") < at("\n  check ") && at("\n  check ") < at("Test:"));
    assert!(long.contains("Examples:"), "{long}");
    // -O and --output are no longer both "Output format".
    let convert = stdout(&vd_ok(&["convert", "--help"]));
    assert!(convert.contains("Format of the new image"), "{convert}");
    assert!(convert.contains("How results are printed"), "{convert}");
    assert!(
        convert.contains("Examples:\n  vd-tool convert"),
        "{convert}"
    );
}

#[test]
fn io_help_describes_its_command_language() {
    let help = stdout(&vd_ok(&["io", "--help"]));
    for word in [
        "read [-P PATTERN]",
        "write [-P PATTERN | -z]",
        "discard",
        "flush",
        "sleep",
    ] {
        assert!(help.contains(word), "{word} in:\n{help}");
    }
}

#[test]
fn completions_are_scripts_for_each_shell() {
    let dir = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let script = stdout(&vd_ok(&["completions", shell]));
        for name in ["convert", "check", "completions", "output-format"] {
            assert!(script.contains(name), "{shell}: {name}");
        }
        let path = dir.path().join(format!("vd-tool.{shell}"));
        std::fs::write(&path, &script).unwrap();
        if shell == "bash" {
            // bash is on every machine the tests run on: the script must at least parse.
            let o = Command::new("bash").arg("-n").arg(&path).output().unwrap();
            assert!(o.status.success(), "bash -n: {}", stderr(&o));
        }
    }
    let o = vd(&["completions", "tcsh"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn the_man_page_covers_every_command() {
    let page = stdout(&vd_ok(&["man"]));
    assert!(
        page.starts_with(".ie") || page.contains(".TH vd-tool 1"),
        "{page}"
    );
    for name in ["convert", "check", "commit", "completions"] {
        assert!(page.contains(name), "{name}");
    }
    let dir = tempfile::tempdir().unwrap();
    vd_ok(&["man", "--dir", s(dir.path())]);
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(names.contains(&"vd-tool.1".to_string()), "{names:?}");
    let convert = std::fs::read_to_string(dir.path().join("vd-tool-convert.1")).unwrap();
    assert!(convert.contains(".TH vd-tool-convert 1"), "{convert}");
    assert!(convert.contains("output\\-format"), "{convert}");
    // One page per command (and none for clap's own help).
    assert!(!names.iter().any(|n| n == "vd-tool-help.1"), "{names:?}");
    assert!(names.len() > 15, "{names:?}");
}

#[test]
fn progress_without_a_terminal_is_plain_lines_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.vhdx");
    qemu::vhdx(&src, "64M", 0x5a, "48M");
    let plain = dir.path().join("plain.raw");
    let shown = dir.path().join("shown.raw");
    // stdout and stderr are pipes here, never a terminal.
    let quiet = vd_ok(&["convert", "-O", "raw", s(&src), s(&plain)]);
    let with_p = vd_ok(&["convert", "-p", "-O", "raw", s(&src), s(&shown)]);
    let err = stderr(&with_p);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("progress: "))
        .collect();
    assert!(!lines.is_empty(), "no progress lines in {err:?}");
    assert_eq!(
        lines.last().copied(),
        Some("progress: 64 MiB of 64 MiB (100%)"),
        "{err}"
    );
    assert!(
        !err.contains('\u{1b}') && !err.contains('\r'),
        "no terminal codes: {err:?}"
    );
    assert_eq!(stdout(&with_p), stdout(&quiet), "-p adds nothing to stdout");
    assert!(stderr(&quiet).is_empty(), "without -p: {}", stderr(&quiet));
    assert_eq!(
        std::fs::read(&plain).unwrap(),
        std::fs::read(&shown).unwrap()
    );
}

#[test]
fn verbose_says_what_each_command_opened_created_and_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    qemu::vhdx(&base, "16M", 0x11, "1M");
    let child = dir.path().join("child.vhdx");
    let out = dir.path().join("out.vhdx");
    let err = stderr(&vd_ok(&[
        "-v",
        "create",
        "-f",
        "vhdx",
        "-b",
        s(&base),
        s(&child),
    ]));
    assert!(
        err.contains("created as vhdx") && err.contains("differencing over"),
        "{err}"
    );
    for args in [
        vec!["info", s(&child)],
        vec!["map", s(&child)],
        vec!["check", s(&child)],
        vec!["compare", s(&child), s(&base)],
    ] {
        let mut a = vec!["-v"];
        a.extend(&args);
        let o = vd(&a);
        let err = stderr(&o);
        assert!(err.contains("opened as vhdx"), "{args:?}: {err}");
    }
    let err = stderr(&vd_ok(&["-v", "map", s(&child)]));
    assert!(err.contains("parent found at"), "{err}");
    let err = stderr(&vd_ok(&["-v", "convert", "-O", "vhdx", s(&child), s(&out)]));
    assert!(err.contains("renamed over"), "{err}");
    // -vv adds the probe's reasoning.
    let err = stderr(&vd_ok(&["-vv", "probe", s(&base)]));
    assert!(err.contains("vhdx says"), "{err}");
    // Every command says at least when it finished, and with what exit code.
    let err = stderr(&vd_ok(&["-v", "backends"]));
    assert!(
        err.contains("backends finished in") && err.contains("exit code 0"),
        "{err}"
    );
    let err = stderr(&vd_ok(&["-v", "probe", s(&base)]));
    assert!(err.contains("vhdx claims it"), "{err}");
    // Without -v, a successful command is silent on stderr.
    assert!(stderr(&vd_ok(&["info", s(&child)])).is_empty());
}
