//! Exit codes and top-level error reporting.

use std::io::Write;
use std::process::ExitCode;

use crate::cli::Output;

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

/// The error's category for JSON: the kind of the first [`vd_core::Error`] in the chain, else
/// `not_found`, `permission_denied` or `io` for a system error, else `other`.
fn kind_name(err: &anyhow::Error) -> String {
    for e in err.chain() {
        if let Some(v) = e.downcast_ref::<vd_core::Error>()
            && let Ok(serde_json::Value::String(s)) = serde_json::to_value(v.kind())
        {
            return s;
        }
    }
    for e in err.chain() {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::NotFound => "not_found",
                std::io::ErrorKind::PermissionDenied => "permission_denied",
                _ => "io",
            }
            .to_string();
        }
    }
    "other".to_string()
}

/// What the user can do about the error, where vd-tool knows.
fn hint(err: &anyhow::Error) -> Option<String> {
    if is_locked(err) {
        return Some(
            "close the other program first; to only read the image while it is in use, add -U \
             (--force-share): what is read may then change meanwhile"
                .to_string(),
        );
    }
    linkage(err).map(|m| {
        format!(
            "if {} is the right parent (its data was changed on purpose), relink the child to it \
             with: vd-tool setuuid --parent-uuid {} {}",
            m.parent.display(),
            m.found,
            shell_word(&m.child),
        )
    })
}

/// The JSON document of an error: `{"schema_version", "error": {"message", "kind", "hint"?}}`.
fn error_document(err: &anyhow::Error) -> serde_json::Value {
    let mut error = serde_json::json!({
        "message": format!("{err:#}"),
        "kind": kind_name(err),
    });
    if let (Some(h), Some(obj)) = (hint(err), error.as_object_mut()) {
        obj.insert("hint".into(), h.into());
    }
    serde_json::json!({ "schema_version": crate::render::SCHEMA_VERSION, "error": error })
}

/// Runs a command: its `Ok` value is the exit code; an error is printed on one line to stderr
/// (with a `hint:` line where there is one), also as a JSON document on stdout in JSON mode,
/// and exits with [`ERROR`].
pub fn run(output: Output, f: impl FnOnce() -> anyhow::Result<u8>) -> ExitCode {
    match f() {
        Ok(code) => ExitCode::from(code),
        Err(err) if is_broken_pipe(&err) => ExitCode::from(OK),
        Err(err) => {
            eprintln!("error: {}", crate::render::sanitize(&format!("{err:#}")));
            if let Some(h) = hint(&err) {
                eprintln!("hint: {}", crate::render::sanitize(&h));
            }
            if output == Output::Json {
                let mut out = std::io::stdout().lock();
                // Nothing more can be reported when stdout itself fails.
                let _ = serde_json::to_writer_pretty(&mut out, &error_document(&err))
                    .map_err(std::io::Error::from)
                    .and_then(|()| writeln!(out))
                    .and_then(|()| out.flush());
            }
            ExitCode::from(ERROR)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_documents_name_the_kind_of_the_first_vd_error() {
        let vd = vd_core::Error::new(vd_core::ErrorKind::Corrupt, "bad BAT entry");
        let err = anyhow::Error::from(vd).context("opening x.vhdx");
        let doc = error_document(&err);
        assert_eq!(doc["schema_version"], crate::render::SCHEMA_VERSION);
        assert_eq!(doc["error"]["kind"], "corrupt");
        assert_eq!(doc["error"]["message"], "opening x.vhdx: bad BAT entry");
        assert!(doc["error"].get("hint").is_none(), "{doc}");
        let io = anyhow::Error::from(std::io::Error::from(std::io::ErrorKind::NotFound));
        assert_eq!(error_document(&io)["error"]["kind"], "not_found");
        assert_eq!(
            error_document(&anyhow::anyhow!("bad"))["error"]["kind"],
            "other"
        );
    }
}
