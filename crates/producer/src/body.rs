//! Bodies on their way to a verdict: kept in memory up to the spill threshold, then written
//! to a file in this producer's directory of the scan directory, hashed as they arrive. A
//! spilled file is removed when its [`SpillFile`] is dropped, on every path: verdict, client
//! abort, timeout, reset.
//!
//! Spool isolation. On a volume shared by the producers of many tenants and the consumers,
//! each producer spills into `<scan dir>/<tenant>/` ([`tenant_spill_dir`]): a directory it
//! owns, mode 0750, where it creates files with `O_EXCL | O_NOFOLLOW`, mode 0640. The
//! consumers read them through the group: the volume's root is set-group-ID and belongs to
//! the consumers' group, so every tenant directory and file made in it belongs to that group
//! (files inherit it; directories inherit the bit as well), and no producer needs to be a
//! member, which would let it read every other tenant's files. A producer of another tenant
//! runs as another uid and is not in that group, so it can neither enter the directory nor
//! read, rename or remove a file in it. (The alternative, a consumer with
//! `CAP_DAC_READ_SEARCH` and files 0600, needs no group on the volume, but the capability
//! is checked by the client's kernel only: on NFS, the usual ReadWriteMany volume, the server
//! checks the uid and groups sent with each call, so a capability reads nothing there, and a
//! consumer holding it could read any file of its own filesystem.)
//!
//! After the verdict the body is released from the descriptor it was written through, never
//! by opening the path again: a file put in its place after the scan is not the one that
//! was scanned.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags};
use sha2::{Digest, Sha256};
use virus_scanner_protocol::task::Bytes;

/// Name prefix of every spilled file, for the janitor.
pub const SPILL_PREFIX: &str = "vs-spill-";

/// The directory of a producer without a `TENANT` (the queue's default tenant).
pub const DEFAULT_TENANT_DIR: &str = virus_scanner_queue::DEFAULT_TENANT;

/// Mode of a tenant directory: the owner writes, the consumers' group enters and reads.
const TENANT_DIR_MODE: u32 = 0o750;
/// Mode of a spilled file: the consumers' group reads it, nobody else.
const SPILL_FILE_MODE: u32 = 0o640;

/// A body message at least this large is hashed off the thread that serves the streams.
const OFF_THREAD_BYTES: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("body exceeds the limit of {0} bytes")]
    TooLarge(u64),
    #[error("spilling the body to disk failed: {0}")]
    Spill(#[from] std::io::Error),
}

/// Why this producer's directory in the scan directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error(
        "TENANT {0:?} cannot name a directory: it must be 1 to 128 characters of \
         [A-Za-z0-9._-], and not '.' or '..'"
    )]
    Tenant(String),
    #[error("{0} is a symlink; the tenant directory must be a directory of its own")]
    Symlink(PathBuf),
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    #[error(
        "{path} belongs to uid {owner}, not to this process (uid {me}), and is not a sticky \
         directory of root's: another tenant's, or made without the sticky bit; make it \
         owned by uid {me}, mode 2750, in the consumers' group"
    )]
    ForeignOwner { path: PathBuf, owner: u32, me: u32 },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The name of `tenant`'s directory in the scan directory: the tenant itself, one path
/// component of `[A-Za-z0-9._-]` (as it names the tenant's Redis keys), or
/// [`DEFAULT_TENANT_DIR`] for none.
pub fn tenant_dir_name(tenant: &str) -> Result<&str, SpoolError> {
    let name = if tenant.is_empty() {
        DEFAULT_TENANT_DIR
    } else {
        tenant
    };
    if matches!(name, "." | "..")
        || virus_scanner_protocol::task::validate_tenant_key(name).is_err()
    {
        return Err(SpoolError::Tenant(tenant.to_owned()));
    }
    Ok(name)
}

/// Makes sure `<scan_dir>/<tenant>` is this process's own directory and returns it: created
/// with mode 0750 if it does not exist; refused if it is a symlink, not a directory, or
/// belongs to another uid. One exception: a directory of root's with the sticky bit, which
/// is what the kubelet makes of a `subPath` that does not exist yet (in a sticky volume
/// root); in it nobody else may rename or remove this producer's files.
pub fn tenant_spill_dir(scan_dir: &Path, tenant: &str) -> Result<PathBuf, SpoolError> {
    let dir = scan_dir.join(tenant_dir_name(tenant)?);
    let io = |source| SpoolError::Io {
        path: dir.clone(),
        source,
    };
    match std::fs::DirBuilder::new()
        .mode(TENANT_DIR_MODE)
        .create(&dir)
    {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(e)),
    }
    let meta = std::fs::symlink_metadata(&dir).map_err(io)?;
    if meta.file_type().is_symlink() {
        return Err(SpoolError::Symlink(dir));
    }
    if !meta.is_dir() {
        return Err(SpoolError::NotADirectory(dir));
    }
    let me = rustix::process::geteuid().as_raw();
    let sticky = meta.mode() & 0o1000 != 0;
    if meta.uid() != me && !(meta.uid() == 0 && sticky) {
        return Err(SpoolError::ForeignOwner {
            path: dir,
            owner: meta.uid(),
            me,
        });
    }
    // Narrow a directory of ours that others may write to or enter (made by an earlier
    // version, or by hand); the set-group-ID bit stays.
    if meta.uid() == me && meta.mode() & 0o027 != 0 {
        let mode = meta.mode() & 0o7750;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    }
    Ok(dir)
}

