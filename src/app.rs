//! Process wiring: open the store, load the flows, build the routes, bind.
//!
//! `App::build(config)` does everything that can fail before the first
//! request and reports the bound address (port 0 in tests). `serve`, the
//! integration tests and the examples all run this same code.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::net::TcpListener;

use crate::clock::unix_now;
use crate::config::{Auth, Config};
use crate::http::{self, AppState, Surface};
use crate::metrics::Metrics;
use crate::outbound::{self, Wake};
use crate::pipeline::{Pipeline, PipelineOptions, SharedFlows};
use crate::reload::{self, Reloader};
use crate::store::{AnyStore, PgConfig, SledStore, Store, StoreConfig};
use crate::telemetry::PhoneLog;

/// A bound, ready-to-run server.
pub struct App {
    listener: TcpListener,
    addr: SocketAddr,
    routes: http::Routes,
    /// The admin listener (`--admin-listen`), its address and routes.
    admin: Option<(TcpListener, SocketAddr, http::Routes)>,
    store: Arc<AnyStore>,
    pipeline: Arc<Pipeline<AnyStore>>,
    reloader: Arc<Reloader>,
    config: Config,
    /// Set once shutdown begins, so `/readyz` answers 503 while in-flight
    /// requests finish.
    shutting_down: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    /// Wakes the outbound sender when something is enqueued.
    outbound_wake: Wake,
    /// The HTTP client flows' calls go through; the call worker uses it
    /// for `after_answer` calls.
    caller: Arc<crate::calls::HttpCaller>,
}

impl App {
    /// Binds the listener, loads and checks the flows and opens the store;
    /// the first failure is the error. Serving starts with [`App::run`].
    pub async fn build(mut config: Config) -> anyhow::Result<App> {
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let addr = listener.local_addr()?;
        let admin_listener = match config.admin_listen {
            Some(admin) => Some(
                TcpListener::bind(admin)
                    .await
                    .with_context(|| format!("binding the admin address {admin}"))?,
            ),
            None => None,
        };
        // Without --public-url the signed URL defaults to the listen
        // address; with port 0 that must be the port actually bound.
        if config.listen.port() == 0 && config.public_url == format!("http://{}", config.listen) {
            config.public_url = format!("http://{addr}");
        }
        if matches!(config.auth, Auth::Insecure) {
            tracing::warn!(
                "INSECURE: webhook signatures are NOT verified; anyone who can reach \
                 this port can drive your bot. Never run like this on a public address"
            );
        }
        // Transcripts required to pass run with the options served, here
        // and on every reload.
        let options = PipelineOptions::from_config(&config);
        let require_tests = config.require_tests.then(|| options.clone());
        let can_send = config.outbound.credentials.is_some();
        let loaded = reload::load_checked(&config.flows_dir, require_tests.as_ref(), can_send)?;
        for w in &loaded.warnings {
            tracing::warn!("{w}");
        }
        let flows: SharedFlows = Arc::new(ArcSwap::from_pointee(loaded.set));
        let metrics = Arc::new(Metrics::default());
        let reloader = Arc::new(Reloader::new(
            config.flows_dir.clone(),
            flows.clone(),
            metrics.clone(),
            require_tests,
            can_send,
        ));

        // The store creates the data directory (private) and says which
        // of a held lock, a permission, a damaged or a truncated database
        // keeps it from opening. PostgreSQL (`--store`) applies its
        // migrations first.
        let store: AnyStore = match &config.store {
            Some(url) => {
                let url = url.expose();
                // The data directory still holds this instance's own
                // files (the log's phone number hash key).
                {
                    use std::os::unix::fs::DirBuilderExt;
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(&config.data_dir)
                        .with_context(|| {
                            format!("creating the data directory {}", config.data_dir.display())
                        })?;
                }
                AnyStore::open_pg(
                    url,
                    &PgConfig {
                        durability: config.durability,
                        ..PgConfig::default()
                    },
                )
                .with_context(|| {
                    format!("opening the store at {}", crate::store::pg::redact_url(url))
                })?
            }
            None => SledStore::open(
                &config.data_dir,
                &StoreConfig {
                    cache_bytes: config.cache_bytes,
                    durability: config.durability,
                    ..StoreConfig::default()
                },
            )
            .context("opening the store")?
            .into(),
        };
        let store = Arc::new(store);
        // Flows' HTTP calls: the real client, limited to `http_allow`.
        let caller = crate::calls::HttpCaller::new(
            crate::calls::Allow::parse(&config.http_allow).map_err(anyhow::Error::msg)?,
        )
        .context("building the HTTP client for flow calls")?;
        let caller = Arc::new(caller);
        let pipeline = Arc::new(
            Pipeline::new(store.clone(), flows.clone(), options, metrics.clone())
                .with_caller(caller.clone()),
        );
        // Whoever enqueues outbox entries wakes the sender with this; the
        // pipeline's timer firings do, after each enqueue is flushed.
        let outbound_wake = Wake::from(pipeline.outbox_waker());

        // What `/status` (and `/healthz`) show: everything in constant
        // time (the conversation count is maintained by the store, never
        // counted here). Only admin-token holders see this detail.
        let status_fn = {
            let reloader = reloader.clone();
            let store = store.clone();
            let data_dir = store.location(&config.data_dir);
            Arc::new(move || {
                let s = reloader.status();
                let health = store.health();
                serde_json::json!({
                    "flows": {
                        "version": s.version,
                        "loaded_at": s.loaded_at,
                        "files": s.files,
                        "last_error": s.last_error,
                        "watching": s.watching,
                        "watching_reason": s.watching_reason,
                    },
                    "conversations": health.conversations,
                    "store": {
                        "backend": store.kind(),
                        "dir": data_dir,
                        "durability": store.durability(),
                        "writable": health.writable,
                        "error": health.error,
                        "failed_since": health.failed_since,
                        "quarantined_records": health.quarantined,
                        "reopens": health.reopens,
                        "fsyncs": health.fsyncs,
                    },
                })
            })
        };
        let phones = PhoneLog::open(config.log_phone_numbers, &config.data_dir)
            .context("preparing the phone number hash of the logs")?;
        let shutting_down = Arc::new(AtomicBool::new(false));
        let state = AppState::new(
            &config,
            pipeline.clone(),
            metrics.clone(),
            status_fn,
            shutting_down.clone(),
            Arc::new(phones),
        );
        let hygiene = http::Hygiene {
            request_timeout: config.request_timeout,
            max_header_bytes: http::MAX_HEADER_BYTES,
            max_body_bytes: config.max_body_bytes,
        };
        let routes = |surface| http::Routes::new(state.clone(), hygiene, surface);
        let (routes, admin) = match admin_listener {
            Some(l) => {
                let admin_addr = l.local_addr()?;
                (
                    routes(Surface::Public),
                    Some((l, admin_addr, routes(Surface::Admin))),
                )
            }
            None => (routes(Surface::All), None),
        };
        Ok(App {
            listener,
            addr,
            routes,
            admin,
            store,
            pipeline,
            reloader,
            config,
            shutting_down,
            metrics,
            outbound_wake,
            caller,
        })
    }

