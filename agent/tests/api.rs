//! The till's recommendations API over real HTTP: personalised, without
//! consent, unknown customer, before any model, bad token, bad `k`.

// Test helpers panic on setup failures, which is what a test should do.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use potluck_agent::api::{self, ApiState};
use potluck_agent::import::{ImportOptions, import_file};
use potluck_agent::store::{SiteStore, StoreHandle};
use potluck_shared::ModelVersion;
use potluck_shared::model::{GlobalModel, Menu, MenuItem, ModelSpec};
use serde_json::Value;

const TOKEN: &str = "till-token-0123456789abcdef";

/// c1 (consenting) had a latte in each of four breakfast orders; c2 never consented.
const ORDERS: &str = "customer_id,order_id,timestamp,item_id,quantity,consent\n\
    c1,o1,2025-03-03T08:10:00Z,latte,1,true\n\
    c1,o2,2025-03-04T08:05:00Z,latte,1,true\n\
    c1,o2,2025-03-04T08:05:00Z,bagel,1,true\n\
    c1,o3,2025-03-05T08:20:00Z,latte,1,true\n\
    c1,o4,2025-03-06T08:15:00Z,latte,1,true\n\
    c2,o5,2025-03-06T12:30:00Z,soup,1,false\n\
    c2,o6,2025-03-07T12:40:00Z,soup,1,false\n";

fn menu() -> Menu {
    let item = |id: &str, name: &str, cat: &str| MenuItem {
        item_id: id.into(),
        name: name.into(),
        category: cat.into(),
    };
    Menu::new(vec![
        item("soup", "Tomato soup", "mains"),
        item("bagel", "Bagel", "bakery"),
        item("latte", "Latte", "drinks"),
        item("tea", "Tea", "drinks"),
        item("cake", "Cake", "bakery"),
        item("salad", "Salad", "mains"),
    ])
    .unwrap()
}

struct Api {
    _dir: tempfile::TempDir,
    _runtime: tokio::runtime::Runtime,
    base: String,
    http: ureq::Agent,
}

/// A site with the orders above, with a global model if `with_model`, serving the API.
fn api(with_model: bool) -> Api {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let csv = dir.path().join("orders.csv");
    std::fs::write(&csv, ORDERS).unwrap();
    {
        let store = SiteStore::open(&path).unwrap();
        import_file(&store, &csv, &menu(), &ImportOptions::default()).unwrap();
        if with_model {
            let spec = ModelSpec::new(menu());
            let params = spec.initial_params(7);
            store
                .save_model(&GlobalModel {
                    version: ModelVersion(3),
                    spec,
                    params,
                })
                .unwrap();
        }
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let listener = runtime
        .block_on(api::bind("127.0.0.1:0".parse().unwrap()))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let state = ApiState::new(
        &StoreHandle::new(path, Duration::from_secs(5)),
        Some(menu()),
        TOKEN,
    );
    runtime.spawn(api::serve(listener, state));
    let http: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    Api {
        _dir: dir,
        _runtime: runtime,
        base: format!("http://{addr}"),
        http,
    }
}

impl Api {
    /// GET `path` with `token`; the status, the WWW-Authenticate header and the JSON body.
    fn get(&self, path: &str, token: Option<&str>) -> (u16, Option<String>, Value) {
        let mut request = self.http.get(format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        let mut response = request.call().unwrap();
        let challenge = response
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_string());
        let body = response.body_mut().read_to_string().unwrap();
        let json = serde_json::from_str(&body).unwrap_or(Value::String(body));
        (response.status().as_u16(), challenge, json)
    }

    fn recommend(&self, customer: &str, query: &str) -> (u16, Value) {
        let (status, _, body) = self.get(
            &format!("/v1/customers/{customer}/recommendations{query}"),
            Some(TOKEN),
        );
        (status, body)
    }
}

fn item_ids(body: &Value) -> Vec<&str> {
    body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["item_id"].as_str().unwrap())
        .collect()
}

