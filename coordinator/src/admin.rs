//! The admin API and the dashboard, on `[admin] listen` (loopback only).
//!
//! Every `/api/v1` route needs `Authorization: Bearer TOKEN`, a token made by
//! `potluck-coordinator token create`; what each role may do is in
//! [`crate::roles`]. A missing or unknown token gets 401, a token of the wrong
//! role 403, each with a JSON body `{"error": ...}` that says why. Changes are
//! written to the database (audited with the token's name) and the running
//! driver is woken to act on them at once.
//!
//! `GET /` is the dashboard: a static page that asks for a viewer token and
//! reads the same API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::Router;
use axum::extract::{Path as UrlPath, Query, State as AxumState};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use potluck_shared::SiteId;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::config::CoordinatorConfig;
use crate::roles::{Action, Role};
use crate::state::{State, StateError};
use crate::telemetry::Telemetry;

/// What the running coordinator is doing now (the database holds the rest).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Live {
    /// The franchise.
    pub franchise: String,
    /// The current model version.
    pub model_version: u64,
    /// The round in progress.
    pub current_round: Option<u64>,
    /// Its phase (a secure aggregation phase, or `evaluating`).
    pub phase: Option<String>,
    /// Sites connected now.
    pub connected: Vec<String>,
    /// `running`, `stopped` (by an operator), `waiting for window` or `finished`.
    pub training: String,
    /// The daily window, if any, and its time zone.
    pub window: Option<String>,
    /// ε spent by the lineage.
    pub epsilon_spent: Option<f64>,
    /// The budget.
    pub target_epsilon: Option<f64>,
    /// Sites needed for a round.
    pub min_sites: usize,
}

/// What the API handlers share.
#[derive(Debug, Clone)]
pub struct AdminContext {
    /// The coordinator's configuration.
    pub config: Arc<CoordinatorConfig>,
    /// Its metrics.
    pub telemetry: Arc<Telemetry>,
    /// What the driver is doing.
    pub live: Arc<Mutex<Live>>,
    /// Wakes the driver after a change.
    pub poke: Arc<Notify>,
}

/// Bind the admin address; the listener is ready when this returns.
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    crate::telemetry::bind(addr)
}

/// Serve until the task is dropped.
pub async fn serve(listener: std::net::TcpListener, context: AdminContext) {
    let served = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => axum::serve(listener, router(context)).await,
        Err(e) => Err(e),
    };
    if let Err(e) = served {
        tracing::warn!(error = %e, "admin API stopped");
    }
}

/// The routes.
pub fn router(context: AdminContext) -> Router {
    // Every API route checks the token before its path, query or body is
    // parsed (the role is checked by the handler); the page itself is public.
    let token = axum::middleware::from_fn_with_state(context.clone(), require_token);
    Router::new()
        .route("/api/v1/status", get(status))
        .route("/api/v1/rounds", get(rounds))
        .route("/api/v1/sites", get(sites))
        .route("/api/v1/models", get(models))
        .route("/api/v1/fairness", get(fairness))
        .route("/api/v1/metrics", get(metrics))
        .route("/api/v1/activity", get(activity))
        .route("/api/v1/audit", get(audit))
        .route("/api/v1/privacy", get(privacy))
        .route("/api/v1/dpia", get(dpia))
        .route("/api/v1/training/stop", post(stop_training))
        .route("/api/v1/training/start", post(start_training))
        .route("/api/v1/models/{version}/rollback", post(rollback))
        .route("/api/v1/models/{version}/release", post(release))
        .route("/api/v1/sites/{site}/revoke", post(revoke))
        .route_layer(token)
        .route("/", get(dashboard))
        .with_state(context)
}

/// Refuse an API request without a known token, before anything else of it is read.
async fn require_token(
    AxumState(context): AxumState<AdminContext>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match authenticate(&context, request.headers()).await {
        Ok(_) => next.run(request).await,
        Err(denied) => denied,
    }
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (
        status,
        Json(serde_json::json!({ "error": message.to_string() })),
    )
        .into_response()
}

fn state_error(e: StateError) -> Response {
    match e {
        StateError::Refused(message) => error(StatusCode::CONFLICT, message),
        other => {
            tracing::warn!(error = %other, "admin API: state");
            error(StatusCode::INTERNAL_SERVER_ERROR, other)
        }
    }
}

/// The caller's token name and role; else the 401 to send.
async fn authenticate(
    context: &AdminContext,
    headers: &HeaderMap,
) -> Result<(String, Role), Response> {
    let unauthorised = |message: &str| {
        let mut response = error(StatusCode::UNAUTHORIZED, message);
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"potluck-coordinator\""),
        );
        response
    };
    let Some(secret) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|s| s.trim().to_string())
    else {
        return Err(unauthorised(
            "missing bearer token (Authorization: Bearer TOKEN, from `potluck-coordinator token create`)",
        ));
    };
    let found = with_state(context, move |s| s.token(&secret)).await?;
    found.ok_or_else(|| unauthorised("unknown or revoked token"))
}

