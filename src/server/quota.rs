//! Tenant quotas over HTTP, in the shape LMCache's newer coordinator uses:
//!
//! - `PUT /quota/{cache_salt}` with `{"limit_gb": <number>, "tier": "l1"}` sets a salt's limit
//!   (`tier` defaults to `l1`; `l2` and `l3` are refused: not enforced yet);
//! - `GET /quota/{cache_salt}`: its limit (its own, or the default for every salt) and usage;
//! - `DELETE /quota/{cache_salt}`: back to the default;
//! - `GET /quota`: every limit, the default, and the salts using the most of L1.
//!
//! `_default` names the empty salt. The routes sit behind the HTTP port's access rules like
//! every admin route (a loopback Host, or the bearer token). Enforcement: `store::quota`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::store::quota::{gb_to_bytes, salt_from_path, QuotaTier, DEFAULT_SALT_NAME};
use crate::windows::Windows;

/// Salts listed by `GET /quota` (the rest are summed as "other").
const TOP_SALTS: usize = 20;

pub fn routes() -> Router<Arc<Windows>> {
    Router::new()
        .route("/quota", get(list))
        .route("/quota/{cache_salt}", get(show).put(set).delete(remove))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetQuota {
    limit_gb: f64,
    #[serde(default = "l1")]
    tier: QuotaTier,
}

fn l1() -> QuotaTier {
    QuotaTier::L1
}

fn refuse(status: StatusCode, detail: String) -> Response {
    (status, Json(json!({ "detail": detail }))).into_response()
}

/// The salt a path names, checked as a request's salt would be (why not, if not).
fn salt(name: &str) -> Result<&str, String> {
    let salt = salt_from_path(name);
    connector_protocol::validate_cache_salt(salt).map_err(|e| e.to_string())?;
    Ok(salt)
}

fn used(w: &Windows, salt: &str) -> u64 {
    w.cwm
        .tiers
        .salt_usage()
        .into_iter()
        .find(|(s, _)| &**s == salt)
        .map_or(0, |(_, b)| b)
}

async fn set(
    State(w): State<Arc<Windows>>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let salt = match salt(&name) {
        Ok(s) => s.to_string(),
        Err(why) => return refuse(StatusCode::BAD_REQUEST, why),
    };
    let req: SetQuota = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return refuse(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("invalid body: {e}"),
            )
        }
    };
    if req.tier != QuotaTier::L1 {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!(
                "tier {:?}: quotas on the durable tiers are not enforced yet; only \"l1\"",
                req.tier
            ),
        );
    }
    let Some(bytes) = gb_to_bytes(req.limit_gb) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!("limit_gb {}: want a number >= 0", req.limit_gb),
        );
    };
    w.cwm.tiers.quotas().set(&salt, bytes);
    tracing::info!(cache_salt = %salt, limit_bytes = bytes, "L1 quota set");
    Json(w.cwm.tiers.quotas().entry(&salt)).into_response()
}

async fn show(State(w): State<Arc<Windows>>, Path(name): Path<String>) -> Response {
    let salt = match salt(&name) {
        Ok(s) => s,
        Err(why) => return refuse(StatusCode::BAD_REQUEST, why),
    };
    let shown = if salt.is_empty() {
        DEFAULT_SALT_NAME
    } else {
        salt
    };
    Json(json!({
        "cache_salt": shown,
        "quota": w.cwm.tiers.quotas().entry(salt),
        "usage": {"l1_bytes": used(&w, salt)},
    }))
    .into_response()
}

async fn remove(State(w): State<Arc<Windows>>, Path(name): Path<String>) -> Response {
    let salt = match salt(&name) {
        Ok(s) => s,
        Err(why) => return refuse(StatusCode::BAD_REQUEST, why),
    };
    if w.cwm.tiers.quotas().remove(salt) {
        tracing::info!(cache_salt = %salt, "L1 quota removed");
        Json(json!({"deleted": true, "quota": w.cwm.tiers.quotas().entry(salt)})).into_response()
    } else {
        refuse(
            StatusCode::NOT_FOUND,
            format!("cache_salt {name:?} has no quota of its own"),
        )
    }
}

async fn list(State(w): State<Arc<Windows>>) -> Response {
    let usage = w.cwm.tiers.salt_usage();
    let other: u64 = usage.iter().skip(TOP_SALTS).map(|(_, b)| b).sum();
    let top: Vec<_> = usage
        .iter()
        .take(TOP_SALTS)
        .map(|(s, b)| {
            let name = if s.is_empty() { DEFAULT_SALT_NAME } else { s };
            json!({"cache_salt": name, "l1_bytes": b})
        })
        .collect();
    Json(json!({
        "quotas": w.cwm.tiers.quotas().entries(),
        "usage": {"top": top, "other_l1_bytes": other, "salts": usage.len()},
    }))
    .into_response()
}
