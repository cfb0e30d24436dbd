//! The accept loop and the life of each connection: our own instead of
//! `axum::serve`, because a public webhook must outlive clients that connect
//! and never finish a request.
//!
//! A connection is always in one of three phases:
//!
//! - **waiting for a request head**, from accept, or from its first byte
//!   after a keep-alive pause: closed once `header_read_timeout` has passed,
//!   however slowly bytes trickle in;
//! - **serving** a request, from its complete head until the response body
//!   is handed to hyper: bounded by the request time limit (the hygiene
//!   layer), never closed from here;
//! - **idle** between keep-alive requests: closed after `idle_timeout`.
//!
//! At most `max_connections` are counted open. When a new connection finds
//! every place taken, the connection that has been waiting or idle the
//! longest is closed to make room, so connections that never complete a
//! request cannot starve real ones. Only when every place is serving a
//! request does the loop stop accepting, and new connections wait in the
//! kernel's accept queue.
//!
//! Shutdown: the listener closes, connections that are not serving close
//! at once, the others finish their request and then close.
//!
//! This module knows hyper and tokio, and nothing of the routes.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::response::Response;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::Routes;

/// Connection limits and timeouts (from [`crate::config::Config`]).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
}

/// hyper's read buffer bounds what one connection can make us hold while
/// its head arrives (hyper answers 431 past it); requests are far smaller,
/// and the hygiene layer already refuses headers over 16 KiB.
const MAX_BUF_BYTES: usize = 64 * 1024;

/// Serve `routes` on `listener` until `shutdown` resolves, then let the
/// requests in flight finish.
pub async fn serve<F>(
    listener: TcpListener,
    routes: Routes,
    limits: ConnectionLimits,
    shutdown: F,
) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let registry = Arc::new(Registry::new(limits.max_connections));
    // Each connection task holds a receiver; `closed()` on the sender
    // resolves when the last of them has finished.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut http = hyper::server::conn::http1::Builder::new();
    // Heads are timed here (hyper's own timer would also cut keep-alive
    // pauses at the header-read timeout).
    http.header_read_timeout(None).max_buf_size(MAX_BUF_BYTES);
    let http = Arc::new(http);
    tokio::pin!(shutdown);
    'accept: loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break 'accept,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Typically out of file descriptors: free one held by an
                // idle connection and retry shortly, rather than spin.
                tracing::warn!(error = %e, "accepting a connection failed");
                registry.evict_oldest_idle();
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Every TwiML answer is one small write; don't let Nagle delay it.
        let _ = stream.set_nodelay(true);
        let conn = Arc::new(Connection::new());
        let id = loop {
            // Room that frees before we wait is not missed: `notify_one`
            // stores a permit when nobody is waiting.
            if let Some(id) = registry.insert(&conn) {
                break id;
            }
            tokio::select! {
                _ = &mut shutdown => break 'accept,
                _ = registry.room.notified() => {}
            }
        };
        let task = ConnectionTask {
            conn,
            id,
            registry: registry.clone(),
            limits,
            stop: stop_rx.clone(),
        };
        tokio::spawn(task.run(stream, routes.clone(), http.clone()));
    }
    drop(listener);
    drop(stop_rx);
    let _ = stop_tx.send(true);
    // Each connection's task reads the flag when woken; it does not poll
    // the channel itself (one lock shared by every connection, taken on
    // every poll of every connection's task).
    registry.wake_all();
    stop_tx.closed().await;
    Ok(())
}

/// Errors that concern one client only; axum's own loop ignores them too.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

/// The connections counted against the limit, for choosing which to close.
struct Registry {
    max: usize,
    inner: Mutex<RegistryInner>,
    /// Woken when a connection closes or finishes a request: the accept
    /// loop, waiting for room, looks again.
    room: Notify,
}

struct RegistryInner {
    next_id: u64,
    open: HashMap<u64, Arc<Connection>>,
}

