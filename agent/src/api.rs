//! The local HTTP API the till asks for recommendations.
//!
//! - `GET /v1/health`: the agent is up and its store opens; no token needed,
//!   and it says nothing about customers.
//! - `GET /v1/customers/{id}/recommendations?k=5[&at=RFC3339]`: see
//!   [`crate::recommend`]; needs `Authorization: Bearer TOKEN`.
//!
//! Errors are JSON `{"error": "..."}` with 400 (bad query), 401 (missing or
//! wrong token), 503 (store busy) or 500. The token lives in a file only the
//! service user can read; the API listens on localhost unless configured
//! otherwise. Customer identifiers are never logged.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use potluck_shared::model::Menu;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::recommend::{RecommendError, Request, recommend};
use crate::store::{StoreError, StoreHandle};

/// How long a request waits for the store before answering 503.
pub const STORE_WAIT: Duration = Duration::from_secs(5);
/// Items returned when the request does not say.
pub const DEFAULT_K: usize = 5;

/// Why the API cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The token file could not be read or created.
    #[error("{path}: {reason}")]
    Token {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The address could not be bound.
    #[error("cannot listen on {addr} ([api] listen): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct ApiState {
    store: StoreHandle,
    menu: Option<Menu>,
    token_hash: Arc<[u8; 32]>,
}

impl ApiState {
    /// Serve `store` (opened per request, waiting at most [`STORE_WAIT`]),
    /// with `menu` until a model arrives, to holders of `token`.
    pub fn new(store: &StoreHandle, menu: Option<Menu>, token: &str) -> Self {
        Self {
            store: StoreHandle::new(store.path().to_path_buf(), STORE_WAIT),
            menu,
            token_hash: Arc::new(Sha256::digest(token.as_bytes()).into()),
        }
    }

    /// Whether the request carries the token. Hashes are compared, so the
    /// comparison's time says nothing about the token.
    fn authorised(&self, headers: &HeaderMap) -> bool {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| {
                let hash: [u8; 32] = Sha256::digest(t.trim().as_bytes()).into();
                hash == *self.token_hash
            })
    }
}

/// The API's routes.
pub fn router(state: ApiState) -> Router {
    // The token is checked before anything of the request is parsed, so a
    // bad path or query tells a caller without the token nothing.
    let token = axum::middleware::from_fn_with_state(state.clone(), require_token);
    Router::new()
        .route("/v1/health", get(health))
        .route(
            "/v1/customers/{id}/recommendations",
            get(recommendations).route_layer(token),
        )
        .with_state(state)
}

/// Bind `addr` (port 0 picks one); the listener is ready when this returns.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, ApiError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ApiError::Bind { addr, source })
}

/// Serve until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, state: ApiState) -> std::io::Result<()> {
    axum::serve(listener, router(state)).await
}

/// The bearer token in `path`; a missing file is created with a random token
/// (mode 0600) if `create` is set.
pub fn load_token(path: &Path, create: bool) -> Result<String, ApiError> {
    let error = |reason: String| ApiError::Token {
        path: path.display().to_string(),
        reason,
    };
    match std::fs::read_to_string(path) {
        Ok(text) if text.trim().len() >= 16 => Ok(text.trim().to_string()),
        Ok(_) => Err(error("the API token must be at least 16 characters".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
            let bytes: [u8; 32] = rand::random();
            let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            potluck_shared::tls::write_private(path, &token).map_err(|e| error(e.to_string()))?;
            tracing::info!(file = %path.display(), "created the API token");
            Ok(token)
        }
        Err(e) => Err(error(e.to_string())),
    }
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (
        status,
        Json(serde_json::json!({ "error": message.to_string() })),
    )
        .into_response()
}

async fn health(State(state): State<ApiState>) -> Response {
    let store = state.store.clone();
    let opened = tokio::task::spawn_blocking(move || store.with(|s| s.model())).await;
    match opened {
        Ok(Ok(model)) => Json(serde_json::json!({
            "status": "ok",
            "model_version": model.map(|m| m.version.0),
        }))
        .into_response(),
        Ok(Err(e @ StoreError::InUse { .. })) => error(StatusCode::SERVICE_UNAVAILABLE, e),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// Refuse a request without the bearer token, before its path and query are read.
async fn require_token(
    State(state): State<ApiState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if state.authorised(request.headers()) {
        return next.run(request).await;
    }
    let mut response = error(
        StatusCode::UNAUTHORIZED,
        "missing or wrong bearer token (Authorization: Bearer TOKEN, from the API token file)",
    );
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"potluck-agent\""),
    );
    response
}

async fn recommendations(
    State(state): State<ApiState>,
    UrlPath(customer): UrlPath<String>,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    let (k, at) = match parse_query(&query) {
        Ok(parsed) => parsed,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let ApiState { store, menu, .. } = state;
    let answer = tokio::task::spawn_blocking(move || {
        let store = store.open()?;
        let request = Request {
            customer: &customer,
            k,
            at,
        };
        recommend(&store, menu, &request)
    })
    .await;
    match answer {
        Ok(Ok(recommendations)) => Json(recommendations).into_response(),
        Ok(Err(e @ RecommendError::BadK(_))) => error(StatusCode::BAD_REQUEST, e),
        Ok(Err(e @ RecommendError::Store(StoreError::InUse { .. }))) => {
            error(StatusCode::SERVICE_UNAVAILABLE, e)
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "recommendation failed");
            error(StatusCode::INTERNAL_SERVER_ERROR, e)
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// `k` (default [`DEFAULT_K`]) and `at` from the query; unknown parameters are refused.
fn parse_query(query: &[(String, String)]) -> Result<(usize, Option<OffsetDateTime>), String> {
    let mut k = DEFAULT_K;
    let mut at = None;
    for (name, value) in query {
        match name.as_str() {
            "k" => {
                k = value
                    .parse()
                    .map_err(|_| format!("k must be a whole number, got {value:?}"))?;
            }
            "at" => {
                at = Some(
                    OffsetDateTime::parse(value, &Rfc3339)
                        .map_err(|e| format!("at {value:?} is not RFC 3339: {e}"))?,
                );
            }
            other => return Err(format!("unknown query parameter {other:?} (known: k, at)")),
        }
    }
    Ok((k, at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_checked_with_the_parameter_named() {
        let q = |pairs: &[(&str, &str)]| {
            let owned: Vec<(String, String)> = pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
            parse_query(&owned)
        };
        assert_eq!(q(&[]).unwrap(), (DEFAULT_K, None));
        assert_eq!(q(&[("k", "3")]).unwrap().0, 3);
        assert!(q(&[("k", "three")]).unwrap_err().contains("k must be"));
        assert!(q(&[("at", "noon")]).unwrap_err().contains("RFC 3339"));
        assert!(q(&[("limit", "3")]).unwrap_err().contains("limit"));
    }
}
