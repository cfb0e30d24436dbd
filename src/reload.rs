//! Hot reload: watch the flows directory, load and validate the whole set
//! with the same code as `smsflow check`, and swap it in atomically.
//!
//! Swap, don't patch: a new [`FlowSet`] is built completely and checked
//! before one pointer store makes it live. Each request takes a single
//! snapshot of that pointer, so it sees the whole old set or the whole new
//! one, never a mix. A set with any error is never served: the old one stays
//! and the errors are logged and shown on `/status`.
//!
//! The directory is watched (not single files) because editors save by
//! writing a temp file and renaming it over the original. Its parent is
//! watched too, for the directory entry itself: deploy tools replace the
//! whole directory (`rm -rf flows && mkdir flows`, `mv flows.new flows`, a
//! symlink swap), which leaves a watch on the old directory seeing nothing,
//! so the watch is moved to whatever the configured path names now. Bursts
//! of events are debounced. SIGHUP triggers the same reload. Knows nothing
//! of HTTP.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::clock::unix_now;
use crate::flow::{self, FlowSet, Loaded};
use crate::metrics::Metrics;
use crate::pipeline::{PipelineOptions, SharedFlows};

/// Quiet period after the last file event before a reload starts.
pub(crate) const DEBOUNCE: Duration = Duration::from_millis(150);

/// How often the watch is checked without any file event: it is moved to a
/// replaced directory that no event announced (the parent itself replaced,
/// an overflowed event queue), and a watch that could not be set up (an
/// inotify limit) is retried. One `stat` each time.
pub(crate) const RECHECK: Duration = Duration::from_secs(2);

/// What a reload attempt did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// A new version is live.
    Swapped {
        /// The version now live.
        version: String,
    },
    /// The files hash to the version already live.
    Unchanged,
    /// The new files have errors; the old set stays live.
    Refused {
        /// The diagnostics that refused the set.
        errors: String,
    },
}

/// What `/healthz` and `/status` report about the active flow set.
#[derive(Debug, Clone, Default)]
pub struct FlowStatus {
    /// The live set's version (a hash of its files).
    pub version: String,
    /// Unix seconds when it went live.
    pub loaded_at: i64,
    /// The files it was loaded from.
    pub files: Vec<String>,
    /// Why the last reload was refused, if it was.
    pub last_error: Option<String>,
    /// Whether edits to the flows directory are being picked up, and why
    /// not when they are not (see [`Reloader::watch`]).
    pub watching: bool,
    /// Why edits are not picked up, when `watching` is false.
    pub watching_reason: Option<String>,
}

impl FlowStatus {
    /// The status of `set`, made live at `loaded_at` (unix seconds), before
    /// anything is known about watching.
    pub fn of(set: &FlowSet, loaded_at: i64) -> FlowStatus {
        FlowStatus {
            version: set.version().to_string(),
            loaded_at,
            files: set
                .files()
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
            last_error: None,
            watching: false,
            watching_reason: None,
        }
    }
}

/// Load and validate the flow set in `dir` and, with `require_tests`, run
/// its `*.chat` transcripts through the pipeline with those (the served)
/// options: the one test a set passes to go live, at startup and on every
/// reload. Without the outbound credentials (`can_send` false), a set with
/// a flow that sends on its own (a `timeout:` that says something, an
/// `on_timeout`) is refused, naming the flow and the missing setting.
pub fn load_checked(
    dir: &Path,
    require_tests: Option<&PipelineOptions>,
    can_send: bool,
) -> anyhow::Result<Loaded> {
    let loaded = flow::load_flows(dir)?;
    if !can_send {
        if let Some((who, what)) = loaded.set.sends_on_its_own() {
            anyhow::bail!(
                "{who} sends messages on its own ({what}), and the outbound \
                 credentials are not set: set TWILIO_ACCOUNT_SID with TWILIO_AUTH_TOKEN \
                 (or TWILIO_API_KEY_SID and TWILIO_API_KEY_SECRET); see \"Sending on our own\" \
                 in README.md"
            );
        }
    }
    if let Some(options) = require_tests {
        crate::author::transcripts_pass(dir, &loaded.set, options)
            .map_err(|e| anyhow::anyhow!("the flows' transcripts fail:\n{e}"))?;
    }
    Ok(loaded)
}