#[test]
fn a_consenting_customer_gets_personal_items_with_readable_reasons() {
    let api = api(true);
    let (status, body) = api.recommend("c1", "?k=3&at=2025-03-10T08:30:00Z");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["personalised"], true);
    assert_eq!(body["model_version"], 3);
    assert_eq!(item_ids(&body).len(), 3);
    let top = &body["items"][0];
    assert_eq!(top["item_id"], "latte", "{body}");
    let why = top["explanation"].as_str().unwrap();
    assert_eq!(why, "usually orders Latte at breakfast (4 of 4 orders)");
    assert_eq!(top["factors"][0]["kind"], "history");
    assert_eq!(top["factors"][0]["value"], "latte");
    let scores: Vec<f64> = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["score"].as_f64().unwrap())
        .collect();
    assert!(
        scores.windows(2).all(|w| w[0] >= w[1]) && scores.iter().all(|s| (0.0..=1.0).contains(s)),
        "{scores:?}"
    );
    // The default k is 5.
    let (_, body) = api.recommend("c1", "");
    assert_eq!(item_ids(&body).len(), 5);
}

#[test]
fn customers_without_consent_or_unknown_get_popular_items_flagged() {
    let api = api(true);
    let (status, body) = api.recommend("c2", "?k=2");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["personalised"], false);
    assert_eq!(body["fallback"], "no_profile");
    // Popularity counts consenting customers' orders only: c2's soup is not among them.
    assert_eq!(item_ids(&body), vec!["latte", "bagel"]);
    assert!(
        body["items"][0]["explanation"]
            .as_str()
            .unwrap()
            .contains("not personalised"),
        "{body}"
    );
    // Attack: the till probes whether someone is a customer, and whether
    // they consented. A stranger gets the very same answer.
    let (status, stranger) = api.recommend("someone-else", "?k=2");
    assert_eq!(status, 200);
    assert_eq!(
        stranger, body,
        "an unknown customer is told apart from one without consent"
    );
}

#[test]
fn without_a_model_everyone_gets_popular_items() {
    let api = api(false);
    let (status, body) = api.recommend("c1", "?k=1");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["personalised"], false);
    assert_eq!(body["fallback"], "no_model");
    assert_eq!(item_ids(&body), vec!["latte"]);
    let (status, _, health) = api.get("/v1/health", None);
    assert_eq!((status, &health["model_version"]), (200, &Value::Null));
}

#[test]
fn a_missing_or_wrong_token_is_refused() {
    let api = api(true);
    let path = "/v1/customers/c1/recommendations";
    for token in [None, Some("wrong-token-0123456789"), Some("")] {
        let (status, challenge, body) = api.get(path, token);
        assert_eq!(status, 401, "{token:?}: {body}");
        assert_eq!(challenge.as_deref(), Some("Bearer realm=\"potluck-agent\""));
        assert!(body["error"].as_str().unwrap().contains("bearer token"));
        assert!(body.get("items").is_none());
    }
    // Without the token, a malformed path or query is refused as
    // unauthorised, not parsed first.
    for bad in [
        "/v1/customers/%FF/recommendations",
        "/v1/customers/c1/recommendations?k=five",
    ] {
        let (status, _, body) = api.get(bad, None);
        assert_eq!(status, 401, "{bad}: {body}");
    }
    // Health needs no token and says nothing about customers.
    let (status, _, health) = api.get("/v1/health", None);
    assert_eq!(status, 200);
    assert_eq!(
        health,
        serde_json::json!({"status": "ok", "model_version": 3})
    );
}

#[test]
fn a_bad_k_is_a_400_naming_it() {
    let api = api(true);
    for (query, says) in [
        ("?k=0", "k must be between 1 and 50, got 0"),
        ("?k=51", "k must be between 1 and 50, got 51"),
        ("?k=five", "k must be a whole number, got \"five\""),
        ("?k=-1", "k must be a whole number"),
        ("?count=3", "unknown query parameter \"count\""),
        ("?at=lunchtime", "not RFC 3339"),
    ] {
        let (status, body) = api.recommend("c1", query);
        assert_eq!(status, 400, "{query}: {body}");
        let error = body["error"].as_str().unwrap();
        assert!(error.contains(says), "{query}: {error}");
    }
}
