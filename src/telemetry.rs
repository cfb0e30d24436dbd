//! Logging setup: `tracing` to stderr, filtered by `RUST_LOG`
//! (default `info`, or `warn` for the author tools, whose output already
//! says what happened). Message bodies are logged only at `debug`.

use tracing_subscriber::EnvFilter;

/// Install the global subscriber once; later calls are no-ops.
pub fn init() {
    init_with_default("info");
}

/// [`init`] with another default level when `RUST_LOG` is unset.
pub fn init_with_default(level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
