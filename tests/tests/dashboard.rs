//! The dashboard in headless Chromium (Debian's `chromium`; `.ci/run` installs
//! it), against a live federation: the page renders the rounds, the chart, the
//! privacy budget, the sites and the audit tail from the API with a viewer token.

// Test helpers panic on setup failures, which is what a test should do.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use potluck_coordinator::roles::Role;
use potluck_tests::{Franchise, RunningAgents, RunningCoordinator, init_logging};

fn chromium() -> String {
    let path = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&path).exists(),
        "this test needs headless Chromium at {path} (Debian: apt-get install chromium; \
         .ci/run installs it; or set CHROMIUM)"
    );
    path
}

/// Run headless Chromium on `url` with `extra` flags; returns stdout.
fn headless(url: &str, profile: &Path, extra: &[&str]) -> String {
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1280,1000",
            "--virtual-time-budget=8000",
            &format!("--user-data-dir={}", profile.display()),
        ])
        .args(extra)
        .arg(url)
        .output()
        .expect("chromium runs");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Share of pixels that differ from the page background, and distinct colours.
fn ink(png_path: &Path) -> (f64, usize) {
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(png_path).unwrap(),
    ));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    let pixels: Vec<&[u8]> = buf[..info.buffer_size()]
        .chunks(channels)
        .map(|p| &p[..3])
        .collect();
    let background = [0xf6, 0xf7, 0xf7];
    let inked = pixels
        .iter()
        .filter(|p| **p != background && **p != [0xff, 0xff, 0xff])
        .count();
    let colours: std::collections::HashSet<&[u8]> = pixels.iter().copied().collect();
    (inked as f64 / pixels.len() as f64, colours.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_renders_live_training_in_headless_chromium() -> anyhow::Result<()> {
    init_logging();
    let mut f = Franchise::new(3, 30, 1)?;
    f.coordinator.rounds.max_rounds = None;
    f.coordinator.privacy.planned_rounds = Some(20);
    // Audit every version (cheaply: the sites' 30 customers make every group too small to report).
    f.coordinator.audit = Some(potluck_coordinator::config::AuditSection {
        attributes: [(
            "age_band".to_string(),
            vec!["18-24".to_string(), "65+".to_string()],
        )]
        .into(),
        min_group_size: 20,
        noise_multiplier: 20.0,
        every_rounds: 1,
        delta: 1e-6,
        lineage: "audit".into(),
        gate: Default::default(),
    });
    let coordinator = RunningCoordinator::start(f.coordinator.clone())?;
    let viewer = f.state()?.create_token("wall-screen", Role::Viewer)?;
    let configs = (0..3)
        .map(|i| f.agent_config(i, coordinator.addr))
        .collect::<Result<_, _>>()?;
    let agents = RunningAgents::start(configs)?;
    let state = f.state()?;
    let until = Instant::now() + Duration::from_secs(120);
    while state.rounds_completed()? < 3 {
        assert!(Instant::now() < until, "three rounds within two minutes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Hold training (the coordinator stays up) so that it does not spend its
    // budget and exit while Chromium looks at it.
    f.state()?.set_training_stopped(true, "test")?;

    let url = format!("http://{}/#token={viewer}", coordinator.admin.unwrap());
    let profile = tempfile::tempdir()?;
    let dom = tokio::task::spawn_blocking({
        let (url, profile) = (url.clone(), profile.path().to_path_buf());
        move || headless(&url, &profile, &["--dump-dom"])
    })
    .await?;
    assert!(
        dom.contains(r#"data-ready="true""#),
        "the page loaded its data:\n{dom}"
    );
    assert!(dom.contains("Test Franchise"), "franchise shown");
    for (site, _) in &f.sites {
        let start = dom.find(&format!("<td>{site}</td>"));
        assert!(start.is_some(), "{site} listed");
        // Its own ledger's figures, as the site reported them: spent / left.
        let row = &dom[start.unwrap_or(0)..];
        let row = &row[..row.find("</tr>").unwrap_or(row.len())];
        assert!(row.contains(" / "), "{site}'s own budget shown: {row}");
    }
    for series in [
        "eval_hr_at_10",
        "eval_ndcg_at_10",
        "baseline_popularity_hr_at_10",
    ] {
        assert!(
            dom.contains(&format!(r#"data-series="{series}""#)),
            "{series} plotted"
        );
    }
    assert!(dom.contains("spent of 4"), "the privacy budget is shown");
    assert!(dom.contains("round_completed"), "the audit tail is shown");
    assert!(
        dom.contains("age_band: worst-to-best HR@10") && dom.contains("suppressed"),
        "the latest fairness audit is shown"
    );
    assert!(
        dom.matches(r#"<td class="ok">completed</td>"#).count() >= 3,
        "completed rounds listed"
    );

    // Without a token the page asks for one and shows no data.
    let bare = tokio::task::spawn_blocking({
        let (url, profile) = (
            format!("http://{}/", coordinator.admin.unwrap()),
            tempfile::tempdir()?,
        );
        move || headless(&url, profile.path(), &["--dump-dom"])
    })
    .await?;
    assert!(bare.contains(r#"data-ready="false""#) && !bare.contains("<td>site-"));

    let shot = profile.path().join("dashboard.png");
    tokio::task::spawn_blocking({
        let (url, profile, shot) = (url, tempfile::tempdir()?, shot.clone());
        move || {
            headless(
                &url,
                profile.path(),
                &[&format!("--screenshot={}", shot.display())],
            )
        }
    })
    .await?;
    // Kept for a person to look at, when asked.
    if let Ok(dir) = std::env::var("POTLUCK_SCREENSHOT_DIR") {
        std::fs::copy(&shot, Path::new(&dir).join("dashboard.png"))?;
    }
    let (inked, colours) = ink(&shot);
    println!(
        "dashboard screenshot: {:.1}% inked, {colours} colours",
        100.0 * inked
    );
    assert!(
        inked > 0.08 && colours > 50,
        "the screenshot shows rendered panels, text and lines ({:.1}% inked, {colours} colours)",
        100.0 * inked
    );
    coordinator.stop().await?;
    agents.stop().await?;
    Ok(())
}
