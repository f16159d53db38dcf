//! Tenant quotas over HTTP, in the shape LMCache's newer coordinator uses:
//!
//! - `PUT /quota/{cache_salt}` with `{"limit_gb": <number>, "tier": "l1"}` sets a salt's limit
//!   (`tier` defaults to `l1`; `l2` and `l3` are refused: not enforced yet);
//! - `GET /quota/{cache_salt}`: its limit (its own, or the default for every salt) and usage;
//! - `DELETE /quota/{cache_salt}`: back to the default;
//! - `GET /quota`: every limit, the default, and the salts using the most of L1.
//!
//! `_default` names the empty salt. The routes sit behind the HTTP port's access rules like
//! every admin route (a loopback Host, or the bearer token). What each does: `tenant`;
//! enforcement: `store::quota`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

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
        Err(e @ QuotaError::NoOwnQuota(_)) => refuse(StatusCode::NOT_FOUND, e.to_string()),
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

async fn remove(State(w): State<Arc<Windows>>, Path(name): Path<String>) -> Response {
    answer(
        tenant::remove(&w.cwm.tiers, &name).map(|quota| json!({"deleted": true, "quota": quota})),
    )
}

async fn list(State(w): State<Arc<Windows>>) -> Response {
    Json(tenant::list(&w.cwm.tiers)).into_response()
}
