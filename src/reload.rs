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
//! writing a temp file and renaming it over the original. Bursts of events
//! are debounced. SIGHUP triggers the same reload. Knows nothing of HTTP.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::app::{load_flows, status_of, unix_now, FlowStatus};
use crate::metrics::Metrics;
use crate::pipeline::{PipelineOptions, SharedFlows};

/// Quiet period after the last file event before a reload starts.
pub const DEBOUNCE: Duration = Duration::from_millis(150);

/// What a reload attempt did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// A new version is live.
    Swapped { version: String },
    /// The files hash to the version already live.
    Unchanged,
    /// The new files have errors; the old set stays live.
    Refused { errors: String },
}

pub struct Reloader {
    dir: PathBuf,
    flows: SharedFlows,
    status: Arc<Mutex<FlowStatus>>,
    metrics: Arc<Metrics>,
    /// Also require the set's `*.chat` transcripts to pass before a swap,
    /// run with these (the served) pipeline options.
    require_tests: Option<PipelineOptions>,
    /// Serialises reloads: the watcher and SIGHUP may fire together, and two
    /// concurrent loads could otherwise swap in an older read last.
    busy: Mutex<()>,
}

impl Reloader {
    pub fn new(
        dir: PathBuf,
        flows: SharedFlows,
        status: Arc<Mutex<FlowStatus>>,
        metrics: Arc<Metrics>,
        require_tests: Option<PipelineOptions>,
    ) -> Self {
        Reloader {
            dir,
            flows,
            status,
            metrics,
            require_tests,
            busy: Mutex::new(()),
        }
    }

    /// Load, validate and (if valid and different) swap in the flow set.
    /// Blocking: file IO and compilation; call from a blocking thread.
    pub fn reload_now(&self) -> ReloadOutcome {
        let _busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        let loaded = load_flows(&self.dir).and_then(|loaded| {
            if let Some(options) = &self.require_tests {
                crate::author::transcripts_pass(&self.dir, &loaded.set, options)
                    .map_err(|e| anyhow::anyhow!("transcripts fail:\n{e}"))?;
            }
            Ok(loaded)
        });
        match loaded {
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
                let new_status = status_of(&loaded.set, unix_now());
                self.flows.store(Arc::new(loaded.set));
                if let Ok(mut s) = self.status.lock() {
                    *s = new_status;
                }
                Metrics::inc(&self.metrics.reloads);
                tracing::info!(version = %version, "flow set reloaded");
                ReloadOutcome::Swapped { version }
            }
            Err(e) => {
                let errors = format!("{e:#}");
                Metrics::inc(&self.metrics.reload_failures);
                tracing::error!(
                    "reload refused, still serving version {}: {errors}",
                    self.flows.load().version()
                );
                if let Ok(mut s) = self.status.lock() {
                    s.last_error = Some(errors.clone());
                }
                ReloadOutcome::Refused { errors }
            }
        }
    }

    /// Watch the directory and reload after each debounced burst of changes.
    /// The returned watcher must be kept alive for as long as watching is
    /// wanted.
    pub fn watch(self: &Arc<Self>) -> anyhow::Result<notify::RecommendedWatcher> {
        let (tx, mut rx) = mpsc::unbounded_channel::<()>();
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
                Ok(ev) if ev.kind.is_access() => {}
                Ok(_) => {
                    let _ = tx.send(());
                }
                Err(e) => tracing::warn!(error = %e, "flows watcher error"),
            })?;
        watcher.watch(&self.dir, RecursiveMode::Recursive)?;
        let this = self.clone();
        tokio::spawn(async move {
            while rx.recv().await.is_some() {
                // Debounce: wait until no event has arrived for DEBOUNCE.
                loop {
                    match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                        Ok(Some(())) => continue,
                        Ok(None) => return,
                        Err(_) => break,
                    }
                }
                let me = this.clone();
                let _ = tokio::task::spawn_blocking(move || me.reload_now()).await;
            }
        });
        Ok(watcher)
    }

    /// Reload on every SIGHUP.
    #[cfg(unix)]
    pub fn reload_on_sighup(self: &Arc<Self>) -> anyhow::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup())?;
        let this = self.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading flows");
                let me = this.clone();
                let _ = tokio::task::spawn_blocking(move || me.reload_now()).await;
            }
        });
        Ok(())
    }
}
