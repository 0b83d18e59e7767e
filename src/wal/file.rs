//! The seam between the write-ahead log and its file: the five operations
//! the log uses, so tests can fail any of them on demand (see
//! `tests/durability.rs`), and the directory fsync that makes a file's
//! creation or renaming durable.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// What the log does to its file. [`File`] is the real one.
pub trait LogFile: Send + Sync + fmt::Debug {
    /// The whole file, from the start.
    fn read_all(&self) -> io::Result<Vec<u8>>;
    /// Writes all of `buf` at `offset`; on error, any prefix may have been written.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// `fdatasync`.
    fn sync_data(&self) -> io::Result<()>;
    /// `ftruncate`.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// The file's length in bytes.
    fn size(&self) -> io::Result<u64>;
}

impl LogFile for File {
    fn read_all(&self) -> io::Result<Vec<u8>> {
        let mut f = self;
        f.rewind()?;
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes)?;
        Ok(bytes)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}

/// Wraps the opened log file before the log uses it: how tests put a
/// failing file in its place.
#[derive(Clone)]
pub struct WrapFile(pub Arc<dyn Fn(File) -> Box<dyn LogFile> + Send + Sync>);

impl fmt::Debug for WrapFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WrapFile(..)")
    }
}

/// `fsync`s a directory, so a file created, renamed or removed in it stays
/// so after a power loss (a file's own fsync does not cover its name).
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
