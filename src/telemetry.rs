//! Logging setup: `tracing` to stderr, filtered by `RUST_LOG`
//! (default `info`). Message bodies are logged only at `debug`.

use tracing_subscriber::EnvFilter;

/// Install the global subscriber once; later calls are no-ops.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
