//! A franchise built with the real `potluck-coordinator` binary (CA, enrolment,
//! synthetic data), its coordinator run as a child process that a test can
//! kill with SIGKILL, and the sites' agents run in this process.

// Each test crate uses part of this module.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use potluck_agent::Agent;
use potluck_agent::config::AgentConfig;
use potluck_agent::import::{ImportOptions, import_file};
use potluck_agent::store::SiteStore;
use potluck_coordinator::state::State;
use potluck_shared::bundle;
use potluck_shared::model::Menu;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub const BIN: &str = env!("CARGO_BIN_EXE_potluck-coordinator");

/// Run the binary to completion; panics with its output if it fails.
pub fn run(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("the coordinator binary runs");
    assert!(
        out.status.success(),
        "potluck-coordinator {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A `[rounds]` table for quick rounds, `max_rounds` of them.
pub fn quick_rounds(max_rounds: u64) -> String {
    format!(
        "min_sites = 3\nmax_rounds = {max_rounds}\ntrain_timeout_secs = 20\neval_timeout_secs = 10\n\
         retry_delay_secs = 0.2\ncohort_wait_secs = 0.5"
    )
}

/// A UDP port nothing uses right now.
fn free_udp_port() -> u16 {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("a free port");
    socket.local_addr().expect("bound").port()
}

pub struct Franchise {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub sites: Vec<PathBuf>,
}

impl Franchise {
    /// `sites` sites of `customers` customers; `rounds` is the `[rounds]` table's body.
    pub fn new(sites: usize, customers: usize, rounds: &str) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let root = dir.path();
        let p = |name: &str| root.join(name).display().to_string();
        run(&[
            "synth",
            "--out",
            &p("data"),
            "--sites",
            &sites.to_string(),
            "--customers",
            &customers.to_string(),
            "--days",
            "60",
        ]);
        run(&[
            "ca",
            "init",
            "--dir",
            &p("pki"),
            "--franchise",
            "Crash Test",
            "--days",
            "30",
        ]);
        let addr: SocketAddr = format!("127.0.0.1:{}", free_udp_port())
            .parse()
            .expect("addr");
        let template = run(&[
            "config-template",
            "--pki",
            "pki",
            "--listen",
            &addr.to_string(),
        ]);
        let config = replace_table(&template, "rounds", rounds)
            .replace("menu = \"menu.csv\"", "menu = \"data/menu.csv\"")
            .replace("listen = \"127.0.0.1:9477\"", "listen = \"127.0.0.1:0\"")
            .replace("listen = \"127.0.0.1:9478\"", "listen = \"127.0.0.1:0\"")
            .replace("planned_rounds = 20", "planned_rounds = 1000")
            + "\n[model]\nembedding = 8\ncontext = 4\nhidden = 16\n";
        let config_path = root.join("coordinator.toml");
        std::fs::write(&config_path, config).expect("config written");
        let menu = Menu::load(&root.join("data/menu.csv")).expect("menu");
        let mut bundles = Vec::new();
        for i in 1..=sites {
            let site = format!("site-{i:02}");
            let out = root.join("sites").join(&site);
            run(&[
                "enroll",
                "--pki",
                &p("pki"),
                "--site",
                &site,
                "--out",
                &out.display().to_string(),
                "--coordinator",
                &addr.to_string(),
                "--menu",
                &p("data/menu.csv"),
            ]);
            let agent = agent_config(&out);
            let store =
                SiteStore::open(&agent.store_path_created().expect("state dir")).expect("store");
            import_file(
                &store,
                &root.join(format!("data/{site}.csv")),
                &menu,
                &ImportOptions::default(),
            )
            .expect("import");
            bundles.push(out);
        }
        Self {
            dir,
            config: config_path,
            sites: bundles,
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The coordinator's database, once it has started.
    pub fn state(&self) -> Option<State> {
        State::open_existing(&self.state_dir()).ok()
    }

    pub fn log(&self) -> PathBuf {
        self.dir.path().join("coordinator.log")
    }

    /// Start the coordinator binary, appending its output to the log.
    pub fn start(&self) -> Coordinator {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("log file");
        let child = Command::new(BIN)
            .args(["serve", "--config", &self.config.display().to_string()])
            .env("RUST_LOG", "info,potluck_coordinator=debug")
            // An error's message, not a backtrace, in the log's last lines.
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the coordinator starts");
        Coordinator { child }
    }

    /// Start every site's agent in this process.
    pub fn agents(&self) -> Agents {
        let (stop, _) = watch::channel(false);
        let tasks = self
            .sites
            .iter()
            .map(|dir| {
                let agent = Agent::new(agent_config(dir)).expect("agent");
                let mut stopped = stop.subscribe();
                tokio::spawn(agent.run(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                }))
            })
            .collect();
        Agents { tasks, stop }
    }
}

fn agent_config(bundle_dir: &Path) -> AgentConfig {
    let mut config = AgentConfig::load(&bundle_dir.join(bundle::AGENT_CONFIG)).expect("agent.toml");
    config.api.listen = "127.0.0.1:0".parse().expect("addr");
    config
}

/// Replace the body of `[table]` in a TOML text.
fn replace_table(text: &str, table: &str, body: &str) -> String {
    let header = format!("[{table}]\n");
    let start = text.find(&header).expect("table present") + header.len();
    let end = text[start..]
        .find("\n[")
        .map_or(text.len(), |i| start + i + 1);
    format!("{}{}\n{}", &text[..start], body.trim(), &text[end..])
}

/// The coordinator process; killed (SIGKILL) when dropped.
pub struct Coordinator {
    child: Child,
}

impl Coordinator {
    /// SIGKILL, as `kill -9`.
    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL delivered");
        self.child.wait().expect("reaped");
    }

    /// Its resident memory, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// Wait for it to exit by itself (it does after max_rounds).
    pub fn wait(mut self, limit: Duration) -> std::process::ExitStatus {
        let until = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < until,
                "the coordinator did not finish within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Agents {
    tasks: Vec<JoinHandle<Result<(), potluck_agent::AgentError>>>,
    stop: watch::Sender<bool>,
}

impl Agents {
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}

/// Poll `check` every `every` until it returns Some, for at most `limit`.
pub async fn wait_for<T>(
    limit: Duration,
    every: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let until = Instant::now() + limit;
    loop {
        if let Some(found) = check() {
            return found;
        }
        assert!(Instant::now() < until, "condition not met within {limit:?}");
        tokio::time::sleep(every).await;
    }
}

impl Drop for Franchise {
    /// On failure, show the end of the coordinator's log.
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.log()).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("--- last lines of the coordinator's log ---");
            for line in &lines[lines.len().saturating_sub(60)..] {
                eprintln!("{line}");
            }
        }
    }
}
