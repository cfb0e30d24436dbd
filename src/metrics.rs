//! Process-wide counters and the Prometheus text exposition for `/metrics`.
//!
//! Hand-rolled on atomics: the set of series is small and fixed, and a
//! metrics crate would cost more than this file. Labels with open-ended
//! values (silence reasons, delivery error codes) live in a mutex-protected
//! map; everything on the hot path is a relaxed atomic add. The process's
//! own metrics (memory, CPU, file descriptors) are read from `/proc/self`
//! when scraped (`metrics/process.rs`). Knows nothing of HTTP or sled.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the request latency histogram buckets.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

mod process;

/// The content type of the Prometheus text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A latency histogram with fixed buckets (0.5 ms to 5 s), updated with
/// relaxed atomic adds.
#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    /// Sum in microseconds, so it fits an integer atomic.
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Count one observation of `d`.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, le) in BUCKETS.iter().enumerate() {
            if secs <= *le {
                self.counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let (sep, braced) = if labels.is_empty() {
            ("", String::new())
        } else {
            (",", format!("{{{labels}}}"))
        };
        for (i, le) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {}",
                self.counts[i].load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{braced} {sum}");
        let _ = writeln!(out, "{name}_count{braced} {count}");
    }

    /// Its HELP and TYPE lines, then its series (no labels).
    pub fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        self.render(out, name, "");
    }
}

/// Which endpoint a latency observation belongs to.
#[derive(Debug, Clone, Copy)]
pub enum Endpoint {
    Sms,
    Status,
}

/// What became of one outbound message (or one attempt at it), the
/// `outcome` label of `smsflow_outbound_total`.
#[derive(Debug, Clone, Copy)]
pub enum Outbound {
    Sent,
    Failed,
    Retried,
    Deferred,
    Skipped,
    Unknown,
}

impl Outbound {
    const ALL: [(Outbound, &'static str); 6] = [
        (Outbound::Sent, "sent"),
        (Outbound::Failed, "failed"),
        (Outbound::Retried, "retried"),
        (Outbound::Deferred, "deferred"),
        (Outbound::Skipped, "skipped"),
        (Outbound::Unknown, "unknown"),
    ];
}

/// A value owned elsewhere (the store's health), rendered with the
/// counters on `/metrics`.
#[derive(Debug, Clone, Copy)]
pub struct Sample<'a> {
    pub name: &'a str,
    pub help: &'a str,
    /// "gauge" or "counter".
    pub kind: &'a str,
    pub value: u64,
}

impl<'a> Sample<'a> {
    pub fn gauge(name: &'a str, help: &'a str, value: u64) -> Self {
        Sample {
            name,
            help,
            kind: "gauge",
            value,
        }
    }

    pub fn counter(name: &'a str, help: &'a str, value: u64) -> Self {
        Sample {
            name,
            help,
            kind: "counter",
            value,
        }
    }

    /// Its HELP and TYPE lines, then its value.
    fn write(&self, out: &mut String) {
        let Sample {
            name,
            help,
            kind,
            value,
        } = self;
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
}

/// All counters exported on `/metrics`.
#[derive(Default)]
pub struct Metrics {
    pub messages_received: AtomicU64,
    pub duplicates: AtomicU64,
    pub replies: AtomicU64,
    pub rejected_signatures: AtomicU64,
    pub bad_requests: AtomicU64,
    pub status_callbacks: AtomicU64,
    pub store_errors: AtomicU64,
    pub script_errors: AtomicU64,
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
    /// Timers that came due and ran (a timeout or a script's wake).
    pub timers_fired: AtomicU64,
    /// Timers dropped because their flow, step or timeout was edited away.
    pub timers_stale: AtomicU64,
    /// A gauge, 1 while flow edits are picked up (see `crate::reload`).
    pub flows_watching: AtomicU64,
    silences: Mutex<BTreeMap<String, u64>>,
    /// Delivery status callbacks by `MessageStatus`.
    delivery_statuses: Labeled,
    /// Delivery status callbacks carrying an `ErrorCode`, by code.
    delivery_errors: Labeled,
    /// Consent changes (`opt_out`, `opt_in`) recorded.
    consent_changes: Labeled,
    sms_latency: Histogram,
    status_latency: Histogram,
    /// `smsflow_outbound_total`, by [`Outbound`] (its declaration order).
    outbound: [AtomicU64; 6],
    send_latency: Histogram,
    /// Flows' HTTP calls by (host, outcome); hosts are written in flow
    /// files, and at most [`MAX_CALL_HOSTS`] are kept apart.
    calls: Mutex<BTreeMap<(String, &'static str), u64>>,
    call_latency: Histogram,
}

/// Hosts beyond this many share the `other` label.
const MAX_CALL_HOSTS: usize = 64;

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn silence(&self, reason: &str) {
        if let Ok(mut m) = self.silences.lock() {
            *m.entry(reason.to_string()).or_default() += 1;
        }
    }

