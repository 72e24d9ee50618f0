//! The one process runner of the tests: runs a program to completion with stdin closed and
//! returns its [`Output`]; [`run_ok`] also requires exit 0 and shows both streams when not.
//!
//! A program that cannot be started fails the test with one line; for a peer (qemu-img,
//! qemu-io, python3) that line names the command that installs it ([`crate::peers`]).

use std::ffi::OsStr;
use std::io::ErrorKind;
use std::process::{Command, Output, Stdio};

use crate::peers::Peer;

/// Runs `program args` to completion (stdin closed) and returns what it did.
///
/// # Panics
///
/// When the program cannot be started: one line naming it (and, for a peer, how to install it).
#[track_caller]
pub fn output<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Output {
    match Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) => o,
        Err(e) => match Peer::of_program(program) {
            Some(peer) if e.kind() == ErrorKind::NotFound => panic!("{}", peer.missing()),
            _ => panic!("cannot run {program}: {e}"),
        },
    }
}

/// Runs `program args` and requires exit code 0.
///
/// # Panics
///
/// When the program cannot be started or exits with anything but 0; the message holds the
/// command line, the exit status and both output streams.
#[track_caller]
pub fn run_ok<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Output {
    let o = output(program, args);
    assert!(
        o.status.success(),
        "`{program} {}` failed: {}",
        args.iter()
            .map(|a| a.as_ref().to_string_lossy())
            .collect::<Vec<_>>()
            .join(" "),
        show(&o)
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

/// The exit status and both streams, for failure messages.
pub fn show(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        stdout(o),
        stderr(o)
    )
}

#[cfg(test)]
mod tests {
    use std::panic::catch_unwind;

    use super::*;

    fn panic_message(f: impl FnOnce() + std::panic::UnwindSafe) -> String {
        let err = catch_unwind(f).expect_err("it fails");
        err.downcast_ref::<String>().cloned().unwrap_or_default()
    }

    #[test]
    fn a_program_that_cannot_start_is_one_line_naming_it() {
        let msg = panic_message(|| {
            output("vd-tests-no-such-program", &["x"]);
        });
        assert_eq!(msg.lines().count(), 1, "{msg}");
        assert!(
            msg.starts_with("cannot run vd-tests-no-such-program: "),
            "{msg}"
        );
    }

    #[test]
    fn a_failed_command_shows_its_line_status_and_streams() {
        let o = output("sh", &["-c", "echo out; echo err >&2; exit 3"]);
        assert_eq!(o.status.code(), Some(3));
        assert_eq!((stdout(&o), stderr(&o)), ("out\n".into(), "err\n".into()));
        let msg = panic_message(|| {
            run_ok("sh", &["-c", "echo out; echo err >&2; exit 3"]);
        });
        assert!(msg.starts_with("`sh -c echo out; echo err >&2; exit 3` failed: exit Some(3)"));
        assert!(
            msg.contains("--- stdout\nout\n") && msg.contains("--- stderr\nerr\n"),
            "{msg}"
        );
    }
}