impl Registry {
    fn new(max: usize) -> Self {
        Registry {
            max: max.max(1),
            inner: Mutex::new(RegistryInner {
                next_id: 0,
                open: HashMap::new(),
            }),
            room: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, RegistryInner> {
        // Nothing panics while holding the lock; if something ever did,
        // the map is still consistent, so keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Count `conn` in, closing the longest-waiting idle connection if the
    /// limit is reached; `None` when every place is serving a request.
    fn insert(&self, conn: &Arc<Connection>) -> Option<u64> {
        let mut inner = self.lock();
        if inner.open.len() >= self.max && !Self::evict_locked(&mut inner) {
            return None;
        }
        let id = inner.next_id;
        inner.next_id += 1;
        inner.open.insert(id, conn.clone());
        Some(id)
    }

    fn remove(&self, id: u64) {
        self.lock().open.remove(&id);
        self.room.notify_one();
    }

    /// Wake every connection's task to look at its state and the stop
    /// flag again.
    fn wake_all(&self) {
        for conn in self.lock().open.values() {
            conn.wake.notify_one();
        }
    }

    fn evict_oldest_idle(&self) -> bool {
        Self::evict_locked(&mut self.lock())
    }

    /// Mark the connection that has been waiting or idle the longest as
    /// evicted and stop counting it. Its task closes it at once; if a
    /// request slipped in meanwhile, that request is still answered and the
    /// connection closes after it (one over the limit, briefly).
    fn evict_locked(inner: &mut RegistryInner) -> bool {
        let victim = inner
            .open
            .iter()
            .filter_map(|(id, c)| c.state().phase.waiting_since().map(|t| (t, *id)))
            .min();
        let Some((_, id)) = victim else {
            return false;
        };
        if let Some(conn) = inner.open.remove(&id) {
            conn.state().evicted = true;
            conn.wake.notify_one();
            tracing::debug!("connection limit reached: closing the longest idle connection");
        }
        true
    }
}

/// One connection's state, shared by its task, its socket wrapper, its
/// service (which marks requests) and the registry (which evicts).
struct Connection {
    state: Mutex<State>,
    /// Tells the connection's task it was evicted or the server is
    /// stopping. Phase changes do not wake it (see `ConnectionTask::run`).
    wake: Notify,
}

struct State {
    phase: Phase,
    evicted: bool,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for a complete request head since this instant.
    Head(Instant),
    /// A request is being served.
    Serving,
    /// Kept alive, waiting for the next request since this instant.
    Idle(Instant),
}

impl Phase {
    fn waiting_since(self) -> Option<Instant> {
        match self {
            Phase::Head(t) | Phase::Idle(t) => Some(t),
            Phase::Serving => None,
        }
    }

    fn deadline(self, limits: &ConnectionLimits) -> Option<Instant> {
        match self {
            Phase::Head(t) => Some(t + limits.header_read_timeout),
            Phase::Idle(t) => Some(t + limits.idle_timeout),
            Phase::Serving => None,
        }
    }
}

impl Connection {
    fn new() -> Self {
        Connection {
            state: Mutex::new(State {
                phase: Phase::Head(Instant::now()),
                evicted: false,
            }),
            wake: Notify::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_phase(&self, phase: Phase) {
        self.state().phase = phase;
    }
}

struct ConnectionTask {
    conn: Arc<Connection>,
    id: u64,
    registry: Arc<Registry>,
    limits: ConnectionLimits,
    stop: watch::Receiver<bool>,
}

impl ConnectionTask {
    async fn run(
        self,
        stream: TcpStream,
        routes: Routes,
        http: Arc<hyper::server::conn::http1::Builder>,
    ) {
        let io = TokioIo::new(TrackedStream {
            inner: stream,
            conn: self.conn.clone(),
        });
        let service = ConnectionService {
            routes,
            conn: self.conn.clone(),
            registry: self.registry.clone(),
        };
        let served = http.serve_connection(io, service);
        tokio::pin!(served);
        // Phase changes (a request's head, its response, its next first
        // byte) do not wake this task: waking it and arming a new timer
        // three times a request cost about 5% of the instructions of a
        // webhook. The timer is armed instead for the current phase's
        // deadline or `check_every` from now, whichever comes first: every
        // phase that begins later ends no sooner than `check_every` after
        // it begins, so no deadline is missed, and an active connection's
        // task wakes once every `check_every`, not per request.
        let check_every = self
            .limits
            .header_read_timeout
            .min(self.limits.idle_timeout)
            .max(Duration::from_millis(1));
        let timer = tokio::time::sleep(check_every);
        tokio::pin!(timer);
        // An eviction or the server stopping wakes us (rarely); armed
        // once, and again after each.
        let conn = &self.conn;
        let woken = conn.wake.notified();
        tokio::pin!(woken);
        // Once asked to finish, hyper closes the connection at once if it
        // is idle or has received nothing, and otherwise after the response
        // to the request under way; the deadlines below still apply.
        let mut finishing = false;
        loop {
            let (phase, evicted_now) = {
                let s = conn.state();
                (s.phase, s.evicted)
            };
            let stopping = *self.stop.borrow();
            if evicted_now && !matches!(phase, Phase::Serving) {
                break;
            }
            if (evicted_now || stopping) && !finishing {
                served.as_mut().graceful_shutdown();
                finishing = true;
            }
            let now = Instant::now();
            let deadline = phase.deadline(&self.limits);
            if deadline.is_some_and(|d| d <= now) {
                tracing::debug!(?phase, "closing a connection past its time limit");
                break;
            }
            // Serving has no deadline here; the request time limit is the
            // hygiene layer's.
            let check = now + check_every;
            timer
                .as_mut()
                .reset(deadline.map_or(check, |d| d.min(check)));
            let mut rearm = false;
            tokio::select! {
                biased;
                result = served.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    break;
                }
                _ = woken.as_mut() => rearm = true,
                _ = timer.as_mut() => {}
            }
            if rearm {
                woken.set(conn.wake.notified());
            }
        }
        self.registry.remove(self.id);
    }
}

/// The socket, noting when the first byte of a new request arrives after a
/// keep-alive pause (that starts the header-read clock).
struct TrackedStream {
    inner: TcpStream,
    conn: Arc<Connection>,
}

impl AsyncRead for TrackedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let mut state = self.conn.state();
            if matches!(state.phase, Phase::Idle(_)) {
                state.phase = Phase::Head(Instant::now());
            }
        }
        polled
    }
}

impl AsyncWrite for TrackedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The routes as hyper's service for one connection, marking the
/// connection as serving from the request head until the response body
/// has been handed over.
#[derive(Clone)]
struct ConnectionService {
    routes: Routes,
    conn: Arc<Connection>,
    registry: Arc<Registry>,
}

impl hyper::service::Service<hyper::Request<Incoming>> for ConnectionService {
    type Response = hyper::Response<TrackedBody>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn call(&self, req: hyper::Request<Incoming>) -> Self::Future {
        self.conn.set_phase(Phase::Serving);
        let serving = ServingGuard {
            conn: self.conn.clone(),
            registry: self.registry.clone(),
        };
        let response = self.routes.respond(req.map(Body::new));
        Box::pin(async move {
            let response: Response = response.await;
            Ok(response.map(|body| TrackedBody {
                inner: body,
                _serving: serving,
            }))
        })
    }
}

/// Dropped when the request is over: the response body is done (or the
/// request was abandoned), so the connection is idle again.
struct ServingGuard {
    conn: Arc<Connection>,
    registry: Arc<Registry>,
}

impl Drop for ServingGuard {
    fn drop(&mut self) {
        self.conn.set_phase(Phase::Idle(Instant::now()));
        self.registry.room.notify_one();
    }
}

/// A response body that keeps its connection marked as serving until hyper
/// has taken all of it.
struct TrackedBody {
    inner: Body,
    _serving: ServingGuard,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