    pub fn outbound(&self, outcome: Outbound) {
        self.outbound[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// One flow HTTP call to `host`: `outcome` is `ok`, `status` (not
    /// 2xx) or `error` (no answer).
    pub fn observe_call(&self, host: &str, outcome: &'static str, d: Duration) {
        self.call_latency.observe(d);
        let mut m = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        let known = m.keys().any(|(h, _)| h == host);
        let hosts = m
            .keys()
            .map(|(h, _)| h.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        let host = if known || hosts < MAX_CALL_HOSTS {
            host.to_owned()
        } else {
            "other".to_owned()
        };
        *m.entry((host, outcome)).or_default() += 1;
    }

    /// One request to Twilio's Messages API, answered or not.
    pub fn observe_send(&self, d: Duration) {
        self.send_latency.observe(d);
    }

    /// Count a delivery status callback: its status, and its error code
    /// if it has one.
    pub fn delivery_status(&self, status: &str, error_code: Option<&str>) {
        self.delivery_statuses.inc(status);
        if let Some(code) = error_code.filter(|c| !c.is_empty()) {
            self.delivery_errors.inc(code);
        }
    }

    /// Count a recorded consent change (`opt_out` or `opt_in`).
    pub fn consent_change(&self, action: &str) {
        self.consent_changes.inc(action);
    }

    pub fn observe(&self, endpoint: Endpoint, d: Duration) {
        match endpoint {
            Endpoint::Sms => self.sms_latency.observe(d),
            Endpoint::Status => self.status_latency.observe(d),
        }
    }

    /// Prometheus text exposition format, version 0.0.4: these counters,
    /// then `samples`.
    pub fn render(&self, samples: &[Sample<'_>]) -> String {
        let mut out = String::with_capacity(8192);
        let name = "smsflow_build_info";
        let _ = writeln!(
            out,
            "# HELP {name} The running smsflow's version; always 1.\n# TYPE {name} gauge\n\
             {name}{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        let counters: [(&str, &str, &AtomicU64); 12] = [
            (
                "smsflow_messages_received_total",
                "Inbound messages accepted (signed and parsed).",
                &self.messages_received,
            ),
            (
                "smsflow_duplicate_messages_total",
                "Inbound webhooks for an already processed MessageSid.",
                &self.duplicates,
            ),
            (
                "smsflow_replies_total",
                "Message elements sent back in TwiML.",
                &self.replies,
            ),
            (
                "smsflow_rejected_signatures_total",
                "Webhooks refused for a missing or bad X-Twilio-Signature.",
                &self.rejected_signatures,
            ),
            (
                "smsflow_bad_requests_total",
                "Webhooks refused as malformed (4xx other than 403).",
                &self.bad_requests,
            ),
            (
                "smsflow_status_callbacks_total",
                "Delivery status callbacks accepted.",
                &self.status_callbacks,
            ),
            (
                "smsflow_store_errors_total",
                "Storage failures while handling a webhook.",
                &self.store_errors,
            ),
            (
                "smsflow_script_errors_total",
                "Rhai script failures that fell back.",
                &self.script_errors,
            ),
            (
                "smsflow_reloads_total",
                "Successful flow set reloads.",
                &self.reloads,
            ),
            (
                "smsflow_reload_failures_total",
                "Flow set reloads refused because of errors.",
                &self.reload_failures,
            ),
            (
                "smsflow_timers_fired_total",
                "Timers (timeouts, script wakes) that came due and ran.",
                &self.timers_fired,
            ),
            (
                "smsflow_timers_stale_total",
                "Timers dropped because flow edits removed their step or timeout.",
                &self.timers_stale,
            ),
        ];
        for (name, help, value) in counters {
            Sample::counter(name, help, value.load(Ordering::Relaxed)).write(&mut out);
        }
        Sample::gauge(
            "smsflow_flows_watching",
            "1 while flow file edits are picked up, 0 when not (see /status).",
            self.flows_watching.load(Ordering::Relaxed),
        )
        .write(&mut out);
        let name = "smsflow_silences_total";
        let _ = writeln!(
            out,
            "# HELP {name} Inbound messages answered with silence, by reason.\n# TYPE {name} counter"
        );
        if let Ok(m) = self.silences.lock() {
            for (reason, n) in m.iter() {
                let _ = writeln!(out, "{name}{{reason=\"{}\"}} {n}", label_escape(reason));
            }
        }
        self.delivery_statuses.write(
            &mut out,
            "smsflow_delivery_statuses_total",
            "Delivery status callbacks, by the status they report.",
            "status",
        );
        self.delivery_errors.write(
            &mut out,
            "smsflow_delivery_errors_total",
            "Delivery status callbacks carrying a Twilio error code, by code.",
            "code",
        );
        self.consent_changes.write(
            &mut out,
            "smsflow_consent_changes_total",
            "Consent changes recorded (STOP, START, error 21610), by action.",
            "action",
        );
        let name = "smsflow_request_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Webhook handling time.\n# TYPE {name} histogram"
        );
        self.sms_latency.render(&mut out, name, "endpoint=\"sms\"");
        self.status_latency
            .render(&mut out, name, "endpoint=\"status\"");
        let name = "smsflow_outbound_total";
        let _ = writeln!(
            out,
            "# HELP {name} Messages we send on our own, by what became of them (retried counts attempts).\n# TYPE {name} counter"
        );
        for (outcome, label) in Outbound::ALL {
            let n = self.outbound[outcome as usize].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}{{outcome=\"{label}\"}} {n}");
        }
        let name = "smsflow_send_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time of one request to Twilio's Messages API.\n# TYPE {name} histogram"
        );
        self.send_latency.render(&mut out, name, "api=\"messages\"");
        let name = "smsflow_flow_calls_total";
        let _ = writeln!(
            out,
            "# HELP {name} HTTP calls made by flows, by host and outcome (ok, status: not 2xx, error: no answer).\n# TYPE {name} counter"
        );
        for ((host, outcome), n) in self.calls.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(
                out,
                "{name}{{host=\"{}\",outcome=\"{outcome}\"}} {n}",
                label_escape(host)
            );
        }
        self.call_latency.write(
            &mut out,
            "smsflow_flow_call_duration_seconds",
            "Time of one HTTP call made by a flow, answered or not.",
        );
        for s in samples {
            s.write(&mut out);
        }
        process::write(&mut out);
        out
    }
}

/// A counter by one label whose values come from outside (Twilio's error
/// codes). Past [`Labeled::MAX_VALUES`] distinct values, new ones are
/// counted as `other`, so no sender of odd values can grow it without
/// bound.
#[derive(Default)]
struct Labeled(Mutex<BTreeMap<String, u64>>);

impl Labeled {
    const MAX_VALUES: usize = 200;

