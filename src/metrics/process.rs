//! The process's own metrics, under the names every Prometheus client
//! library uses (`process_resident_memory_bytes`,
//! `process_cpu_seconds_total`, `process_open_fds`, `process_max_fds`,
//! `process_start_time_seconds`), read from `/proc/self` at each scrape.
//! Linux only; elsewhere, and for any file that cannot be read, the metric
//! is left out rather than reported wrong.

use std::fmt::Write;

/// Clock ticks per second of `/proc/self/stat`'s times. `USER_HZ` is 100
/// on every Linux architecture Prometheus' own procfs reader supports (it
/// assumes the same).
#[cfg(target_os = "linux")]
const USER_HZ: f64 = 100.0;

/// Append the process metrics that can be read.
pub(super) fn write(out: &mut String) {
    #[cfg(target_os = "linux")]
    for (name, help, kind, value) in linux::read() {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
    #[cfg(not(target_os = "linux"))]
    let _ = out;
}

#[cfg(target_os = "linux")]
mod linux {
    use super::USER_HZ;

    type Metric = (&'static str, &'static str, &'static str, f64);

    pub(super) fn read() -> Vec<Metric> {
        let mut metrics = Vec::new();
        if let Some(kib) = status_kib("VmRSS:") {
            metrics.push((
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                "gauge",
                kib * 1024.0,
            ));
        }
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        // Fields after the command name, which is in parentheses and may
        // itself hold spaces: the state is field 3, so field n is at n - 3.
        let fields: Vec<&str> = stat
            .as_deref()
            .and_then(|s| s.rsplit_once(')'))
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
        if let (Some(utime), Some(stime)) = (field(14), field(15)) {
            metrics.push((
                "process_cpu_seconds_total",
                "Total user and system CPU time spent in seconds.",
                "counter",
                (utime + stime) / USER_HZ,
            ));
        }
        if let (Some(start), Some(boot)) = (field(22), boot_time()) {
            metrics.push((
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                "gauge",
                boot + start / USER_HZ,
            ));
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            metrics.push((
                "process_open_fds",
                "Number of open file descriptors.",
                "gauge",
                dir.count() as f64,
            ));
        }
        if let Some(max) = max_fds() {
            metrics.push((
                "process_max_fds",
                "Maximum number of open file descriptors.",
                "gauge",
                max,
            ));
        }
        metrics
    }

    /// A `kB` line of `/proc/self/status`, in KiB.
    fn status_kib(key: &str) -> Option<f64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with(key))?;
        line[key.len()..].split_whitespace().next()?.parse().ok()
    }

    /// The system's boot time (unix seconds), from `/proc/stat`.
    fn boot_time() -> Option<f64> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let line = stat.lines().find(|l| l.starts_with("btime "))?;
        line["btime ".len()..].trim().parse().ok()
    }

    /// The soft limit on open files, from `/proc/self/limits`.
    fn max_fds() -> Option<f64> {
        let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
        let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
        line["Max open files".len()..]
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    fn reads_this_process() {
        let mut out = String::new();
        super::write(&mut out);
        let value = |name: &str| -> f64 {
            let line = out
                .lines()
                .find(|l| l.starts_with(&format!("{name} ")))
                .unwrap_or_else(|| panic!("no {name} in\n{out}"));
            line[name.len() + 1..].parse().unwrap()
        };
        assert!(
            value("process_resident_memory_bytes") > 1_000_000.0,
            "{out}"
        );
        assert!(value("process_cpu_seconds_total") >= 0.0, "{out}");
        assert!(value("process_open_fds") >= 3.0, "{out}");
        assert!(
            value("process_max_fds") >= value("process_open_fds"),
            "{out}"
        );
        let started = value("process_start_time_seconds");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        // Started in the last day, not in the future (boot time and the
        // tick count are coarse: a few seconds either way).
        assert!(
            started > now - 86_400.0 && started < now + 5.0,
            "{started} {now}"
        );
        assert!(
            out.contains("# TYPE process_cpu_seconds_total counter\n"),
            "{out}"
        );
    }
}
