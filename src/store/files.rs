//! The store's files on disk: private modes, real fsyncs, the checkpoint.
//!
//! sled's `flush` writes its log with `sync_file_range` only (no metadata,
//! no device cache flush), so it does not survive a power loss on its own.
//! [`DurableFiles::sync`] finishes every grouped flush with an `fdatasync`
//! of sled's data file, and of the large-value files sled keeps in `blobs/`
//! (which sled writes without any sync). Everything here is created
//! private (0700 directories, 0600 files): the data directory holds phone
//! numbers. Knows nothing of the record layout.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub(super) const DIR_MODE: u32 = 0o700;
pub(super) const FILE_MODE: u32 = 0o600;

/// The checkpoint file in the data directory (see [`read_checkpoint`]).
const CHECKPOINT: &str = "checkpoint";

/// Create `dir` (and missing parents) private, and make the new entry
/// durable in its parent. Returns whether it was created.
pub(super) fn create_private_dir(dir: &Path) -> io::Result<bool> {
    if dir.is_dir() {
        return Ok(false);
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent)?;
    }
    Ok(true)
}

/// Take group and other permissions off `dir` and everything in it (one
/// level of subdirectories: sled's `blobs/`, our `quarantine/`). Stores
/// created by earlier versions were world-readable. Returns how many
/// entries changed.
pub(super) fn make_private(dir: &Path) -> io::Result<usize> {
    let mut changed = usize::from(restrict(dir, DIR_MODE)?);
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            changed += usize::from(restrict(&entry.path(), DIR_MODE)?);
            for inner in fs::read_dir(entry.path())? {
                let inner = inner?;
                if inner.file_type()?.is_file() {
                    changed += usize::from(restrict(&inner.path(), FILE_MODE)?);
                }
            }
        } else if kind.is_file() {
            changed += usize::from(restrict(&entry.path(), FILE_MODE)?);
        }
    }
    Ok(changed)
}

/// Clear group/other bits of `path` (keeping the owner's); true if it changed.
fn restrict(path: &Path, mode: u32) -> io::Result<bool> {
    let perms = fs::metadata(path)?.permissions();
    if perms.mode() & 0o077 == 0 {
        return Ok(false);
    }
    fs::set_permissions(path, fs::Permissions::from_mode(perms.mode() & mode))?;
    Ok(true)
}

/// fsync a directory, so the entries created or renamed in it survive a
/// power loss.
pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Open a file for appending, created private.
pub(super) fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(FILE_MODE)
        .open(path)
}

/// Replace `path` with `bytes` atomically and durably: a private temp file,
/// fdatasync, rename, fsync of the directory.
pub(super) fn write_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_data()?;
    fs::rename(&tmp, path)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Whether the filesystem takes writes again: write and fsync a small
/// file, then remove it. Cheaper than reopening the database to find out.
pub(super) fn probe_writable(dir: &Path) -> io::Result<()> {
    let path = dir.join("probe.tmp");
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(FILE_MODE)
            .open(&path)?;
        f.write_all(&[0u8; 64 * 1024])?;
        f.sync_data()
    })();
    let _ = fs::remove_file(&path);
    result
}

/// The last checkpoint written in `dir`, if any: the number of the last
/// flush marker known to be on disk (see `SledStore`'s checkpoints).
pub(super) fn read_checkpoint(dir: &Path) -> io::Result<Option<u64>> {
    let text = match fs::read_to_string(dir.join(CHECKPOINT)) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let seq = text
        .lines()
        .find_map(|l| l.strip_prefix("marker "))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "unreadable checkpoint file {}",
                    dir.join(CHECKPOINT).display()
                ),
            )
        })?;
    Ok(Some(seq))
}

pub(super) fn write_checkpoint(dir: &Path, seq: u64) -> io::Result<()> {
    let text = format!(
        "# smsflow store checkpoint: the database holds at least this flush marker.\n\
         # Delete this file only to accept a database that lost data (see README).\n\
         marker {seq}\n"
    );
    write_durably(&dir.join(CHECKPOINT), text.as_bytes())
}

/// The handles a grouped flush syncs after sled's own flush.
pub(super) struct DurableFiles {
    /// sled's data file (`db`); an fsync on any descriptor of a file
    /// covers all of its data.
    db: File,
    blobs: PathBuf,
    /// Blob files already synced (sled never rewrites one in place).
    synced_blobs: HashSet<OsString>,
    /// `sled::blob_files_written()` when `blobs/` was last looked through
    /// (`None`: never): while it stays the same, no blob file is new.
    blobs_seen: Option<u64>,
}

impl DurableFiles {
    pub(super) fn open(dir: &Path) -> io::Result<Self> {
        Ok(DurableFiles {
            db: File::open(dir.join("db"))?,
            blobs: dir.join("blobs"),
            synced_blobs: HashSet::new(),
            blobs_seen: None,
        })
    }

    /// Make what sled has written durable: new blob files and their
    /// directory entries, then the data file (`fdatasync`). `blobs/` is
    /// looked through only when sled may have begun a blob file since the
    /// last time (the vendored sled counts them): nearly every flush
    /// writes no blob, and listing the directory cost about 1% of the
    /// server's CPU under load.
    pub(super) fn sync(&mut self) -> io::Result<()> {
        let written = sled::blob_files_written();
        if self.blobs_seen != Some(written) {
            self.sync_new_blobs()?;
            self.blobs_seen = Some(written);
        }
        self.db.sync_data()
    }

    /// Sync the blob files not synced yet, and their directory.
    fn sync_new_blobs(&mut self) -> io::Result<()> {
        let mut present = HashSet::new();
        let mut new_blobs = false;
        match fs::read_dir(&self.blobs) {
            Ok(entries) => {
                for entry in entries {
                    let entry = entry?;
                    let name = entry.file_name();
                    if !self.synced_blobs.contains(&name) {
                        // sled removes blobs it no longer needs.
                        let f = match File::open(entry.path()) {
                            Ok(f) => f,
                            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                            Err(e) => return Err(e),
                        };
                        f.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
                        f.sync_data()?;
                        new_blobs = true;
                    }
                    present.insert(name);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if new_blobs {
            sync_dir(&self.blobs)?;
        }
        self.synced_blobs = present;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value too large for sled's log goes to a file of its own in
    /// `blobs/`; the next sync finds it because sled counted it.
    #[test]
    fn a_sync_finds_the_blob_files_sled_began_since_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        db.insert(b"small", b"value").unwrap();
        db.flush().unwrap();
        let mut files = DurableFiles::open(dir.path()).unwrap();
        files.sync().unwrap();
        assert!(files.synced_blobs.is_empty());
        let seen = files.blobs_seen;

        db.insert(b"large", vec![7u8; 4 << 20]).unwrap();
        db.flush().unwrap();
        assert!(sled::blob_files_written() > seen.unwrap());
        files.sync().unwrap();
        assert_eq!(
            files.synced_blobs.len(),
            fs::read_dir(dir.path().join("blobs")).unwrap().count(),
            "every blob file synced"
        );
        assert!(!files.synced_blobs.is_empty());
    }
}