    fn inc(&self, value: &str) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(value) {
            *n += 1;
        } else if m.len() < Self::MAX_VALUES {
            m.insert(value.to_owned(), 1);
        } else {
            *m.entry("other".to_owned()).or_default() += 1;
        }
    }

    fn write(&self, out: &mut String, name: &str, help: &str, label: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for (value, n) in m.iter() {
            let _ = writeln!(out, "{name}{{{label}=\"{}\"}} {n}", label_escape(value));
        }
    }
}

fn label_escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histogram() {
        let m = Metrics::default();
        Metrics::inc(&m.messages_received);
        m.silence("no_match");
        m.observe(Endpoint::Sms, Duration::from_millis(3));
        let text = m.render(&[Sample::gauge("smsflow_store_writable", "Up.", 1)]);
        assert!(text.contains("smsflow_messages_received_total 1\n"));
        assert!(text.contains("smsflow_silences_total{reason=\"no_match\"} 1\n"));
        assert!(text.contains(
            "smsflow_request_duration_seconds_bucket{endpoint=\"sms\",le=\"0.005\"} 1\n"
        ));
        assert!(text.contains(
            "smsflow_request_duration_seconds_bucket{endpoint=\"sms\",le=\"0.0025\"} 0\n"
        ));
        assert!(text.contains("smsflow_request_duration_seconds_count{endpoint=\"sms\"} 1\n"));
        assert!(text.contains("# TYPE smsflow_store_writable gauge\nsmsflow_store_writable 1\n"));
        assert!(text.contains(&format!(
            "smsflow_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        )));
    }

    #[test]
    fn labeled_counters_are_bounded() {
        let m = Metrics::default();
        m.delivery_status("failed", Some("30007"));
        m.delivery_status("delivered", None);
        m.delivery_status("failed", Some("30007"));
        m.consent_change("opt_out");
        for i in 0..300 {
            m.delivery_status("undelivered", Some(&i.to_string()));
        }
        let text = m.render(&[]);
        assert!(text.contains("smsflow_delivery_statuses_total{status=\"failed\"} 2\n"));
        assert!(text.contains("smsflow_delivery_statuses_total{status=\"delivered\"} 1\n"));
        assert!(text.contains("smsflow_delivery_errors_total{code=\"30007\"} 2\n"));
        assert!(text.contains("smsflow_consent_changes_total{action=\"opt_out\"} 1\n"));
        let codes = text
            .lines()
            .filter(|l| l.starts_with("smsflow_delivery_errors_total{"))
            .count();
        assert_eq!(codes, Labeled::MAX_VALUES + 1, "{text}");
        assert!(text.contains("smsflow_delivery_errors_total{code=\"other\"} 101\n"));
    }

    #[test]
    fn an_unlabeled_histogram_renders() {
        let h = Histogram::default();
        h.observe(Duration::from_millis(2));
        let mut out = String::new();
        h.write(&mut out, "x_seconds", "X.");
        assert!(out.contains("# TYPE x_seconds histogram\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"0.0025\"} 1\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 1\n"), "{out}");
        assert!(out.contains("x_seconds_count 1\n"), "{out}");
    }
}
