//! Exit codes and top-level error reporting.

use std::process::ExitCode;

/// Success.
pub const OK: u8 = 0;
/// A check found problems, or a comparison found differences.
#[allow(
    dead_code,
    reason = "used by check and compare, which come with the VHDX issues"
)]
pub const PROBLEMS: u8 = 1;
/// An error (clap also uses 2 for usage errors).
pub const ERROR: u8 = 2;

/// Whether a broken pipe (stdout closed by `head`, say) caused the error: that is not a failure.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            || e.downcast_ref::<serde_json::Error>()
                .is_some_and(|j| j.io_error_kind() == Some(std::io::ErrorKind::BrokenPipe))
    })
}

/// Whether an image lock held by another process caused the error.
fn is_locked(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<vd_core::Error>()
            .is_some_and(|v| v.kind() == vd_core::ErrorKind::Locked)
    })
}

/// The parent-linkage mismatch behind the error, if that is what it is.
fn linkage(err: &anyhow::Error) -> Option<&vd_core::LinkageMismatch> {
    err.chain()
        .filter_map(|e| e.downcast_ref::<vd_core::Error>())
        .find_map(vd_core::Error::linkage_mismatch)
}

/// `path` as one shell word: as is when it holds only safe characters, else single-quoted.
fn shell_word(path: &std::path::Path) -> String {
    let s = path.to_string_lossy();
    let safe = |c: char| c.is_ascii_alphanumeric() || "/._-+:,@%=".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Runs a command: its `Ok` value is the exit code; an error is printed on one line to stderr
/// and exits with [`ERROR`].
pub fn run(f: impl FnOnce() -> anyhow::Result<u8>) -> ExitCode {
    match f() {
        Ok(code) => ExitCode::from(code),
        Err(err) if is_broken_pipe(&err) => ExitCode::from(OK),
        Err(err) => {
            eprintln!("error: {}", crate::render::sanitize(&format!("{err:#}")));
            if is_locked(&err) {
                eprintln!(
                    "hint: close the other program first; to only read the image while it is \
                     in use, add -U (--force-share): what is read may then change meanwhile"
                );
            }
            if let Some(m) = linkage(&err) {
                eprintln!(
                    "hint: if {} is the right parent (its data was changed on purpose), relink \
                     the child to it with: vd-tool setuuid --parent-uuid {} {}",
                    crate::render::sanitize(&m.parent.display().to_string()),
                    m.found,
                    crate::render::sanitize(&shell_word(&m.child)),
                );
            }
            ExitCode::from(ERROR)
        }
    }
}