/// The caller's token name, if its role may do `action`; else the 401 or 403 to send.
async fn authorise(
    context: &AdminContext,
    headers: &HeaderMap,
    action: Action,
) -> Result<String, Response> {
    let (name, role) = authenticate(context, headers).await?;
    if !role.allows(action) {
        let needed = Role::ALL
            .into_iter()
            .filter(|r| r.allows(action))
            .map(Role::as_str)
            .collect::<Vec<_>>()
            .join(" or ");
        return Err(error(
            StatusCode::FORBIDDEN,
            format!("token {name:?} has role {role}; this needs {needed}"),
        ));
    }
    Ok(name)
}

/// Run `work` on the database in a blocking task.
async fn with_state<T: Send + 'static>(
    context: &AdminContext,
    work: impl FnOnce(&mut State) -> Result<T, StateError> + Send + 'static,
) -> Result<T, Response> {
    let dir: PathBuf = context.config.state_dir.clone();
    tokio::task::spawn_blocking(move || State::open_existing(&dir).and_then(|mut s| work(&mut s)))
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e))?
        .map_err(state_error)
}

fn respond<T: Serialize>(result: Result<T, Response>) -> Response {
    match result {
        Ok(value) => Json(value).into_response(),
        Err(response) => response,
    }
}

/// Authorise `action`, then answer with what `work` reads from the database, as JSON.
async fn read<T: Serialize + Send + 'static>(
    context: &AdminContext,
    headers: &HeaderMap,
    action: Action,
    work: impl FnOnce(&mut State) -> Result<T, StateError> + Send + 'static,
) -> Response {
    if let Err(denied) = authorise(context, headers, action).await {
        return denied;
    }
    respond(with_state(context, work).await)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Limit {
    limit: Option<u64>,
}

impl Limit {
    fn get(&self, default: u64) -> u64 {
        self.limit.unwrap_or(default).clamp(1, 10_000)
    }
}

async fn dashboard() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}

/// The status report `potluck-coordinator status` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// What the driver is doing.
    #[serde(flatten)]
    pub live: serde_json::Value,
    /// Completed rounds of the lineage.
    pub rounds_completed: u64,
    /// Sites ever connected.
    pub sites_known: usize,
    /// Sites whose certificate is revoked.
    pub sites_revoked: usize,
}

async fn status(AxumState(context): AxumState<AdminContext>, headers: HeaderMap) -> Response {
    if let Err(denied) = authorise(&context, &headers, Action::View).await {
        return denied;
    }
    let live = context
        .live
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    respond(
        with_state(&context, move |s| {
            let sites = s.sites()?;
            Ok(Status {
                live: serde_json::to_value(live).unwrap_or_default(),
                rounds_completed: s.rounds_completed()?,
                sites_known: sites.len(),
                sites_revoked: sites.iter().filter(|s| s.revoked).count(),
            })
        })
        .await,
    )
}

async fn rounds(
    AxumState(context): AxumState<AdminContext>,
    Query(limit): Query<Limit>,
    headers: HeaderMap,
) -> Response {
    let limit = limit.get(200);
    read(&context, &headers, Action::View, move |s| {
        s.rounds(Some(limit))
    })
    .await
}

async fn sites(AxumState(context): AxumState<AdminContext>, headers: HeaderMap) -> Response {
    read(&context, &headers, Action::View, |s| s.sites()).await
}

