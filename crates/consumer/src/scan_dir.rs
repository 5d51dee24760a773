//! PATH tasks name a file on the shared scan volume. Each producer spills into its tenant's
//! directory, `<scan dir>/<tenant>/`, and a task is resolved only in the directory of the
//! tenant it was delivered for (the tenant of the Redis stream it came from, which only that
//! tenant can write to), never the tenant it names, nor anywhere its path points: the
//! directory is opened from the scan directory's descriptor, and the file from the
//! directory's, by its name alone (one component, not `.` or `..`), neither through a
//! symlink. It must be a regular file with one link, owned by the directory's owner. So no
//! task reaches another tenant's file by an absolute path, `..`, a symlink or a hard link.
//! The consumer never modifies the file: the producer that spilled it removes it.
//!
//! The tasks of the seed's producers, which spilled into the scan directory itself, are
//! resolved there, under the same rules, and only for the default tenant.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

/// The directory of the tenant of a producer without a `TENANT` (the queue's default
/// tenant, which the seed's tasks are delivered as).
pub const DEFAULT_TENANT_DIR: &str = virus_scanner_queue::DEFAULT_TENANT;

#[derive(Debug, thiserror::Error)]
pub enum PathRejected {
    #[error("path {0:?} is not absolute")]
    NotAbsolute(String),
    #[error("path {0:?} does not name a file by one component (empty, '.' or '..')")]
    DotComponent(String),
    #[error("path {0:?} is outside the scan directory")]
    OutsideScanDir(String),
    #[error(
        "path {path:?} is outside the scan directory of tenant {tenant:?}, which the task was \
         delivered for"
    )]
    OutsideTenantDir { path: String, tenant: String },
    #[error("tenant {0:?} cannot name a directory")]
    Tenant(String),
    #[error("path {0:?} is or passes through a symlink")]
    Symlink(String),
    #[error("path {0:?} is not a regular file")]
    NotRegularFile(String),
    #[error("file {0:?} has more than one link")]
    Linked(String),
    #[error("file {path:?} belongs to uid {owner}, its tenant's directory to uid {dir_owner}")]
    Owner {
        path: String,
        owner: u32,
        dir_owner: u32,
    },
    #[error("file {0:?} is not the body its producer hashed")]
    NotTheHashedBody(String),
    #[error("cannot open {path:?}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
}

/// The scan directory, opened once at start-up.
#[derive(Debug, Clone)]
pub struct ScanDir {
    configured: PathBuf,
    canonical: PathBuf,
    dir: Arc<OwnedFd>,
}

/// The name of `tenant`'s directory: the tenant itself, one path component of
/// `[A-Za-z0-9._-]` (as it names the tenant's Redis keys), or [`DEFAULT_TENANT_DIR`].
pub fn tenant_dir_name(tenant: &str) -> Result<&str, PathRejected> {
    let name = if tenant.is_empty() {
        DEFAULT_TENANT_DIR
    } else {
        tenant
    };
    if matches!(name, "." | "..")
        || virus_scanner_protocol::task::validate_tenant_key(name).is_err()
    {
        return Err(PathRejected::Tenant(tenant.to_owned()));
    }
    Ok(name)
}

