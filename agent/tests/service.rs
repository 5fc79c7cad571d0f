//! The agent as a system service, as systemd sees it: readiness once its
//! configuration, identity and store are loaded, and a clean stop on SIGTERM.

// Test helpers panic on setup failures, which is what a test should do.
#![allow(clippy::unwrap_used)]

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use potluck_shared::SiteId;
use potluck_shared::bundle;
use potluck_shared::tls::{self, Validity};

/// A site bundle pointed at a coordinator that is not there, its API on `api_port`.
fn bundle(dir: &Path, api_port: u16) -> std::path::PathBuf {
    let (ca, _) = tls::create_ca("Test", &[], Validity::days_from_now(1)).unwrap();
    let site = SiteId::new("site-a").unwrap();
    let creds = tls::issue_site_cert(&ca, &site, Validity::days_from_now(1)).unwrap();
    std::fs::write(dir.join(bundle::CA_CERT), &ca.cert_pem).unwrap();
    std::fs::write(dir.join(bundle::SITE_CERT), &creds.cert_pem).unwrap();
    tls::write_private(&dir.join(bundle::SITE_KEY), &creds.key_pem).unwrap();
    let config = dir.join(bundle::AGENT_CONFIG);
    let toml = bundle::agent_toml(
        &site,
        "127.0.0.1:9".parse().unwrap(),
        tls::COORDINATOR_NAME,
        false,
    );
    let toml = toml.replace("127.0.0.1:8477", &format!("127.0.0.1:{api_port}"));
    std::fs::write(&config, toml).unwrap();
    config
}

/// The agent process, killed if the test fails before it stops it.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn next_message(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .expect("a notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn the_agent_reports_ready_to_systemd_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let api_port = free_port();
    let config = bundle(dir.path(), api_port);
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut agent = Running(
        Command::new(env!("CARGO_BIN_EXE_potluck-agent"))
            .args(["run", "--config"])
            .arg(&config)
            .env("NOTIFY_SOCKET", &socket_path)
            .env("WATCHDOG_USEC", "400000")
            .env_remove("WATCHDOG_PID")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let ready = next_message(&socket);
    assert!(ready.contains("READY=1"), "{ready}");
    assert!(
        ready.contains("STATUS=site site-a, coordinator 127.0.0.1:9"),
        "{ready}"
    );
    // Ready means the till's API already answers, with the coordinator away,
    // and its token was created for the service user only.
    let health = ureq::get(format!("http://127.0.0.1:{api_port}/v1/health"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!(
        health,
        serde_json::json!({"status": "ok", "model_version": null})
    );
    let token = dir.path().join("state/api.token");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&token).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    // The watchdog is fed while the agent runs (here every 0.2 s).
    let start = Instant::now();
    let mut pings = 0;
    while pings < 2 && start.elapsed() < Duration::from_secs(10) {
        if next_message(&socket).contains("WATCHDOG=1") {
            pings += 1;
        }
    }
    assert_eq!(pings, 2, "watchdog pings");

    let status = Command::new("kill")
        .args(["-TERM", &agent.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut stopping = false;
    while !stopping && start.elapsed() < Duration::from_secs(20) {
        stopping = next_message(&socket).contains("STOPPING=1");
    }
    assert!(stopping, "the agent tells systemd it is stopping");
    let exit = agent.0.wait().unwrap();
    assert!(exit.success(), "a clean exit on SIGTERM: {exit}");
}
