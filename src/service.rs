//! Running under a service manager: systemd's readiness protocol
//! (`Type=notify`).
//!
//! The server tells systemd `READY=1` once it is bound, its flows are
//! loaded and it serves; `RELOADING=1` (with `MONOTONIC_USEC`, as
//! `Type=notify-reload` requires) when a SIGHUP reload starts and
//! `READY=1` when it is done; `STOPPING=1` when shutdown begins. Each is a
//! datagram to `$NOTIFY_SOCKET`; without that variable, or with it empty
//! (not under systemd, or `Type=simple`), nothing is sent. A failure to notify is logged and
//! never stops the server. Credentials (`LoadCredential=`) are read by
//! [`crate::config::secret`].

use sd_notify::NotifyState;

/// Tell the service manager the server is up and serving.
pub fn ready() {
    send(&[NotifyState::Ready], "READY=1");
}

/// Tell the service manager a reload has begun.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now], "RELOADING=1"),
        Err(e) => tracing::warn!(error = %e, "no monotonic clock for RELOADING=1"),
    }
}

/// Tell the service manager shutdown has begun.
pub fn stopping() {
    send(&[NotifyState::Stopping], "STOPPING=1");
}

fn send(states: &[NotifyState<'_>], what: &str) {
    // Set but empty counts as unset, as it does for libsystemd.
    if std::env::var_os("NOTIFY_SOCKET").is_none_or(|s| s.is_empty()) {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, notification = what, "could not notify the service manager");
    }
}