impl ScanDir {
    pub fn new(dir: &Path) -> std::io::Result<ScanDir> {
        let canonical = dir.canonicalize()?;
        let fd = rustix::fs::open(
            &canonical,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(ScanDir {
            configured: dir.to_path_buf(),
            canonical,
            dir: Arc::new(fd),
        })
    }

    pub fn path(&self) -> &Path {
        &self.canonical
    }

    /// Opens the file a PATH task names, for a task delivered for `tenant` (trusted): `path`
    /// must be `<scan dir>/<tenant>/<name>`, and is opened as the module explains.
    pub fn open(&self, tenant: &str, path: &str) -> Result<File, PathRejected> {
        let dir_name = tenant_dir_name(tenant)?;
        let name = self.file_name(path, Some(dir_name), tenant)?;
        let dir = rustix::fs::openat(
            self.dir.as_fd(),
            dir_name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| rejected(e, path))?;
        open_in(&dir, name, path)
    }

    /// Opens the file of a task of the seed's format, which its producer spilled into the
    /// scan directory itself: `<scan dir>/<name>`, under the rules of [`ScanDir::open`].
    pub fn open_seed(&self, path: &str) -> Result<File, PathRejected> {
        let name = self.file_name(path, None, DEFAULT_TENANT_DIR)?;
        open_in(&self.dir, name, path)
    }

    /// The last component of `path`, if the rest is the scan directory (and `tenant_dir`).
    fn file_name<'p>(
        &self,
        path: &'p str,
        tenant_dir: Option<&str>,
        tenant: &str,
    ) -> Result<&'p str, PathRejected> {
        if !path.starts_with('/') {
            return Err(PathRejected::NotAbsolute(path.into()));
        }
        let (parent, name) = path.rsplit_once('/').unwrap_or(("", path));
        if matches!(name, "" | "." | "..") || name.contains('\0') {
            return Err(PathRejected::DotComponent(path.into()));
        }
        let parent = Path::new(parent);
        let inside = |root: &Path| match tenant_dir {
            Some(dir) => parent == root.join(dir),
            None => parent == root,
        };
        // `Path` equality compares components, so `//` and a trailing `/` do not matter; a
        // `..` does, and is refused with everything else that is not the directory itself.
        if !(inside(&self.configured) || inside(&self.canonical)) {
            return Err(match tenant_dir {
                Some(_) => PathRejected::OutsideTenantDir {
                    path: path.into(),
                    tenant: tenant.into(),
                },
                None => PathRejected::OutsideScanDir(path.into()),
            });
        }
        Ok(name)
    }
}

/// Opens `name` in `dir`: not through a symlink, a regular file with one link, owned by the
/// directory's owner. A directory of root's with the sticky bit (what the kubelet makes of a
/// `subPath` that does not exist yet) holds its producer's files, which are not root's.
fn open_in(dir: &impl AsFd, name: &str, path: &str) -> Result<File, PathRejected> {
    let open_err = |source| PathRejected::Open {
        path: path.into(),
        source,
    };
    // O_NOFOLLOW: the last component cannot be a symlink; O_NONBLOCK: a FIFO planted in the
    // directory cannot block the open; O_NOCTTY: nor can a terminal become ours.
    let file = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| rejected(e, path))?;
    let file = File::from(file);
    let meta = file.metadata().map_err(open_err)?;
    if !meta.file_type().is_file() {
        return Err(PathRejected::NotRegularFile(path.into()));
    }
    // A spilled file is made with one link and never linked again: a second link is a file
    // of someone else's made to look like one's own.
    if meta.nlink() != 1 {
        return Err(PathRejected::Linked(path.into()));
    }
    let dir_meta = rustix::fs::fstat(dir).map_err(|e| open_err(e.into()))?;
    let kubelet_made = dir_meta.st_uid == 0 && dir_meta.st_mode & 0o1000 != 0;
    if meta.uid() != dir_meta.st_uid && !kubelet_made {
        return Err(PathRejected::Owner {
            path: path.into(),
            owner: meta.uid(),
            dir_owner: dir_meta.st_uid,
        });
    }
    Ok(file)
}

