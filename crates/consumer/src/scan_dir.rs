//! PATH tasks name a file on the shared scan volume. The consumer opens it only when it is a
//! regular file inside that directory, reached without a symlink, and never modifies it: the
//! producer that spilled the file removes it.

use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PathRejected {
    #[error("path {0:?} is not absolute")]
    NotAbsolute(String),
    #[error("path {0:?} contains '.' or '..'")]
    DotComponent(String),
    #[error("path {0:?} is outside the scan directory")]
    OutsideScanDir(String),
    #[error("path {0:?} is or passes through a symlink")]
    Symlink(String),
    #[error("path {0:?} is not a regular file")]
    NotRegularFile(String),
    #[error("cannot open {path:?}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
}

/// The scan directory, resolved once at start-up.
#[derive(Debug, Clone)]
pub struct ScanDir {
    configured: PathBuf,
    canonical: PathBuf,
}

impl ScanDir {
    pub fn new(dir: &Path) -> std::io::Result<ScanDir> {
        Ok(ScanDir {
            configured: dir.to_path_buf(),
            canonical: dir.canonicalize()?,
        })
    }

    pub fn path(&self) -> &Path {
        &self.canonical
    }

    /// Opens `path` for reading if it is a regular file inside the scan directory.
    pub fn open(&self, path: &str) -> Result<std::fs::File, PathRejected> {
        let p = Path::new(path);
        if !p.is_absolute() {
            return Err(PathRejected::NotAbsolute(path.into()));
        }
        if p.components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        {
            return Err(PathRejected::DotComponent(path.into()));
        }
        if !(p.starts_with(&self.configured) || p.starts_with(&self.canonical)) {
            return Err(PathRejected::OutsideScanDir(path.into()));
        }
        let open_err = |source| PathRejected::Open {
            path: path.into(),
            source,
        };
        // Resolving every component catches a symlinked directory on the way.
        let resolved = p.canonicalize().map_err(open_err)?;
        if !resolved.starts_with(&self.canonical) {
            return Err(PathRejected::OutsideScanDir(path.into()));
        }
        let lexical = self.canonical.join(
            p.strip_prefix(&self.canonical)
                .or_else(|_| p.strip_prefix(&self.configured))
                .map_err(|_| PathRejected::OutsideScanDir(path.into()))?,
        );
        if resolved != lexical {
            return Err(PathRejected::Symlink(path.into()));
        }
        // O_NOFOLLOW: the last component cannot be swapped for a symlink after the check;
        // O_NONBLOCK: a FIFO planted in the directory cannot block the open.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&resolved)
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::ELOOP) {
                    PathRejected::Symlink(path.into())
                } else {
                    open_err(e)
                }
            })?;
        let meta = file.metadata().map_err(open_err)?;
        if !meta.is_file() {
            return Err(PathRejected::NotRegularFile(path.into()));
        }
        // The file we opened is the one we checked, not one renamed into place since.
        let checked = std::fs::symlink_metadata(&resolved).map_err(open_err)?;
        if (checked.dev(), checked.ino()) != (meta.dev(), meta.ino()) {
            return Err(PathRejected::Symlink(path.into()));
        }
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, tempfile::TempDir, ScanDir) {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let dir = ScanDir::new(root.path()).unwrap();
        (root, outside, dir)
    }

    #[test]
    fn file_inside_opens() {
        let (root, _o, dir) = setup();
        let f = root.path().join("a.bin");
        std::fs::write(&f, b"x").unwrap();
        assert!(dir.open(f.to_str().unwrap()).is_ok());
    }

    #[test]
    fn outside_relative_and_dotdot_paths_are_refused() {
        let (root, outside, dir) = setup();
        let o = outside.path().join("secret");
        std::fs::write(&o, b"x").unwrap();
        assert!(matches!(
            dir.open(o.to_str().unwrap()),
            Err(PathRejected::OutsideScanDir(_))
        ));
        assert!(matches!(
            dir.open("a.bin"),
            Err(PathRejected::NotAbsolute(_))
        ));
        let dotdot = format!("{}/../{}", root.path().display(), o.display());
        assert!(matches!(
            dir.open(&dotdot),
            Err(PathRejected::DotComponent(_))
        ));
        assert!(matches!(
            dir.open("/etc/passwd"),
            Err(PathRejected::OutsideScanDir(_))
        ));
    }

    #[test]
    fn symlinks_out_of_the_directory_are_refused() {
        let (root, outside, dir) = setup();
        let o = outside.path().join("secret");
        std::fs::write(&o, b"x").unwrap();
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&o, &link).unwrap();
        assert!(dir.open(link.to_str().unwrap()).is_err());
        let dlink = root.path().join("dlink");
        std::os::unix::fs::symlink(outside.path(), &dlink).unwrap();
        assert!(dir.open(&format!("{}/secret", dlink.display())).is_err());
        // Even a symlink that stays inside is refused: the task must name the file itself.
        let inner = root.path().join("inner");
        std::fs::write(&inner, b"x").unwrap();
        let ilink = root.path().join("ilink");
        std::os::unix::fs::symlink(&inner, &ilink).unwrap();
        assert!(matches!(
            dir.open(ilink.to_str().unwrap()),
            Err(PathRejected::Symlink(_))
        ));
    }

    #[test]
    fn directories_and_missing_files_are_refused() {
        let (root, _o, dir) = setup();
        let sub = root.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        assert!(matches!(
            dir.open(sub.to_str().unwrap()),
            Err(PathRejected::NotRegularFile(_))
        ));
        assert!(matches!(
            dir.open(root.path().join("missing").to_str().unwrap()),
            Err(PathRejected::Open { .. })
        ));
    }
}