/// Keeps the served flow set current: reloads the flows directory when it
/// changes (or on SIGHUP), swaps a set in only when all of it is valid (and,
/// with `--require-tests`, its transcripts pass), and keeps the
/// [`FlowStatus`] that `/status` reports. One per server; [`Reloader::watch`]
/// starts the file watching, [`Reloader::reload_now`] reloads at once.
pub struct Reloader {
    dir: PathBuf,
    /// The set every request reads; a reload swaps it whole.
    flows: SharedFlows,
    /// What `/status` shows: the live set, the last refusal, the watch.
    status: Mutex<FlowStatus>,
    metrics: Arc<Metrics>,
    /// Also require the set's `*.chat` transcripts to pass before a swap,
    /// run with these (the served) pipeline options.
    require_tests: Option<PipelineOptions>,
    /// Whether the outbound credentials are set: without them a set that
    /// sends on its own is refused ([`load_checked`]).
    can_send: bool,
    /// Serialises reloads: the watcher and SIGHUP may fire together, and two
    /// concurrent loads could otherwise swap in an older read last.
    busy: Mutex<()>,
}

impl Reloader {
    /// A reloader for `dir`, whose set (already loaded with
    /// [`load_checked`]) is live in `flows` as of now. Watches nothing
    /// until [`Reloader::watch`].
    pub(crate) fn new(
        dir: PathBuf,
        flows: SharedFlows,
        metrics: Arc<Metrics>,
        require_tests: Option<PipelineOptions>,
        can_send: bool,
    ) -> Self {
        let status = FlowStatus::of(&flows.load(), unix_now());
        Reloader {
            dir,
            flows,
            status: Mutex::new(status),
            metrics,
            require_tests,
            can_send,
            busy: Mutex::new(()),
        }
    }

    /// Load, validate and (if valid and different) swap in the flow set.
    /// Blocking: file IO and compilation; call from a blocking thread.
    pub fn reload_now(&self) -> ReloadOutcome {
        let _busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        match load_checked(&self.dir, self.require_tests.as_ref(), self.can_send) {
            Ok(loaded) => {
                for w in &loaded.warnings {
                    tracing::warn!("{w}");
                }
                let version = loaded.set.version().to_string();
                if version == self.flows.load().version() {
                    // Still clear a stale error: the files are valid again.
                    if let Ok(mut s) = self.status.lock() {
                        s.last_error = None;
                    }
                    return ReloadOutcome::Unchanged;
                }
                let new_status = FlowStatus::of(&loaded.set, unix_now());
                self.flows.store(Arc::new(loaded.set));
                if let Ok(mut s) = self.status.lock() {
                    // The watch state is the watcher's to report, not the set's.
                    *s = FlowStatus {
                        watching: s.watching,
                        watching_reason: s.watching_reason.take(),
                        ..new_status
                    };
                }
                Metrics::inc(&self.metrics.reloads);
                tracing::info!(version = %version, "flow set reloaded");
                ReloadOutcome::Swapped { version }
            }
            Err(e) => {
                let errors = format!("{e:#}");
                Metrics::inc(&self.metrics.reload_failures);
                tracing::error!(
                    serving = %self.flows.load().version(),
                    errors = %errors,
                    "reload refused; still serving the last good version"
                );
                if let Ok(mut s) = self.status.lock() {
                    s.last_error = Some(errors.clone());
                }
                ReloadOutcome::Refused { errors }
            }
        }
    }

