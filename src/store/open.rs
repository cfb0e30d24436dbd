//! Opening sled: on a thread of its own with a time limit, waiting for a
//! lock this process itself just released, and naming the cause when it
//! fails (a held lock, a permission, damaged or lost data).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::files::DurableFiles;
use super::sled_store::{lock, MARKER_KEY};
use super::{Durability, StoreConfig};

/// Why the store could not be opened. Each cause says what to do about it:
/// a held lock, a permission, a damaged file and lost data need different
/// operators' actions.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "another process holds the lock on {}: is another smsflow using this data directory?",
        path.display()
    )]
    /// The data directory is locked by another process.
    Locked {
        /// The locked database directory.
        path: PathBuf,
    },
    #[error(
        "permission denied on {}: the user running smsflow must be able to read and write \
         the data directory and everything in it",
        path.display()
    )]
    /// The data directory cannot be read or written by this user.
    PermissionDenied {
        /// The path that was refused.
        path: PathBuf,
    },
    #[error(
        "the database in {} is damaged ({detail}): restore the directory from a backup",
        dir.display()
    )]
    /// sled reports the database as corrupt.
    Damaged {
        /// The data directory.
        dir: PathBuf,
        /// sled's description of the damage.
        detail: String,
    },
    #[error(
        "the database in {} lost data that was on disk (it recovered up to flush marker \
         {recovered}, but marker {expected} had been checkpointed): restore the directory \
         from a backup, or, to accept the loss and continue with what was recovered, \
         delete {}/checkpoint",
        dir.display(),
        dir.display()
    )]
    /// The database recovered to an older flush than the checkpoint records.
    LostData {
        /// The data directory.
        dir: PathBuf,
        /// The flush marker the database recovered up to.
        recovered: u64,
        /// The flush marker the checkpoint says was on disk.
        expected: u64,
    },
    #[error(
        "opening the database in {} did not finish within {secs} s (sled's recovery may be \
         looping over a damaged file); restore the directory from a backup",
        dir.display()
    )]
    /// Opening did not finish within the configured time.
    TimedOut {
        /// The data directory.
        dir: PathBuf,
        /// The time allowed, in seconds.
        secs: u64,
    },
    /// The directory holds something this build cannot use.
    #[error("the database in {} cannot be used: {detail}", dir.display())]
    Unsupported {
        /// The data directory.
        dir: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// A file operation on the data directory failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done ("creating", "reading", ...).
        what: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

impl OpenError {
    pub(super) fn io(what: &'static str, path: &Path, source: io::Error) -> Self {
        if source.kind() == io::ErrorKind::PermissionDenied {
            return OpenError::PermissionDenied {
                path: path.to_path_buf(),
            };
        }
        OpenError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }

    pub(super) fn from_sled(dir: &Path, e: sled::Error) -> Self {
        let dir = dir.to_path_buf();
        match e {
            sled::Error::Io(io) if is_lock_error(&io) => OpenError::Locked {
                path: dir.join("db"),
            },
            sled::Error::Io(io) => OpenError::io("opening the database in", &dir, io),
            sled::Error::Corruption { .. } => OpenError::Damaged {
                dir,
                detail: "sled found corrupted data".into(),
            },
            sled::Error::ReportableBug(detail) => OpenError::Damaged {
                dir,
                detail: format!("sled: {detail}"),
            },
            sled::Error::Unsupported(detail) => OpenError::Unsupported { dir, detail },
            other => OpenError::Damaged {
                dir,
                detail: other.to_string(),
            },
        }
    }
}

/// sled reports a held lock as an `Other` error whose text carries the
/// `WouldBlock` from `flock`.
fn is_lock_error(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock || e.to_string().contains("could not acquire lock")
}

/// An open database and the files its flushes sync.
pub(super) struct Open {
    pub(super) db: sled::Db,
    /// Flow result rows (`results.rs`, [`super::results::TREE`]).
    pub(super) results: sled::Tree,
    pub(super) files: Mutex<DurableFiles>,
}

/// How often a slow open logs that it is still working.
const OPEN_PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Open sled in `dir` on a thread of its own, so a recovery that never
/// ends (sled can spin over some damaged files) becomes an error after
/// `config.open_timeout` instead of a hung start; a slow open says so
/// every few seconds.
pub(super) fn open_db(dir: &Path, config: &StoreConfig) -> Result<Open, OpenError> {
    let flush_every = match config.durability {
        Durability::Flush => None,
        Durability::Relaxed => Some(200),
    };
    let sled_config = sled::Config::new()
        .path(dir)
        .cache_capacity(config.cache_bytes)
        .flush_every_ms(flush_every)
        .mode(sled::Mode::HighThroughput);
    let wait_for_lock = recently_closed(dir);
    let (tx, rx) = mpsc::channel();
    thread::Builder::new()
        .name("smsflow-store-open".into())
        .spawn(move || {
            let _ = tx.send(open_sled(&sled_config, wait_for_lock));
        })
        .map_err(|e| OpenError::io("starting a thread to open the database in", dir, e))?;
    let started = Instant::now();
    let db = loop {
        let left = config.open_timeout.saturating_sub(started.elapsed());
        // Past the limit, a result that happens to be ready is not taken:
        // the limit holds however the threads were scheduled.
        if left.is_zero() {
            return Err(OpenError::TimedOut {
                dir: dir.to_path_buf(),
                secs: started.elapsed().as_secs(),
            });
        }
        match rx.recv_timeout(OPEN_PROGRESS_EVERY.min(left)) {
            Ok(result) => break result.map_err(|e| OpenError::from_sled(dir, e))?,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let waited = started.elapsed();
                if waited >= config.open_timeout {
                    return Err(OpenError::TimedOut {
                        dir: dir.to_path_buf(),
                        secs: waited.as_secs(),
                    });
                }
                tracing::warn!(
                    dir = %dir.display(),
                    waited_secs = waited.as_secs(),
                    limit_secs = config.open_timeout.as_secs(),
                    "still opening the store (sled is recovering its log)"
                );
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(OpenError::Damaged {
                    dir: dir.to_path_buf(),
                    detail: "sled panicked while recovering it".into(),
                })
            }
        }
    };
    let results = db
        .open_tree(super::results::TREE)
        .map_err(|e| OpenError::from_sled(dir, e))?;
    let files =
        DurableFiles::open(dir).map_err(|e| OpenError::io("opening", &dir.join("db"), e))?;
    Ok(Open {
        db,
        results,
        files: Mutex::new(files),
    })
}