/// A file in this producer's spill directory that is deleted on drop. It keeps the
/// descriptor it was written through: the body is read back (to unpack it, and to release
/// it after the verdict) from that descriptor, never by its path.
#[derive(Debug)]
pub struct SpillFile {
    path: PathBuf,
    dir: OwnedFd,
    name: String,
    file: File,
}

impl SpillFile {
    fn create(dir: &Path) -> std::io::Result<SpillFile> {
        let name = format!("{SPILL_PREFIX}{}", uuid::Uuid::new_v4().simple());
        // The file is made relative to the directory's descriptor, and neither may be a
        // symlink: what is written is what the directory holds under that name.
        let dir_fd = rustix::fs::open(
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let file = rustix::fs::openat(
            &dir_fd,
            name.as_str(),
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(SPILL_FILE_MODE),
        )?;
        Ok(SpillFile {
            path: dir.join(&name),
            dir: dir_fd,
            name,
            file: File::from(file),
        })
    }

    /// Where the file is, for a consumer that shares the directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A reader over the first `len` bytes of the file, from the descriptor it was written
    /// through. Positioned reads: readers do not share an offset.
    fn reader(&self, len: u64) -> SpillReader<'_> {
        SpillReader {
            file: &self.file,
            pos: 0,
            end: len,
        }
    }
}

impl Drop for SpillFile {
    fn drop(&mut self) {
        if let Err(e) = rustix::fs::unlinkat(&self.dir, self.name.as_str(), AtFlags::empty())
            && e != rustix::io::Errno::NOENT
        {
            tracing::error!(path = %self.path.display(), error = %e, "cannot remove spilled body");
        }
    }
}

/// Reads a spilled body up to its length, at explicit offsets.
struct SpillReader<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for SpillReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.end - self.pos;
        let want = (buf.len() as u64).min(left) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the spilled body is shorter than what was written",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// Where and how bodies are buffered.
#[derive(Debug, Clone)]
pub struct BodyLimits {
    pub spill_dir: PathBuf,
    pub spill_threshold: usize,
    pub max: u64,
}

/// A body being received.
pub struct BodyBuffer {
    limits: BodyLimits,
    mem: Vec<u8>,
    file: Option<SpillFile>,
    len: u64,
    hasher: Sha256,
}

/// A complete body.
#[derive(Debug)]
pub struct Body {
    pub data: BodyData,
    pub len: u64,
    pub sha256: [u8; 32],
}

#[derive(Debug)]
pub enum BodyData {
    /// Shared with the scan task without a copy.
    Memory(Bytes),
    Spilled(SpillFile),
}