fn rejected(e: Errno, path: &str) -> PathRejected {
    match e {
        // O_NOFOLLOW on a symlink: ELOOP; O_DIRECTORY on a symlink: ENOTDIR as well.
        Errno::LOOP => PathRejected::Symlink(path.into()),
        Errno::NOTDIR => PathRejected::NotRegularFile(path.into()),
        e => PathRejected::Open {
            path: path.into(),
            source: e.into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Setup {
        root: tempfile::TempDir,
        outside: tempfile::TempDir,
        dir: ScanDir,
    }

    impl Setup {
        fn new() -> Setup {
            let root = tempfile::tempdir().unwrap();
            let outside = tempfile::tempdir().unwrap();
            let dir = ScanDir::new(root.path()).unwrap();
            Setup { root, outside, dir }
        }

        fn tenant(&self, tenant: &str) -> PathBuf {
            let d = self.root.path().join(tenant);
            std::fs::create_dir_all(&d).unwrap();
            d
        }

        fn open(&self, tenant: &str, p: &Path) -> Result<File, PathRejected> {
            self.dir.open(tenant, p.to_str().unwrap())
        }
    }

    #[test]
    fn a_file_in_the_tenants_directory_opens() {
        let s = Setup::new();
        let f = s.tenant("team-a").join("vs-spill-1");
        std::fs::write(&f, b"x").unwrap();
        assert!(s.open("team-a", &f).is_ok());
        let d = s.tenant(DEFAULT_TENANT_DIR).join("vs-spill-2");
        std::fs::write(&d, b"x").unwrap();
        assert!(s.open("", &d).is_ok());
    }

    #[test]
    fn outside_relative_and_dotdot_paths_are_refused() {
        let s = Setup::new();
        let a = s.tenant("team-a");
        let o = s.outside.path().join("secret");
        std::fs::write(&o, b"x").unwrap();
        assert!(matches!(
            s.open("team-a", &o),
            Err(PathRejected::OutsideTenantDir { .. })
        ));
        assert!(matches!(
            s.dir.open("team-a", "vs-spill-1"),
            Err(PathRejected::NotAbsolute(_))
        ));
        let dotdot = format!("{}/../{}", a.display(), o.display());
        assert!(s.dir.open("team-a", &dotdot).is_err());
        for bad in [".", "..", ""] {
            assert!(matches!(
                s.dir.open("team-a", &format!("{}/{bad}", a.display())),
                Err(PathRejected::DotComponent(_))
            ));
        }
        assert!(matches!(
            s.dir.open("team-a", "/etc/passwd"),
            Err(PathRejected::OutsideTenantDir { .. })
        ));
        // The scan directory itself is no tenant's.
        let top = s.root.path().join("top");
        std::fs::write(&top, b"x").unwrap();
        assert!(matches!(
            s.open("team-a", &top),
            Err(PathRejected::OutsideTenantDir { .. })
        ));
        for tenant in ["..", ".", "a/b"] {
            assert!(matches!(
                s.open(tenant, &a.join("x")),
                Err(PathRejected::Tenant(_))
            ));
        }
    }

    #[test]
    fn symlinks_are_refused_even_inside() {
        let s = Setup::new();
        let a = s.tenant("team-a");
        let o = s.outside.path().join("secret");
        std::fs::write(&o, b"x").unwrap();
        let link = a.join("link");
        std::os::unix::fs::symlink(&o, &link).unwrap();
        assert!(matches!(
            s.open("team-a", &link),
            Err(PathRejected::Symlink(_))
        ));
        let inner = a.join("inner");
        std::fs::write(&inner, b"x").unwrap();
        let ilink = a.join("ilink");
        std::os::unix::fs::symlink(&inner, &ilink).unwrap();
        assert!(matches!(
            s.open("team-a", &ilink),
            Err(PathRejected::Symlink(_))
        ));
        // A tenant directory that is a symlink to another's.
        let b = s.tenant("team-b");
        std::fs::write(b.join("f"), b"x").unwrap();
        std::os::unix::fs::symlink(&b, s.root.path().join("team-c")).unwrap();
        assert!(
            s.open("team-c", &s.root.path().join("team-c").join("f"))
                .is_err()
        );
    }

    #[test]
    fn directories_fifos_linked_and_missing_files_are_refused() {
        let s = Setup::new();
        let a = s.tenant("team-a");
        let sub = a.join("sub");
        std::fs::create_dir(&sub).unwrap();
        assert!(matches!(
            s.open("team-a", &sub),
            Err(PathRejected::NotRegularFile(_))
        ));
        assert!(matches!(
            s.open("team-a", &a.join("missing")),
            Err(PathRejected::Open { .. })
        ));
        let f = a.join("f");
        std::fs::write(&f, b"x").unwrap();
        std::fs::hard_link(&f, a.join("g")).unwrap();
        assert!(matches!(
            s.open("team-a", &a.join("g")),
            Err(PathRejected::Linked(_))
        ));
    }

    #[test]
    fn seed_tasks_open_at_the_top_of_the_scan_directory_only() {
        let s = Setup::new();
        let top = s.root.path().join("seed-file");
        std::fs::write(&top, b"x").unwrap();
        assert!(s.dir.open_seed(top.to_str().unwrap()).is_ok());
        let a = s.tenant("team-a").join("f");
        std::fs::write(&a, b"x").unwrap();
        assert!(matches!(
            s.dir.open_seed(a.to_str().unwrap()),
            Err(PathRejected::OutsideScanDir(_))
        ));
    }
}