/// sled's open; when this process has just closed the same directory,
/// wait for the lock sled's threads may still hold for a moment.
pub(super) fn open_sled(config: &sled::Config, wait_for_lock: bool) -> sled::Result<sled::Db> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match config.open() {
            Err(sled::Error::Io(e))
                if wait_for_lock && is_lock_error(&e) && Instant::now() < deadline =>
            {
                thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Directories this process closed a store in, and when: reopening one
/// may find its lock still held by sled's threads finishing their last
/// writes (seconds on a starved machine), which is worth waiting for. A
/// lock held by anything else fails at once.
static RECENTLY_CLOSED: Mutex<Vec<(PathBuf, Instant)>> = Mutex::new(Vec::new());

pub(super) fn closed(dir: &Path) {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mut list = lock(&RECENTLY_CLOSED);
    list.retain(|(d, at)| *d != dir && at.elapsed() < Duration::from_secs(60));
    list.push((dir, Instant::now()));
}

pub(super) fn recently_closed(dir: &Path) -> bool {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    lock(&RECENTLY_CLOSED)
        .iter()
        .any(|(d, at)| *d == dir && at.elapsed() < Duration::from_secs(60))
}

pub(super) fn read_marker(db: &sled::Db) -> sled::Result<u64> {
    Ok(db
        .get(MARKER_KEY)?
        .and_then(|v| v.as_ref().try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0))
}

/// The database must hold at least the marker the checkpoint file names:
/// sled's recovery stops at the first damaged entry of its log and
/// silently drops everything after it, so a database that lost data opens
/// as if nothing happened. The checkpoint is what notices.
pub(super) fn check_marker(
    dir: &Path,
    recovered: u64,
    expected: Option<u64>,
) -> Result<(), OpenError> {
    match expected {
        Some(expected) if recovered < expected => Err(OpenError::LostData {
            dir: dir.to_path_buf(),
            recovered,
            expected,
        }),
        _ => Ok(()),
    }
}
