//! The HTTP port (`--http-port`, 8080): MCP over streamable HTTP at `/mcp`, and the admin
//! surface: `/healthcheck`, `/status`, `/metrics`, and LMCache's `/cache/clear` and
//! `/cache/checksums`. Runs its own small tokio runtime on one thread; handlers that touch
//! the stores run on the blocking pool.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::mcp::WindowTools;
use crate::windows::Windows;

pub struct HttpServer {
    pub addr: SocketAddr,
    stop: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Bind `host:port` (port 0 picks a free one) and serve on a background thread.
    pub fn start(host: &str, port: u16, windows: Arc<Windows>) -> anyhow::Result<HttpServer> {
        let host = if host == "localhost" {
            "127.0.0.1"
        } else {
            host
        };
        let listener = std::net::TcpListener::bind((host, port))
            .map_err(|e| anyhow::anyhow!("cannot bind the HTTP port {host}:{port}: {e}"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let loopback = addr.ip().is_loopback();
        let stop = CancellationToken::new();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cwm-http")
            .enable_all()
            .build()?;
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("cwm-http".into())
                .spawn(move || {
                    runtime.block_on(async move {
                        let listener = match tokio::net::TcpListener::from_std(listener) {
                            Ok(l) => l,
                            Err(e) => {
                                tracing::error!("HTTP server: {e}");
                                return;
                            }
                        };
                        let app = router(windows, stop.clone(), loopback);
                        if let Err(e) = axum::serve(listener, app)
                            .with_graceful_shutdown(stop.cancelled_owned())
                            .await
                        {
                            tracing::error!("HTTP server stopped: {e}");
                        }
                    });
                    // Tool calls still running on the blocking pool are not waited for.
                    runtime.shutdown_background();
                })?
        };
        tracing::info!(%addr, "cwm serving HTTP: /mcp /metrics /status /healthcheck /cache/*");
        Ok(HttpServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    pub fn stop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn router(windows: Arc<Windows>, stop: CancellationToken, loopback: bool) -> Router {
    let mut config = StreamableHttpServerConfig::default().with_cancellation_token(stop);
    if !loopback {
        // Bound to a routable interface on purpose: accept any Host header.
        config = config.disable_allowed_hosts();
    }
    let mcp: StreamableHttpService<WindowTools, LocalSessionManager> = {
        let windows = windows.clone();
        StreamableHttpService::new(
            move || Ok(WindowTools::new(windows.clone())),
            Default::default(),
            config,
        )
    };
    Router::new()
        .route("/healthcheck", get(healthcheck))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/cache/clear", post(cache_clear))
        .route("/cache/checksums", post(cache_checksums))
        .nest_service("/mcp", mcp)
        .with_state(windows)
}

async fn blocking<T: Send + 'static>(
    windows: Arc<Windows>,
    f: impl FnOnce(&Windows) -> T + Send + 'static,
) -> Result<T, Response> {
    tokio::task::spawn_blocking(move || f(&windows))
        .await
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response())
}

async fn healthcheck() -> Json<serde_json::Value> {
    Json(json!({"status": "healthy"}))
}

async fn status(State(w): State<Arc<Windows>>) -> Result<Json<serde_json::Value>, Response> {
    blocking(w, |w| {
        Json(json!({
            "health": w.health(),
            "cache": w.cache_stats(),
            "sessions": w.session_list().sessions.len(),
        }))
    })
    .await
}

async fn metrics(State(w): State<Arc<Windows>>) -> Result<Response, Response> {
    let text = blocking(w, crate::metrics::render).await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ClearRequest {
    tier: Option<String>,
    force: bool,
}

/// LMCache's `POST /cache/clear`: body optional, `{"tier": "l1", "force": false}`.
async fn cache_clear(
    State(w): State<Arc<Windows>>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, Response> {
    let req: ClearRequest = if body.iter().all(u8::is_ascii_whitespace) {
        ClearRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("invalid body: {e}"),
            )
                .into_response()
        })?
    };
    let tier = req.tier.unwrap_or_else(|| "l1".into());
    if tier != "l1" {
        return Err((
            StatusCode::BAD_REQUEST,
            Json(json!({"detail": format!("tier {tier:?} not supported; only 'l1'")})),
        )
            .into_response());
    }
    let force = req.force;
    let dropped = blocking(w, move |w| w.cwm.tiers.l1.clear(force)).await?;
    tracing::info!(force, dropped, "cache cleared via HTTP");
    Ok(Json(json!({"status": "ok", "cleared": {"tier": "l1"}})))
}

/// LMCache's `POST /cache/checksums` hashes an engine's GPU blocks in the engine's own tensor
/// layout; cwm does not implement it yet and says so the way LMCache does for engines it
/// cannot checksum.
async fn cache_checksums() -> Response {
    (
        StatusCode::NOT_IMPLEMENTED,
        Json(json!({"detail": "checksum not supported for this engine type"})),
    )
        .into_response()
}
