//! What both binaries need at their edges: logging and shutdown signals.

/// Log to stderr, filtered by `RUST_LOG` (default `info`), in colour only on a terminal.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr)
        .init();
}

/// Complete on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Telling the service manager how the service is doing (systemd's
/// `sd_notify`: readiness, status line, watchdog, stopping). Every call is a
/// no-op when the process was not started by systemd with `Type=notify`.
pub mod systemd {
    use sd_notify::NotifyState;

    fn send(states: &[NotifyState]) {
        if let Err(e) = sd_notify::notify(states) {
            tracing::warn!(error = %e, "could not notify the service manager");
        }
    }

    /// Start-up is done (configuration, identity and store are loaded).
    pub fn ready(status: &str) {
        send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// A one-line status for `systemctl status`.
    pub fn status(status: &str) {
        send(&[NotifyState::Status(status)]);
    }

    /// The service is shutting down.
    pub fn stopping() {
        send(&[NotifyState::Stopping]);
    }

    /// If systemd asked for a watchdog, ping it at half its interval from the
    /// async runtime, so a stalled runtime gets the service restarted.
    pub fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
        let interval = sd_notify::watchdog_enabled()? / 2;
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                send(&[NotifyState::Watchdog]);
            }
        }))
    }
}