    /// Wakes the outbound sender: call it after enqueueing outbox entries
    /// (the sender also polls once a second).
    pub fn outbound_wake(&self) -> Wake {
        self.outbound_wake.clone()
    }

    /// Start the outbound sender when credentials are set; without them,
    /// say so if messages are waiting.
    fn start_sender(&self) -> anyhow::Result<Option<outbound::SenderHandle>> {
        let waiting = self.store.outbox_depth();
        if self.config.outbound.credentials.is_none() {
            if waiting > 0 {
                tracing::warn!(
                    waiting,
                    "messages wait in the outbox but nothing sends them: {}",
                    outbound::CredentialsError::NotConfigured
                );
            }
            return Ok(None);
        }
        let handle = outbound::spawn(
            self.pipeline.clone(),
            &self.config.outbound,
            format!("{}/twilio/status", self.config.public_url),
            self.metrics.clone(),
            self.outbound_wake.clone(),
        )
        .context("starting the outbound sender")?;
        Ok(Some(handle))
    }

    /// The address the server listens on (with the real port when configured as 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin address (`--admin-listen`), with the real port.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|(_, addr, _)| *addr)
    }

    /// The store the server uses.
    pub fn store(&self) -> &Arc<AnyStore> {
        &self.store
    }

    /// The reloader that keeps the live flow set current.
    pub fn reloader(&self) -> &Arc<Reloader> {
        &self.reloader
    }

    /// Serve until `shutdown` resolves; in-flight requests finish, then the
    /// store is flushed.
    pub async fn run_until<F>(self, shutdown: F) -> anyhow::Result<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        // Readiness turns 503 the moment shutdown begins; the listeners
        // close after the drain delay, so a load balancer polling /readyz
        // stops sending traffic while they still accept.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let drain = self.config.shutdown_drain;
        let trigger = {
            let flag = self.shutting_down.clone();
            tokio::spawn(async move {
                shutdown.await;
                flag.store(true, Ordering::SeqCst);
                crate::service::stopping();
                if !drain.is_zero() {
                    tracing::info!(
                        drain_ms = drain.as_millis() as u64,
                        "draining: /readyz answers 503; listeners close after the drain delay"
                    );
                    tokio::time::sleep(drain).await;
                }
                let _ = stop_tx.send(true);
            })
        };
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|stop| *stop).await;
            }
        };
        tracing::info!(
            addr = %self.addr,
            public_url = %self.config.public_url,
            flows = %self.config.flows_dir.display(),
            data = %self.config.data_dir.display(),
            conversations = self.store.conversation_count(),
            workers = tokio::runtime::Handle::current().metrics().num_workers(),
            "smsflow listening"
        );
        // Kept alive for the life of the server; dropping it stops watching.
        let _watcher = if self.config.watch {
            Some(self.reloader.watch())
        } else {
            self.reloader
                .not_watching("disabled (--no-watch or watch = false); SIGHUP reloads");
            None
        };
        let purger = (self.config.retention_days > 0).then(|| self.spawn_purger());
        let sender = self.start_sender()?;
        // Makes `after_answer` calls from the store's call jobs, including
        // those left pending by a previous run.
        let call_worker = crate::call_jobs::spawn(
            self.store.clone(),
            self.caller.clone(),
            self.metrics.clone(),
            self.pipeline.call_jobs_waker(),
        );
        // Fires the timers that came due while the server was down first,
        // then each one as it comes due. What they say goes to the store's
        // outbox, and the sender is woken after each enqueue.
        let (stop_timers, timers_stopped) = tokio::sync::watch::channel(false);
        let scheduler = tokio::spawn(crate::timers::run(self.pipeline.clone(), timers_stopped));
        let limits = http::ConnectionLimits {
            max_connections: self.config.max_connections,
            header_read_timeout: self.config.header_read_timeout,
            idle_timeout: self.config.idle_timeout,
        };
        let public = http::serve(self.listener, self.routes, limits, stopped());
        let served = match self.admin {
            Some((listener, addr, routes)) => {
                tracing::info!(admin = %addr, "admin endpoints on their own address");
                crate::service::ready();
                let admin = http::serve(listener, routes, limits, stopped());
                let (public, admin) = tokio::join!(public, admin);
                public.and(admin)
            }
            None => {
                crate::service::ready();
                public.await
            }
        }
        .context("serving HTTP");
        trigger.abort();
        if let Some(p) = purger {
            p.abort();
        }
        // Let a batch of firings under way finish, so that the store is
        // flushed below with nothing still using it.
        let _ = stop_timers.send(true);
        if let Err(e) = scheduler.await {
            tracing::error!(error = %e, "the timer scheduler failed");
        }
        if let Some(s) = sender {
            s.stop().await;
        }
        call_worker.stop().await;
        served?;
        self.store
            .flush_blocking()
            .context("flushing the store at shutdown")?;
        tracing::info!("smsflow stopped; store flushed");
        Ok(())
    }

    /// Purge old records in the background, once per `purge_interval`.
    fn spawn_purger(&self) -> tokio::task::JoinHandle<()> {
        let pipeline = self.pipeline.clone();
        let retention = self.config.retention_days as i64 * 86_400;
        let every = self.config.purge_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let p = pipeline.clone();
                let now = unix_now();
                let result = tokio::task::spawn_blocking(move || {
                    p.loop_guard().sweep(now);
                    p.store().purge(now - retention)
                })
                .await;
                match result {
                    Ok(Ok(n)) => tracing::info!(
                        processed = n.processed,
                        statuses = n.statuses,
                        status_events = n.status_events,
                        conversations = n.conversations,
                        call_jobs = n.call_jobs,
                        results = n.results,
                        "purged records older than the retention period"
                    ),
                    Ok(Err(e)) => tracing::error!(error = %e, "purge failed"),
                    Err(e) => tracing::error!(error = %e, "purge task failed"),
                }
            }
        })
    }

    /// Serve until SIGINT or SIGTERM.
    pub async fn run(self) -> anyhow::Result<()> {
        #[cfg(unix)]
        self.reloader
            .reload_on_sighup()
            .context("installing the SIGHUP handler")?;
        self.run_until(shutdown_signal()).await
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM. The handlers are installed
/// when this is called, not when first polled: a SIGTERM that arrives
/// right after `READY=1` (systemd may send one at any time) must stop the
/// server gracefully, not kill it.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    #[cfg(unix)]
    let int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
    async move {
        #[cfg(unix)]
        {
            let recv = |s: Option<tokio::signal::unix::Signal>| async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = recv(term) => {},
                _ = recv(int) => {},
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        tracing::info!("shutdown signal received; finishing in-flight requests");
    }
}