impl BodyBuffer {
    pub fn new(limits: BodyLimits) -> BodyBuffer {
        BodyBuffer {
            limits,
            mem: Vec::new(),
            file: None,
            len: 0,
            hasher: Sha256::new(),
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the body went to disk.
    pub fn spilled(&self) -> bool {
        self.file.is_some()
    }

    pub fn push(&mut self, chunk: &[u8]) -> Result<(), BodyError> {
        let new_len = self.len + chunk.len() as u64;
        if new_len > self.limits.max {
            return Err(BodyError::TooLarge(self.limits.max));
        }
        self.hasher.update(chunk);
        self.len = new_len;
        if self.file.is_none() && self.mem.len() + chunk.len() > self.limits.spill_threshold {
            let mut spill = SpillFile::create(&self.limits.spill_dir)?;
            spill.file.write_all(&self.mem)?;
            self.mem = Vec::new();
            self.file = Some(spill);
        }
        match &mut self.file {
            Some(spill) => spill.file.write_all(chunk)?,
            None => self.mem.extend_from_slice(chunk),
        }
        Ok(())
    }

    pub fn finish(self) -> Result<Body, BodyError> {
        let data = match self.file {
            Some(mut spill) => {
                spill.file.flush()?;
                BodyData::Spilled(spill)
            }
            None => BodyData::Memory(self.mem.into()),
        };
        Ok(Body {
            data,
            len: self.len,
            sha256: self.hasher.finalize().into(),
        })
    }
}

impl Body {
    /// A body that is already in memory (BUFFERED mode), spilled if above the threshold.
    pub fn from_vec(bytes: Vec<u8>, limits: &BodyLimits) -> Result<Body, BodyError> {
        if bytes.len() as u64 > limits.max {
            return Err(BodyError::TooLarge(limits.max));
        }
        if bytes.len() > limits.spill_threshold {
            let mut buffer = BodyBuffer::new(limits.clone());
            buffer.push(&bytes)?;
            return buffer.finish();
        }
        let sha256 = Sha256::digest(&bytes).into();
        Ok(Body {
            len: bytes.len() as u64,
            data: BodyData::Memory(bytes.into()),
            sha256,
        })
    }

    /// [`Body::from_vec`] for a body that arrived in one message: a large one is hashed (and
    /// spilled) in `block_in_place`, so that the other streams on this thread go on meanwhile.
    pub fn from_message(bytes: Vec<u8>, limits: &BodyLimits) -> Result<Body, BodyError> {
        if bytes.len() < OFF_THREAD_BYTES {
            Body::from_vec(bytes, limits)
        } else {
            tokio::task::block_in_place(|| Body::from_vec(bytes, limits))
        }
    }

    /// A reader over the body from its start: its `len` bytes as they were hashed, from
    /// memory or from the descriptor the spilled file was written through.
    pub fn reader(&self) -> std::io::Result<Box<dyn Read + Send + '_>> {
        Ok(match &self.data {
            BodyData::Memory(b) => Box::new(&b[..]),
            BodyData::Spilled(f) => Box::new(std::io::BufReader::with_capacity(
                256 * 1024,
                f.reader(self.len),
            )),
        })
    }
}

/// Removes spilled files left behind by a process that was killed: files with our prefix,
/// this process's own (a directory of root's may hold another uid's), older than `min_age`
/// (a producer restarted in the same pod may be using the younger ones). Symlinks and
/// anything but regular files are left alone.
pub fn remove_leftovers(dir: &Path, min_age: std::time::Duration) -> std::io::Result<usize> {
    let me = rustix::process::geteuid().as_raw();
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(SPILL_PREFIX) {
            continue;
        }
        // Of the entry itself, not of what a symlink points to.
        let meta = entry.metadata()?;
        let age = meta.modified()?.elapsed().unwrap_or_default();
        if meta.file_type().is_file() && meta.uid() == me && age >= min_age {
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(dir: &Path) -> BodyLimits {
        BodyLimits {
            spill_dir: dir.to_path_buf(),
            spill_threshold: 10,
            max: 100,
        }
    }

    #[test]
    fn small_bodies_stay_in_memory_and_large_ones_spill_then_vanish() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = BodyBuffer::new(limits(dir.path()));
        b.push(b"12345").unwrap();
        assert!(!b.spilled());
        b.push(b"67890abc").unwrap();
        assert!(b.spilled());
        let body = b.finish().unwrap();
        assert_eq!(body.len, 13);
        assert_eq!(
            body.sha256,
            <[u8; 32]>::from(Sha256::digest(b"1234567890abc"))
        );
        let mut read = Vec::new();
        body.reader().unwrap().read_to_end(&mut read).unwrap();
        assert_eq!(read, b"1234567890abc");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        drop(body);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn an_abandoned_buffer_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = BodyBuffer::new(limits(dir.path()));
        b.push(&[1; 50]).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        drop(b);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn too_large_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = BodyBuffer::new(limits(dir.path()));
        assert!(matches!(b.push(&[0; 101]), Err(BodyError::TooLarge(100))));
        assert!(Body::from_vec(vec![0; 101], &limits(dir.path())).is_err());
    }

    #[test]
    fn janitor_removes_only_old_spill_files() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join(format!("{SPILL_PREFIX}old"));
        std::fs::write(&old, b"x").unwrap();
        let f = File::options().write(true).open(&old).unwrap();
        f.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(3600))
            .unwrap();
        let young = dir.path().join(format!("{SPILL_PREFIX}young"));
        std::fs::write(&young, b"x").unwrap();
        let other = dir.path().join("someone-elses");
        std::fs::write(&other, b"x").unwrap();
        let removed = remove_leftovers(dir.path(), std::time::Duration::from_secs(60)).unwrap();
        assert_eq!(removed, 1);
        assert!(!old.exists() && young.exists() && other.exists());
    }

    fn as_root() {
        assert_eq!(
            rustix::process::geteuid().as_raw(),
            0,
            "this test gives files to another uid: run it as root (CI does)"
        );
    }

    #[test]
    fn a_spilled_body_is_read_back_from_its_descriptor_not_from_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let body = Body::from_vec(b"the scanned body".to_vec(), &limits(dir.path())).unwrap();
        let BodyData::Spilled(spill) = &body.data else {
            panic!("not spilled")
        };
        let other = dir.path().join("other");
        std::fs::write(&other, b"something else, never scanned").unwrap();
        std::fs::rename(&other, spill.path()).unwrap();
        let mut read = Vec::new();
        body.reader().unwrap().read_to_end(&mut read).unwrap();
        assert_eq!(read, b"the scanned body");
    }

    #[test]
    fn a_body_that_shrank_under_its_descriptor_is_an_error_not_a_shorter_body() {
        let dir = tempfile::tempdir().unwrap();
        let body = Body::from_vec(vec![7; 64], &limits(dir.path())).unwrap();
        let BodyData::Spilled(spill) = &body.data else {
            panic!("not spilled")
        };
        spill.file.set_len(10).unwrap();
        let mut read = Vec::new();
        assert!(body.reader().unwrap().read_to_end(&mut read).is_err());
    }

    #[test]
    fn the_tenant_directory_is_private_and_spilled_files_are_group_readable_only() {
        let scan = tempfile::tempdir().unwrap();
        let dir = tenant_spill_dir(scan.path(), "team-a").unwrap();
        assert_eq!(dir, scan.path().join("team-a"));
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&dir), 0o750);
        let body = Body::from_vec(vec![1; 50], &limits(&dir)).unwrap();
        let BodyData::Spilled(spill) = &body.data else {
            panic!("not spilled")
        };
        assert_eq!(mode(spill.path()), 0o640);
        // A directory of ours that others could enter is narrowed; a second start is fine.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(tenant_spill_dir(scan.path(), "team-a").unwrap(), dir);
        assert_eq!(mode(&dir), 0o750);
        // No tenant: the default tenant's directory.
        assert_eq!(
            tenant_spill_dir(scan.path(), "").unwrap(),
            scan.path().join(DEFAULT_TENANT_DIR)
        );
    }

    #[test]
    fn a_tenant_that_is_not_one_path_component_is_refused() {
        let scan = tempfile::tempdir().unwrap();
        for tenant in ["..", ".", "a/b", "../etc", "a b", &"x".repeat(129)] {
            assert!(
                matches!(
                    tenant_spill_dir(scan.path(), tenant),
                    Err(SpoolError::Tenant(_))
                ),
                "{tenant:?}"
            );
        }
    }

    #[test]
    fn a_symlinked_or_foreign_tenant_directory_is_refused() {
        as_root();
        let scan = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), scan.path().join("team-a")).unwrap();
        assert!(matches!(
            tenant_spill_dir(scan.path(), "team-a"),
            Err(SpoolError::Symlink(_))
        ));
        let foreign = scan.path().join("team-b");
        std::fs::create_dir(&foreign).unwrap();
        std::os::unix::fs::chown(&foreign, Some(4242), Some(4242)).unwrap();
        assert!(matches!(
            tenant_spill_dir(scan.path(), "team-b"),
            Err(SpoolError::ForeignOwner { owner: 4242, .. })
        ));
        std::fs::write(scan.path().join("team-c"), b"x").unwrap();
        assert!(matches!(
            tenant_spill_dir(scan.path(), "team-c"),
            Err(SpoolError::NotADirectory(_))
        ));
    }

    #[test]
    fn the_janitor_leaves_files_of_other_uids_and_symlinks_alone() {
        as_root();
        let dir = tempfile::tempdir().unwrap();
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        let old = |name: &str| {
            let p = dir.path().join(format!("{SPILL_PREFIX}{name}"));
            std::fs::write(&p, b"x").unwrap();
            File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_modified(hour_ago)
                .unwrap();
            p
        };
        let mine = old("mine");
        let theirs = old("theirs");
        std::os::unix::fs::chown(&theirs, Some(4242), Some(4242)).unwrap();
        let target = old("target");
        std::fs::rename(&target, dir.path().join("kept")).unwrap();
        let link = dir.path().join(format!("{SPILL_PREFIX}link"));
        std::os::unix::fs::symlink(dir.path().join("kept"), &link).unwrap();
        let removed = remove_leftovers(dir.path(), std::time::Duration::from_secs(60)).unwrap();
        assert_eq!(removed, 1);
        assert!(!mine.exists() && theirs.exists() && link.symlink_metadata().is_ok());
        assert!(dir.path().join("kept").exists());
    }
}