async fn models(AxumState(context): AxumState<AdminContext>, headers: HeaderMap) -> Response {
    read(&context, &headers, Action::View, |s| s.models()).await
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ModelQuery {
    model: Option<u64>,
}

/// The latest fairness audit (or `?model=V`'s), with its comparison; `null` if none.
async fn fairness(
    AxumState(context): AxumState<AdminContext>,
    Query(query): Query<ModelQuery>,
    headers: HeaderMap,
) -> Response {
    read(&context, &headers, Action::View, move |s| {
        crate::fairness::view(s, query.model)
    })
    .await
}

async fn metrics(AxumState(context): AxumState<AdminContext>, headers: HeaderMap) -> Response {
    if let Err(denied) = authorise(&context, &headers, Action::View).await {
        return denied;
    }
    (
        [(header::CONTENT_TYPE, crate::telemetry::CONTENT_TYPE)],
        context.telemetry.encode(),
    )
        .into_response()
}

/// What happened, for viewers: each audit entry's position, time and event, without details.
async fn activity(
    AxumState(context): AxumState<AdminContext>,
    Query(limit): Query<Limit>,
    headers: HeaderMap,
) -> Response {
    let limit = limit.get(20);
    read(&context, &headers, Action::View, move |s| {
        Ok(s.audit_tail(limit)?
            .into_iter()
            .map(|e| serde_json::json!({"seq": e.seq, "time": e.time, "event": e.event}))
            .collect::<Vec<_>>())
    })
    .await
}

async fn audit(
    AxumState(context): AxumState<AdminContext>,
    Query(limit): Query<Limit>,
    headers: HeaderMap,
) -> Response {
    let limit = limit.get(100);
    read(&context, &headers, Action::Audit, move |s| {
        let verified = s.verify_audit()?;
        Ok(serde_json::json!({
            "intact": verified.is_ok(),
            "entries": verified.as_ref().ok(),
            "problem": verified.as_ref().err().map(ToString::to_string),
            "tail": s.audit_tail(limit)?,
        }))
    })
    .await
}

async fn privacy(AxumState(context): AxumState<AdminContext>, headers: HeaderMap) -> Response {
    read(&context, &headers, Action::Audit, |s| s.ledger()).await
}

async fn dpia(AxumState(context): AxumState<AdminContext>, headers: HeaderMap) -> Response {
    if let Err(denied) = authorise(&context, &headers, Action::Audit).await {
        return denied;
    }
    let config = context.config.clone();
    let path = "coordinator.toml".to_string();
    match with_state(&context, move |s| {
        crate::dpia::draft(&config, &path, Some(s)).map_err(StateError::Refused)
    })
    .await
    {
        Ok(text) => (
            [(header::CONTENT_TYPE, "text/markdown; charset=utf-8")],
            text,
        )
            .into_response(),
        Err(response) => response,
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Reason {
    reason: String,
}

/// Run an operator's change, then wake the driver.
async fn operate(
    context: &AdminContext,
    headers: &HeaderMap,
    change: impl FnOnce(&mut State, &str) -> Result<serde_json::Value, StateError> + Send + 'static,
) -> Response {
    let name = match authorise(context, headers, Action::Operate).await {
        Ok(name) => name,
        Err(denied) => return denied,
    };
    let by = format!("token:{name}");
    let result = with_state(context, move |s| change(s, &by)).await;
    context.poke.notify_one();
    respond(result)
}

async fn stop_training(
    AxumState(context): AxumState<AdminContext>,
    headers: HeaderMap,
) -> Response {
    set_training(&context, &headers, true).await
}

async fn start_training(
    AxumState(context): AxumState<AdminContext>,
    headers: HeaderMap,
) -> Response {
    set_training(&context, &headers, false).await
}

async fn set_training(context: &AdminContext, headers: &HeaderMap, stopped: bool) -> Response {
    operate(context, headers, move |s, by| {
        s.set_training_stopped(stopped, by)?;
        Ok(serde_json::json!({"training": if stopped { "stopped" } else { "running" }}))
    })
    .await
}

async fn rollback(
    AxumState(context): AxumState<AdminContext>,
    UrlPath(version): UrlPath<u64>,
    headers: HeaderMap,
    body: Option<Json<Reason>>,
) -> Response {
    let reason = body.map(|b| b.0.reason).unwrap_or_default();
    operate(&context, &headers, move |s, by| {
        s.request_rollback(version, by, &reason)?;
        Ok(serde_json::json!({"rollback_to": version, "applied": "after the round in progress"}))
    })
    .await
}

async fn release(
    AxumState(context): AxumState<AdminContext>,
    UrlPath(version): UrlPath<u64>,
    headers: HeaderMap,
    body: Option<Json<Reason>>,
) -> Response {
    let reason = body.map(|b| b.0.reason).unwrap_or_default();
    operate(&context, &headers, move |s, by| {
        s.request_release(version, by, &reason)?;
        Ok(serde_json::json!({"release": version, "applied": "within seconds"}))
    })
    .await
}

async fn revoke(
    AxumState(context): AxumState<AdminContext>,
    UrlPath(site): UrlPath<String>,
    headers: HeaderMap,
    body: Option<Json<Reason>>,
) -> Response {
    let site = match site.parse::<SiteId>() {
        Ok(site) => site,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("site: {e}")),
    };
    let reason = body.map(|b| b.0.reason).unwrap_or_default();
    let pki = context.config.pki_dir();
    operate(&context, &headers, move |s, by| {
        let issued = pki
            .issued_fingerprint(&site)
            .map_err(|e| StateError::Refused(e.to_string()))?;
        let revoked = s.revoke_site(&site, issued, by, &reason)?;
        Ok(serde_json::json!({"site": site, "revoked_certificates": revoked}))
    })
    .await
}
