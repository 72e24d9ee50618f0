//! Where a differencing image's parent may be on this host, from the paths its format records
//! (written on Windows, often): shared by the backends with parent locators.

use std::path::{Component, Path, PathBuf};

use crate::storage::StorageProvider;

/// `target` relative to the folder of `from`, Windows-style (`.\\name`, `..\\dir\\name`), as
/// differencing images record their parent; `None` when a part is not UTF-8 or `from` has no
/// folder.
pub fn relative_windows_path(from: &Path, target: &Path) -> Option<String> {
    let base: Vec<Component<'_>> = from.parent()?.components().collect();
    let to: Vec<Component<'_>> = target.components().collect();
    let common = base.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<String> = Vec::new();
    if common == base.len() {
        parts.push(".".into());
    }
    for _ in common..base.len() {
        parts.push("..".into());
    }
    for c in to.get(common..)? {
        parts.push(c.as_os_str().to_str()?.to_string());
    }
    Some(parts.join("\\"))
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_are_windows_style() {
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(
            relative_windows_path(&p("/a/b/c.vhdx"), &p("/a/b/p.vhdx")).unwrap(),
            r".\p.vhdx"
        );
        assert_eq!(
            relative_windows_path(&p("/a/b/c.vhdx"), &p("/a/p.vhdx")).unwrap(),
            r"..\p.vhdx"
        );
        assert_eq!(
            relative_windows_path(&p("/a/b/c.vhdx"), &p("/a/x/p.vhdx")).unwrap(),
            r"..\x\p.vhdx"
        );
    }
}
