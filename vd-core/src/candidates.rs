//! Where a differencing image's parent may be on this host, from the paths its format records
//! (written on Windows, often): shared by the backends with parent locators.

use std::path::{Path, PathBuf};

use crate::storage::StorageProvider;

/// The parts of a path written with `\` or `/`, without empty and `.` parts, and without a
/// `\\?\` prefix.
fn parts(path: &str) -> Vec<&str> {
    path.strip_prefix(r"\\?\")
        .unwrap_or(path)
        .split(['\\', '/'])
        .filter(|s| !s.is_empty() && *s != ".")
        .collect()
}

/// Candidate parent paths, most likely first, without duplicates: the paths added (relative
/// ones resolved against the child's folder, Windows drive letters mapped to `/mnt/<letter>`,
/// WSL's convention), then the file name of each path added, beside the child.
pub struct ParentCandidates<'a> {
    child: &'a Path,
    provider: &'a dyn StorageProvider,
    paths: Vec<PathBuf>,
    names: Vec<String>,
}

impl<'a> ParentCandidates<'a> {
    /// No candidates yet, for the child at `child`, whose paths `provider` resolves.
    pub fn new(child: &'a Path, provider: &'a dyn StorageProvider) -> Self {
        Self {
            child,
            provider,
            paths: Vec::new(),
            names: Vec::new(),
        }
    }

    fn push(&mut self, p: PathBuf) {
        if !self.paths.contains(&p) {
            self.paths.push(p);
        }
    }

    fn name_of(&mut self, parts: &[&str]) {
        if let Some(last) = parts.last() {
            self.names.push((*last).to_string());
        }
    }

    /// A path relative to the child's folder (`..\base.vhdx`).
    pub fn relative(&mut self, path: &str) {
        let parts = parts(path);
        let relative: PathBuf = parts.iter().collect();
        let resolved = self.provider.resolve(self.child, &relative);
        self.push(resolved);
        self.name_of(&parts);
    }

    /// A Windows absolute path (`C:\VMs\base.vhdx`, `\\?\Volume{...}\base.vhdx`): a drive
    /// letter maps to `/mnt/<letter>`; a volume cannot be mapped, so only its file name is
    /// tried beside the child.
    pub fn windows_absolute(&mut self, path: &str) {
        let parts = parts(path);
        if let Some(first) = parts.first()
            && first.len() == 2
            && first.ends_with(':')
        {
            let mut p = PathBuf::from("/mnt");
            p.push(first.trim_end_matches(':').to_ascii_lowercase());
            p.extend(parts.iter().skip(1));
            self.push(p);
        }
        self.name_of(&parts);
    }

    /// A path on this host as it is (a Mac `file://` locator's path, say).
    pub fn host(&mut self, path: PathBuf) {
        self.push(path);
    }

    /// Only the file name of `path`, tried beside the child.
    pub fn name(&mut self, path: &str) {
        self.name_of(&parts(path));
    }

    /// The candidates, most likely first.
    pub fn into_paths(mut self) -> Vec<PathBuf> {
        let dir = self.child.parent().unwrap_or_else(|| Path::new(""));
        for n in std::mem::take(&mut self.names) {
            self.push(dir.join(n));
        }
        self.paths
    }
}
