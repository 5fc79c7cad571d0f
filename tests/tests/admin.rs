//! The coordinator's admin API over HTTP: each role can do exactly what it
//! should; rollbacks and revocations through it take effect and are audited.

// Test helpers panic on setup failures, which is what a test should do.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use potluck_coordinator::roles::Role;
use potluck_coordinator::state::State;
use potluck_shared::tls::Validity;
use potluck_tests::{Franchise, RunningAgents, RunningCoordinator, init_logging};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(120);

/// An HTTP client for one coordinator's admin API.
struct Admin {
    base: String,
    http: ureq::Agent,
}

impl Admin {
    fn new(coordinator: &RunningCoordinator) -> Self {
        Self {
            base: format!("http://{}", coordinator.admin.unwrap()),
            http: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(30)))
                .build()
                .into(),
        }
    }

    fn call(&self, method: &str, path: &str, token: Option<&str>) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut response = match method {
            "GET" => {
                let mut request = self.http.get(&url);
                if let Some(auth) = &auth {
                    request = request.header("Authorization", auth);
                }
                request.call()
            }
            _ => {
                let mut request = self.http.post(&url);
                if let Some(auth) = &auth {
                    request = request.header("Authorization", auth);
                }
                request
                    .header("Content-Type", "application/json")
                    .send(r#"{"reason": "test"}"#)
            }
        }
        .unwrap();
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, body)
    }
}