    /// Watch the directory and reload after each debounced burst of changes,
    /// for as long as the returned handle lives.
    ///
    /// Never fails: a watch that cannot be set up (the directory is gone, an
    /// inotify limit) is reported on `/status`, `/metrics` and the log, and
    /// retried every `RECHECK`.
    pub fn watch(self: &Arc<Self>) -> WatchHandle {
        let (tx, mut rx) = mpsc::unbounded_channel::<Trigger>();
        let dir = std::path::absolute(&self.dir).unwrap_or_else(|_| self.dir.clone());
        let mut dir_watch = DirWatch::new(dir, tx);
        // The set App::build loaded is current: arm without reloading.
        let armed = dir_watch.ensure(false);
        self.report(armed.as_ref().map(|_| ()));
        let dir_watch = Arc::new(Mutex::new(dir_watch));
        let this = self.clone();
        let task = tokio::spawn(async move {
            let mut recheck = tokio::time::interval(RECHECK);
            recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            recheck.tick().await;
            loop {
                let trigger = tokio::select! {
                    first = rx.recv() => {
                        let Some(mut trigger) = first else { return };
                        // Debounce: wait until no event has arrived for DEBOUNCE.
                        loop {
                            match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                                Ok(Some(t)) => trigger = trigger.max(t),
                                Ok(None) => return,
                                Err(_) => break,
                            }
                        }
                        trigger
                    }
                    _ = recheck.tick() => Trigger::Recheck,
                };
                let (me, dir_watch) = (this.clone(), dir_watch.clone());
                let _ =
                    tokio::task::spawn_blocking(move || me.after_events(&dir_watch, trigger)).await;
            }
        });
        WatchHandle { task }
    }

    /// Re-arm the watch if the directory was replaced, then reload if
    /// anything may have changed. Blocking.
    fn after_events(&self, dir_watch: &Mutex<DirWatch>, trigger: Trigger) {
        let armed = {
            let mut w = dir_watch.lock().unwrap_or_else(|p| p.into_inner());
            w.ensure(trigger == Trigger::Entry)
        };
        self.report(armed.as_ref().map(|_| ()));
        let reload = match (armed, trigger) {
            (Ok(Armed::New), _) => {
                tracing::info!(
                    dir = %self.dir.display(),
                    "watching the flows directory anew (it was replaced, recreated, or \
                     could not be watched before)"
                );
                true
            }
            (Ok(Armed::Same), Trigger::Recheck) => false,
            (Ok(Armed::Same), _) => true,
            // Nothing to load; the last good set stays live until it is back.
            (Err(NotWatching::Missing(_)), _) => false,
            // Unwatched but present: files may have changed, load them.
            (Err(NotWatching::Failed(_)), Trigger::Recheck) => false,
            (Err(NotWatching::Failed(_)), _) => true,
        };
        if reload {
            self.reload_now();
        }
    }

    /// Say whether edits are picked up: `/status`, the gauge, and a warning
    /// when they stop being.
    fn report(&self, watching: Result<(), &NotWatching>) {
        let reason = watching.err().map(|n| n.to_string());
        self.metrics
            .flows_watching
            .store(u64::from(reason.is_none()), Ordering::Relaxed);
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if s.watching_reason == reason && s.watching == reason.is_none() {
            return;
        }
        // Coming back is logged by the caller, which knows why.
        if let Some(r) = &reason {
            tracing::warn!(
                reason = %r,
                "flow edits are not picked up until the flows directory is watched again \
                 (retried every {RECHECK:?}; SIGHUP reloads)"
            );
        }
        s.watching = reason.is_none();
        s.watching_reason = reason;
    }

    /// What `/status` shows about the flow set now.
    pub fn status(&self) -> FlowStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Record that the directory is deliberately not watched.
    pub(crate) fn not_watching(&self, reason: &str) {
        self.metrics.flows_watching.store(0, Ordering::Relaxed);
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        s.watching = false;
        s.watching_reason = Some(reason.to_string());
    }

    /// Reload on every SIGHUP.
    #[cfg(unix)]
    pub(crate) fn reload_on_sighup(self: &Arc<Self>) -> anyhow::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup())?;
        let this = self.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading flows");
                // systemd's ExecReload waits for READY=1 after RELOADING=1
                // (a refused set is reported, and the old one still serves).
                crate::service::reloading();
                let me = this.clone();
                let _ = tokio::task::spawn_blocking(move || me.reload_now()).await;
                crate::service::ready();
            }
        });
        Ok(())
    }
}

/// Keeps the flows directory watched; dropping it stops watching.
pub struct WatchHandle {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        // The task owns the watcher, which goes with it.
        self.task.abort();
    }
}

/// What woke the watch task, in increasing order of what it has to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Trigger {
    /// The periodic check: re-arm if the directory changed identity.
    Recheck,
    /// Something inside the directory changed: reload.
    Contents,
    /// The directory entry itself was created, removed, renamed or re-linked
    /// (or events were lost): re-arm unconditionally, then reload. A
    /// directory recreated at once may get the old inode number back, so
    /// identity alone cannot tell.
    Entry,
}

/// Why edits are not picked up.
#[derive(Debug)]
enum NotWatching {
    /// The configured path names no directory (between a deploy's
    /// `rm -rf` and `mkdir`, or a mistake).
    Missing(String),
    /// The directory is there but could not be watched.
    Failed(String),
}

impl std::fmt::Display for NotWatching {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotWatching::Missing(s) | NotWatching::Failed(s) => f.write_str(s),
        }
    }
}

/// Whether [`DirWatch::ensure`] moved the watch to another directory.
#[derive(Debug, PartialEq, Eq)]
enum Armed {
    Same,
    New,
}

/// Which directory a path names: device and inode, so a replacement behind
/// the same path (or a re-pointed symlink) is told apart.
type DirId = (u64, u64);

#[cfg(unix)]
fn dir_id(meta: &std::fs::Metadata) -> DirId {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

#[cfg(not(unix))]
fn dir_id(meta: &std::fs::Metadata) -> DirId {
    let created = meta
        .created()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64);
    (0, created)
}

/// The file watches behind hot reload: the flows directory recursively
/// (following a symlink at the configured path), and its parent, not
/// recursively, to see the directory entry itself come and go.
struct DirWatch {
    /// The configured path made absolute, a symlink kept as a symlink:
    /// event paths are compared with it, and re-pointing the link is a
    /// replacement.
    dir: PathBuf,
    /// Created lazily, so that failing to create one is retried too.
    watcher: Option<notify::RecommendedWatcher>,
    /// The directory the recursive watch is on, if any.
    armed: Option<DirId>,
    parent_watched: bool,
    /// Whether a failure to watch the parent was logged already.
    parent_warned: bool,
    events: mpsc::UnboundedSender<Trigger>,
}

