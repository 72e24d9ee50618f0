//! The independent tools the tests compare against, and what installs each.
//!
//! A missing peer is a test failure, never a skip: [`require`] (and every runner in
//! [`crate::process`] when a program cannot be started) panics with one line naming the peer and
//! the command that installs it. `.ci/peers` installs all of them when missing (`.ci/run` calls
//! it).

use std::process::{Command, Stdio};

/// A tool the tests read our images with (or make images with).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// `qemu-img` from QEMU (Debian package `qemu-utils`).
    QemuImg,
    /// `qemu-io` from QEMU (Debian package `qemu-utils`).
    QemuIo,
    /// libvhdi's Python binding `pyvhdi` (PyPI `libvhdi-python`).
    Pyvhdi,
    /// The `dissect.hypervisor` Python package.
    Dissect,
    /// The Python 3 interpreter, which runs the two Python readers.
    Python3,
}

impl Peer {
    /// The name the user knows it by.
    pub fn name(self) -> &'static str {
        match self {
            Peer::QemuImg => "qemu-img",
            Peer::QemuIo => "qemu-io",
            Peer::Pyvhdi => "pyvhdi (libvhdi)",
            Peer::Dissect => "dissect.hypervisor",
            Peer::Python3 => "python3",
        }
    }

    /// The command that installs it (as `.ci/peers` does).
    pub fn install(self) -> &'static str {
        match self {
            Peer::QemuImg | Peer::QemuIo => "apt-get install -y qemu-utils",
            Peer::Pyvhdi => "python3 -m pip install libvhdi-python",
            Peer::Dissect => "python3 -m pip install 'dissect.hypervisor>=3.21,<4'",
            Peer::Python3 => "apt-get install -y python3 python3-pip",
        }
    }

    /// The peer a program name belongs to, if it is one.
    pub fn of_program(program: &str) -> Option<Peer> {
        match program {
            "qemu-img" => Some(Peer::QemuImg),
            "qemu-io" => Some(Peer::QemuIo),
            "python3" => Some(Peer::Python3),
            _ => None,
        }
    }

    /// The one-line failure for a missing peer.
    pub fn missing(self) -> String {
        format!(
            "{} is required by this test and is missing: install it with `{}` \
             (or run `.ci/peers`, which installs every peer)",
            self.name(),
            self.install()
        )
    }

    /// Whether the peer is present and starts.
    pub fn present(self) -> bool {
        let (program, args): (&str, &[&str]) = match self {
            Peer::QemuImg => ("qemu-img", &["--version"]),
            Peer::QemuIo => ("qemu-io", &["--version"]),
            Peer::Python3 => ("python3", &["--version"]),
            Peer::Pyvhdi => ("python3", &["-c", "import pyvhdi"]),
            Peer::Dissect => ("python3", &["-c", "import dissect.hypervisor"]),
        };
        Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

/// Fails the test with [`Peer::missing`]'s line unless every peer in `peers` is present.
///
/// # Panics
///
/// When a peer is missing.
#[track_caller]
pub fn require(peers: &[Peer]) {
    for &peer in peers {
        if !peer.present() {
            panic!("{}", peer.missing());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_peer_is_one_line_with_its_install_command() {
        for peer in [
            Peer::QemuImg,
            Peer::QemuIo,
            Peer::Pyvhdi,
            Peer::Dissect,
            Peer::Python3,
        ] {
            let line = peer.missing();
            assert_eq!(line.lines().count(), 1, "{line}");
            assert!(line.starts_with(peer.name()), "{line}");
            assert!(line.contains(&format!("`{}`", peer.install())), "{line}");
        }
        assert_eq!(Peer::of_program("qemu-img"), Some(Peer::QemuImg));
        assert_eq!(Peer::of_program("qemu-io"), Some(Peer::QemuIo));
        assert_eq!(Peer::of_program("cp"), None);
    }
}