async fn eventually<T>(mut check: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + LIMIT;
    loop {
        if let Some(found) = check() {
            return found;
        }
        assert!(Instant::now() < until, "condition not met within {LIMIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_can_do_exactly_what_it_should() -> anyhow::Result<()> {
    init_logging();
    let f = Franchise::new(3, 20, 1)?;
    let coordinator = RunningCoordinator::start(f.coordinator.clone())?;
    let admin = Admin::new(&coordinator);
    let mut state = f.state()?;
    let tokens: Vec<(Role, String)> = Role::ALL
        .into_iter()
        .map(|role| (role, state.create_token(role.as_str(), role).unwrap()))
        .collect();
    let site = f.sites[0].0.clone();
    // (method, path, which of viewer, auditor, operator may call it)
    let routes = [
        ("GET", "/api/v1/status".to_string(), [true, true, true]),
        ("GET", "/api/v1/rounds".into(), [true, true, true]),
        ("GET", "/api/v1/sites".into(), [true, true, true]),
        ("GET", "/api/v1/models".into(), [true, true, true]),
        ("GET", "/api/v1/fairness".into(), [true, true, true]),
        ("GET", "/api/v1/metrics".into(), [true, true, true]),
        ("GET", "/api/v1/activity".into(), [true, true, true]),
        ("GET", "/api/v1/audit".into(), [false, true, false]),
        ("GET", "/api/v1/privacy".into(), [false, true, false]),
        ("GET", "/api/v1/dpia".into(), [false, true, false]),
        ("POST", "/api/v1/training/stop".into(), [false, false, true]),
        (
            "POST",
            "/api/v1/training/start".into(),
            [false, false, true],
        ),
        (
            "POST",
            "/api/v1/models/0/rollback".into(),
            [false, false, true],
        ),
        (
            "POST",
            "/api/v1/models/0/release".into(),
            [false, false, true],
        ),
        (
            "POST",
            format!("/api/v1/sites/{site}/revoke"),
            [false, false, true],
        ),
    ];
    for (method, path, allowed) in &routes {
        for ((role, token), allowed) in tokens.iter().zip(allowed) {
            let (status, body) = admin.call(method, path, Some(token));
            let expected = if *allowed { 200 } else { 403 };
            assert_eq!(status, expected, "{role} {method} {path}: {body}");
            if !allowed {
                let message = body["error"].as_str().unwrap();
                assert!(message.contains(&format!("has role {role}")), "{message}");
            }
        }
        let (status, body) = admin.call(method, path, None);
        assert_eq!(status, 401, "no token: {method} {path}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("missing bearer token")
        );
        let (status, _) = admin.call(method, path, Some("potluck_not-a-token"));
        assert_eq!(status, 401, "unknown token: {method} {path}");
    }
    // Without a token, a malformed path or query is refused as
    // unauthorised, before it is parsed.
    for (method, path) in [
        ("POST", "/api/v1/models/not-a-version/rollback"),
        ("GET", "/api/v1/rounds?limit=lots"),
    ] {
        let (status, body) = admin.call(method, path, None);
        assert_eq!(status, 401, "{method} {path}: {body}");
    }
    // The dashboard page itself is public; its data is not.
    let (status, page) = admin.call("GET", "/", None);
    assert_eq!(status, 200);
    assert!(page.as_str().unwrap().contains("Potluck coordinator"));

    // Exactly the operator's changes are audited, under the token's name.
    let entries = state.audit_tail(100)?;
    let changes: Vec<(&str, &Value)> = entries
        .iter()
        .filter(|e| !e.event.starts_with("token_"))
        .map(|e| (e.event.as_str(), &e.details["by"]))
        .collect();
    let by = Value::from("token:operator");
    assert_eq!(
        changes,
        [
            ("training_stopped", &by),
            ("training_started", &by),
            ("rollback_requested", &by),
            ("model_rolled_back", &Value::Null),
            ("release_requested", &by),
            ("model_released", &by),
            ("site_revoked", &by),
        ]
    );
    assert_eq!(state.verify_audit()?, Ok(entries.len() as u64));
    coordinator.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_is_audited_and_the_next_round_trains_from_it() -> anyhow::Result<()> {
    init_logging();
    let mut f = Franchise::new(3, 30, 2)?;
    f.coordinator.privacy.planned_rounds = Some(4);
    f.run_all(LIMIT).await?;
    let state = f.state()?;
    let ops = {
        let mut state = f.state()?;
        // Stopped across the restart: the coordinator comes back without training.
        state.set_training_stopped(true, "test")?;
        state.create_token("ops", Role::Operator)?
    };
    f.coordinator.rounds.max_rounds = Some(4);
    let coordinator = RunningCoordinator::start(f.coordinator.clone())?;
    let admin = Admin::new(&coordinator);
    let configs = (0..3)
        .map(|i| f.agent_config(i, coordinator.addr))
        .collect::<Result<_, _>>()?;
    let agents = RunningAgents::start(configs)?;
    eventually(|| {
        let (_, status) = admin.call("GET", "/api/v1/status", Some(&ops));
        (status["training"] == "stopped" && status["connected"].as_array()?.len() == 3)
            .then_some(())
    })
    .await;
    // Longer than the cohort wait: nothing opens while stopped.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, status) = admin.call("GET", "/api/v1/status", Some(&ops));
    assert!(status["current_round"].is_null(), "{status}");
    let before = status["model_version"].as_u64().unwrap();
    assert_eq!(before, 2);
    let completed = state.rounds_completed()?;

    let (code, body) = admin.call("POST", "/api/v1/models/1/rollback", Some(&ops));
    assert_eq!(code, 200, "{body}");
    let rolled = eventually(|| {
        let last = state.models().ok()?.pop()?;
        (last.rolled_back_from == Some(1)).then_some(last)
    })
    .await;
    assert_eq!(rolled.version, before + 1, "a new version");
    assert_eq!(
        state.model(rolled.version)?.unwrap().params,
        state.model(1)?.unwrap().params,
        "it carries version 1's parameters"
    );
    assert_eq!(
        state.rounds_completed()?,
        completed,
        "nothing trained while stopped"
    );
    assert_eq!(
        admin.call("POST", "/api/v1/training/start", Some(&ops)).0,
        200
    );
    let summary = coordinator.finish(LIMIT).await?;
    agents.stop().await?;
    assert!(summary.rounds_completed >= 1);

    let after: Vec<_> = state
        .rounds(None)?
        .into_iter()
        .filter(|r| r.base_version >= rolled.version)
        .collect();
    assert_eq!(
        after[0].base_version, rolled.version,
        "the next round trained from the rolled-back version"
    );
    assert_eq!(after[0].model_version, Some(rolled.version + 1));

    // The coordinator has exited; its audit log is in the database.
    assert!(state.verify_audit()?.is_ok());
    let events: Vec<(String, Value)> = state
        .audit_tail(1000)?
        .into_iter()
        .map(|e| (e.event, e.details))
        .collect();
    let find = |event: &str| {
        events
            .iter()
            .find(|(e, _)| e == event)
            .map(|(_, d)| d.clone())
            .unwrap_or_else(|| panic!("no {event} in {events:?}"))
    };
    let requested = find("rollback_requested");
    assert_eq!(requested["to"], 1);
    assert_eq!(requested["by"], "token:ops");
    let applied = find("model_rolled_back");
    assert_eq!(applied["from"], 1);
    assert_eq!(applied["new_version"], rolled.version);
    assert_eq!(find("training_started")["by"], "token:ops");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_site_is_refused_until_it_is_re_enrolled() -> anyhow::Result<()> {
    init_logging();
    let mut f = Franchise::new(4, 30, 1)?;
    f.coordinator.rounds.min_sites = 3;
    // The privacy budget is planned for both runs' rounds.
    f.coordinator.privacy.planned_rounds = Some(2);
    let (revoked_site, bundle) = f.sites[3].clone();
    {
        let mut state = State::open(f.state_dir())?;
        let issued = f.pki.issued_fingerprint(&revoked_site)?;
        state.revoke_site(&revoked_site, issued, "test", "till stolen")?;
    }
    f.run_all(LIMIT).await?;
    assert_eq!(f.metrics()?[0]["participants"], 3);
    let state = f.state()?;
    let known: Vec<String> = state.sites()?.into_iter().map(|s| s.site).collect();
    assert!(
        !known.contains(&revoked_site.to_string()),
        "the revoked site never got past the handshake: {known:?}"
    );

    // Re-enrolment issues a new certificate, which is admitted.
    f.pki.enroll(&potluck_coordinator::pki::Enrollment {
        site: revoked_site.clone(),
        out: bundle,
        coordinator: "127.0.0.1:9".parse()?,
        menu: None,
        validity: Validity::days_from_now(30),
        force: true,
    })?;
    f.coordinator.rounds.max_rounds = Some(2);
    let summary = f.run_all(LIMIT).await?;
    let metrics = f.metrics()?;
    assert_eq!(metrics.len(), 2, "{summary:?} {metrics:?}");
    assert_eq!(metrics[1]["participants"], 4);
    let site = state
        .sites()?
        .into_iter()
        .find(|s| s.site == revoked_site.as_str())
        .expect("the re-enrolled site connected");
    assert!(!site.revoked);
    assert_eq!(site.rounds_joined, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_round_opens_outside_the_schedule_window() -> anyhow::Result<()> {
    init_logging();
    let mut f = Franchise::new(3, 20, 1)?;
    // A one-hour window that starts two hours from now.
    let now = time::OffsetDateTime::now_utc();
    let at = |hours: i64| {
        let t = now + time::Duration::hours(hours);
        format!("{:02}:{:02}", t.hour(), t.minute())
    };
    f.coordinator.schedule.window = Some(format!("{}-{}", at(2), at(3)));
    let coordinator = RunningCoordinator::start(f.coordinator.clone())?;
    let admin = Admin::new(&coordinator);
    let viewer = f.state()?.create_token("v", Role::Viewer)?;
    let configs = (0..3)
        .map(|i| f.agent_config(i, coordinator.addr))
        .collect::<Result<_, _>>()?;
    let agents = RunningAgents::start(configs)?;
    eventually(|| {
        let (_, status) = admin.call("GET", "/api/v1/status", Some(&viewer));
        (status["connected"].as_array()?.len() == 3).then_some(())
    })
    .await;
    // Longer than the cohort wait: with every site connected, nothing opens.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, status) = admin.call("GET", "/api/v1/status", Some(&viewer));
    assert_eq!(status["training"], "waiting for window", "{status}");
    assert!(status["current_round"].is_null());
    assert_eq!(f.state()?.rounds(None)?.len(), 0);
    coordinator.stop().await?;
    agents.stop().await?;
    Ok(())
}
