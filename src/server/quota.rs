//! Tenant quotas over HTTP, in the shape LMCache's newer coordinator uses:
//!
//! - `PUT /quota/{cache_salt}` with `{"limit_gb": <number>, "tier": "l1"|"l2"|"l3"}` sets a
//!   salt's limit on a tier (`tier` defaults to `l1`; a tier this sidecar lacks is refused);
//! - `GET /quota/{cache_salt}`: its limit on each tier (its own, or the default for every salt)
//!   and usage;
//! - `DELETE /quota/{cache_salt}[?tier=l2]`: back to the default, on every tier or one;
//! - `GET /quota`: every limit, the defaults, and the salts using the most of each tier.
//!
//! `_default` names the empty salt. The routes sit behind the HTTP port's access rules like
//! every admin route (a loopback Host, or the bearer token). What each does: `tenant`;
//! enforcement: `store::quota`.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::store::quota::QuotaTier;
use crate::tenant::{self, QuotaError, SetQuota};
use crate::windows::Windows;

pub fn routes() -> Router<Arc<Windows>> {
    Router::new()
        .route("/quota", get(list))
        .route("/quota/{cache_salt}", get(show).put(set).delete(remove))
}

fn refuse(status: StatusCode, detail: String) -> Response {
    (status, Json(json!({ "detail": detail }))).into_response()
}

fn answer<T: serde::Serialize>(r: Result<T, QuotaError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e @ QuotaError::NoOwnQuota { .. }) => refuse(StatusCode::NOT_FOUND, e.to_string()),
        Err(e) => refuse(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

async fn set(
    State(w): State<Arc<Windows>>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    match serde_json::from_slice::<SetQuota>(&body) {
        Ok(req) => answer(tenant::set(&w.cwm.tiers, &name, &req)),
        Err(e) => refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("invalid body: {e}"),
        ),
    }
}

async fn show(State(w): State<Arc<Windows>>, Path(name): Path<String>) -> Response {
    answer(tenant::get(&w.cwm.tiers, &name))
}

/// `?tier=` of a DELETE: one tier's limit, else every tier's.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TierParam {
    tier: Option<QuotaTier>,
}

async fn remove(
    State(w): State<Arc<Windows>>,
    Path(name): Path<String>,
    Query(q): Query<TierParam>,
) -> Response {
    let tiers = &w.cwm.tiers;
    answer(tenant::remove(tiers, &name, q.tier).and_then(|removed| {
        let now = tenant::get(tiers, &name)?;
        Ok(json!({"deleted": true, "removed": removed, "quota": now.quota, "tiers": now.tiers}))
    }))
}

async fn list(State(w): State<Arc<Windows>>) -> Response {
    Json(tenant::list(&w.cwm.tiers)).into_response()
}
