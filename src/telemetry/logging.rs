//! Log set-up: `tracing` to stderr, text or JSON, level from config unless `RUST_LOG` is set.
//!
//! Colour only on a terminal: a file or journald gets plain text, and `NO_COLOR` (any
//! non-empty value, <https://no-color.org>) turns it off everywhere.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(config: &LogConfig) {
    let mut filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // tokio-modbus warns once per byte it drops while resynchronising a serial frame; the
    // Modbus poller reports each failed request itself (named error, counter), so the
    // crate's own lines stay quiet unless a filter names it.
    let named = std::env::var("RUST_LOG").unwrap_or_else(|_| config.level.clone());
    if !named.contains("tokio_modbus") {
        if let Ok(directive) = "tokio_modbus=error".parse() {
            filter = filter.add_directive(directive);
        }
    }
    let colour = wants_colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    let installed = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    if installed.is_err() {
        tracing::debug!("a log subscriber was already installed; keeping it");
    }
}

/// Colour when stderr is a terminal and `NO_COLOR` is unset or empty.
fn wants_colour(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(std::ffi::OsStr::is_empty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        let set = Some(std::ffi::OsStr::new("1"));
        let empty = Some(std::ffi::OsStr::new(""));
        assert!(wants_colour(true, None));
        assert!(wants_colour(true, empty));
        assert!(!wants_colour(true, set));
        assert!(!wants_colour(false, None));
    }
}
