//! Bodies on their way to a verdict: kept in memory up to the spill threshold, then written
//! to a file in the shared scan directory, hashed as they arrive. A spilled file is removed
//! when its [`SpillFile`] is dropped, on every path: verdict, client abort, timeout, reset.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use virus_scanner_protocol::task::Bytes;

/// Name prefix of every spilled file, for the janitor.
pub const SPILL_PREFIX: &str = "vs-spill-";

/// A body message at least this large is hashed off the thread that serves the streams.
const OFF_THREAD_BYTES: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("body exceeds the limit of {0} bytes")]
    TooLarge(u64),
    #[error("spilling the body to disk failed: {0}")]
    Spill(#[from] std::io::Error),
}

/// A file in the scan directory that is deleted on drop.
#[derive(Debug)]
pub struct SpillFile {
    path: PathBuf,
}

impl SpillFile {
    fn create(dir: &Path) -> std::io::Result<(SpillFile, File)> {
        let path = dir.join(format!("{SPILL_PREFIX}{}", uuid::Uuid::new_v4().simple()));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .open(&path)?;
        Ok((SpillFile { path }, file))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SpillFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::error!(path = %self.path.display(), error = %e, "cannot remove spilled body");
        }
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
    file: Option<(SpillFile, File)>,
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
            let (spill, mut file) = SpillFile::create(&self.limits.spill_dir)?;
            file.write_all(&self.mem)?;
            self.mem = Vec::new();
            self.file = Some((spill, file));
        }
        match &mut self.file {
            Some((_, file)) => file.write_all(chunk)?,
            None => self.mem.extend_from_slice(chunk),
        }
        Ok(())
    }

    pub fn finish(self) -> Result<Body, BodyError> {
        let data = match self.file {
            Some((spill, mut file)) => {
                file.flush()?;
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

    /// A reader over the body from its start.
    pub fn reader(&self) -> std::io::Result<Box<dyn Read + Send + '_>> {
        Ok(match &self.data {
            BodyData::Memory(b) => Box::new(&b[..]),
            BodyData::Spilled(f) => Box::new(std::io::BufReader::with_capacity(
                256 * 1024,
                File::open(f.path())?,
            )),
        })
    }
}

/// Removes spilled files left behind by a process that was killed: files with our prefix
/// older than `min_age` (the scan directory may be shared with other producers, whose
/// files in use are younger than their scan deadline).
pub fn remove_leftovers(dir: &Path, min_age: std::time::Duration) -> std::io::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(SPILL_PREFIX) {
            continue;
        }
        let meta = entry.metadata()?;
        let age = meta.modified()?.elapsed().unwrap_or_default();
        if meta.is_file() && age >= min_age {
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
}
