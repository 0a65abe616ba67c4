//! Logging set-up: the journal when systemd runs us, stderr otherwise.
//!
//! systemd sets `JOURNAL_STREAM` for a service whose output goes to the journal; then events
//! go to journald with their structured fields (`F_DEVICE=...`, see CRATES.md). Without it, or
//! when journald cannot be reached, a compact line per event goes to stderr. `RUST_LOG`
//! overrides the level (default `info`; `error` for the demo, which prints its own story).

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `quiet` lowers the default level to `warn`.
pub fn init(quiet: bool) {
    let default = if quiet {
        "error,rumqttd=off"
    } else {
        "info,rumqttd=warn"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let registry = tracing_subscriber::registry().with(filter);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journald) = tracing_journald::layer() {
            let _ = registry.with(journald).try_init();
            return;
        }
    }
    let _ = registry
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_writer(std::io::stderr)
                .with_target(false),
        )
        .try_init();
}