impl DirWatch {
    fn new(dir: PathBuf, events: mpsc::UnboundedSender<Trigger>) -> Self {
        DirWatch {
            dir,
            watcher: None,
            armed: None,
            parent_watched: false,
            parent_warned: false,
            events,
        }
    }

    /// Make the recursive watch cover the directory the path names now.
    /// `force` re-arms even when it looks like the same directory.
    fn ensure(&mut self, force: bool) -> Result<Armed, NotWatching> {
        let watcher = match self.watcher.take() {
            Some(w) => w,
            None => new_watcher(self.dir.clone(), self.events.clone())
                .map_err(|e| NotWatching::Failed(format!("cannot start a file watcher: {e}")))?,
        };
        let watcher = self.watcher.insert(watcher);
        if !self.parent_watched {
            if let Some(parent) = self.dir.parent() {
                match watcher.watch(parent, RecursiveMode::NonRecursive) {
                    Ok(()) => self.parent_watched = true,
                    Err(e) if !self.parent_warned => {
                        self.parent_warned = true;
                        tracing::warn!(
                            parent = %parent.display(),
                            error = %e,
                            "cannot watch the flows directory's parent; a replaced flows \
                             directory is noticed within {RECHECK:?} instead of at once"
                        );
                    }
                    Err(_) => {}
                }
            }
        }
        // Identity is read before arming: if the directory is replaced in
        // between, the recorded identity is the old one and the next check
        // re-arms, rather than the other way round.
        let found = std::fs::metadata(&self.dir);
        let id = match &found {
            Ok(meta) if meta.is_dir() => Some(dir_id(meta)),
            _ => None,
        };
        if id.is_some() && self.armed == id && !force {
            return Ok(Armed::Same);
        }
        // The watcher drops a watch itself when the directory is deleted or
        // renamed away; otherwise (a re-pointed symlink) drop it here.
        let moved = self.armed != id;
        let _ = watcher.unwatch(&self.dir);
        self.armed = None;
        let Some(id) = id else {
            let what = if found.is_ok() {
                "is not a directory"
            } else {
                "is missing"
            };
            return Err(NotWatching::Missing(format!(
                "the flows directory {} {what}; the last good flow set stays live \
                 until it is back",
                self.dir.display()
            )));
        };
        watcher
            .watch(&self.dir, RecursiveMode::Recursive)
            .map_err(|e| {
                NotWatching::Failed(format!(
                    "cannot watch the flows directory {}: {e}",
                    self.dir.display()
                ))
            })?;
        self.armed = Some(id);
        Ok(if moved { Armed::New } else { Armed::Same })
    }
}

/// A watcher that sorts events for `dir` (and ignores the parent's other
/// entries) into [`Trigger`]s.
fn new_watcher(
    dir: PathBuf,
    events: mpsc::UnboundedSender<Trigger>,
) -> notify::Result<notify::RecommendedWatcher> {
    notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let trigger = match res {
            Ok(ev) if ev.kind.is_access() => None,
            Ok(ev) if ev.need_rescan() || ev.paths.is_empty() => Some(Trigger::Entry),
            Ok(ev) => classify(&dir, &ev.paths),
            Err(e) => {
                tracing::warn!(error = %e, "flows watcher error");
                Some(Trigger::Entry)
            }
        };
        if let Some(t) = trigger {
            let _ = events.send(t);
        }
    })
}

/// The event is about the directory entry itself, something inside it, or
/// (from the parent's watch) a sibling that does not concern us.
fn classify(dir: &Path, paths: &[PathBuf]) -> Option<Trigger> {
    if paths.iter().any(|p| p == dir) {
        Some(Trigger::Entry)
    } else if paths.iter().any(|p| p.starts_with(dir)) {
        Some(Trigger::Contents)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_sorted_by_what_they_touch() {
        let dir = Path::new("/srv/bot/flows");
        let p = |s: &str| vec![PathBuf::from(s)];
        assert_eq!(classify(dir, &p("/srv/bot/flows")), Some(Trigger::Entry));
        assert_eq!(
            classify(dir, &p("/srv/bot/flows/a.yaml")),
            Some(Trigger::Contents)
        );
        // Siblings seen through the parent's watch.
        assert_eq!(classify(dir, &p("/srv/bot/flows.new")), None);
        assert_eq!(classify(dir, &p("/srv/bot/data")), None);
        // A rename from a staged directory names both ends.
        assert_eq!(
            classify(dir, &[PathBuf::from("/srv/bot/flows.new"), dir.into()]),
            Some(Trigger::Entry)
        );
    }
}
