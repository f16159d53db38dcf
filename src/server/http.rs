//! The HTTP port (`--http-port`, 8080): MCP over streamable HTTP at `/mcp`, and the admin
//! surface: `/healthcheck`, `/status`, `/metrics`, and LMCache's `/cache/clear` and
//! `/cache/checksums` (digests of a registered engine's KV blocks). Runs its own small tokio
//! runtime on one thread; handlers that touch the stores or engine memory run on the blocking
//! pool.
//!
//! Every route sits behind one access layer (`Access`, docs/SECURITY.md): bound to loopback,
//! a request must name a loopback host (`Host`, against DNS rebinding) and, when a browser
//! says where it comes from (`Origin`), come from a loopback origin (against any web page the
//! operator opens); with a bearer token configured (required beyond loopback) every route but
//! `/healthcheck` needs `Authorization: Bearer <token>`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::limits::{Limit, MAX_CHECKSUM_BLOCKS, MAX_MCP_SESSIONS};
use crate::mcp::WindowTools;
use crate::windows::Windows;

pub struct HttpServer {
    pub addr: SocketAddr,
    stop: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Bind `host:port` (port 0 picks a free one) and serve on a background thread. Every
    /// route but `/healthcheck` needs `token` as a bearer token when one is given; bound
    /// beyond loopback, starting without one is refused.
    pub fn start(
        host: &str,
        port: u16,
        token: Option<&str>,
        windows: Arc<Windows>,
    ) -> anyhow::Result<HttpServer> {
        let host = if host == "localhost" {
            "127.0.0.1"
        } else {
            host
        };
        let listener = std::net::TcpListener::bind((host, port))
            .map_err(|e| anyhow::anyhow!("cannot bind the HTTP port {host}:{port}: {e}"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let access = Access {
            loopback: addr.ip().is_loopback(),
            token: token.map(Arc::from),
        };
        anyhow::ensure!(
            access.loopback || access.token.is_some(),
            "the HTTP port is bound to {addr}, beyond loopback, and has no bearer token: anyone \
             who reaches it could clear the cache and read or delete every window. Set one \
             with --http-token, CWM_HTTP_TOKEN or http_token in the config file, or bind to \
             loopback"
        );
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
                        let app = router(windows, stop.clone(), access);
                        if let Err(e) = axum::serve(listener, app)
                            .with_graceful_shutdown(stop.cancelled_owned())
                            .await
                        {
                            tracing::error!("HTTP server stopped: {e}");
                        }
                    });
                    // Every task (an MCP session holds the windows, hence L2 and its directory
                    // lock) is dropped before `stop` returns, so a stopped sidecar's data
                    // directory is free at once; tool calls still running on the blocking pool
                    // get a few seconds to finish.
                    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
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

fn router(windows: Arc<Windows>, stop: CancellationToken, access: Access) -> Router {
    let mut config = StreamableHttpServerConfig::default().with_cancellation_token(stop);
    if !access.loopback {
        // Bound to a routable interface on purpose: accept any Host header (the token guards).
        config = config.disable_allowed_hosts();
    }
    let sessions = Arc::new(LocalSessionManager::default());
    let mcp: StreamableHttpService<WindowTools, LocalSessionManager> = {
        let windows = windows.clone();
        StreamableHttpService::new(
            move || Ok(WindowTools::new(windows.clone())),
            sessions.clone(),
            config,
        )
    };
    let mcp = Router::new()
        .fallback_service(mcp)
        .layer(middleware::from_fn_with_state(sessions, session_cap));
    Router::new()
        .route("/healthcheck", get(healthcheck))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/cache/clear", post(cache_clear))
        .route("/cache/checksums", post(cache_checksums))
        .merge(super::quota::routes())
        .nest("/mcp", mcp)
        .with_state(windows)
        .layer(middleware::from_fn_with_state(Arc::new(access), guard))
}

/// Who may use the HTTP port.
#[derive(Debug)]
struct Access {
    /// Bound to loopback: `Host` and `Origin` must name a loopback host.
    loopback: bool,
    /// The bearer token every route but `/healthcheck` needs, if any.
    token: Option<Arc<str>>,
}

/// A refused request: which limit, the status, and the reason for the client.
type Refusal = (Limit, StatusCode, String);

impl Access {
    fn check(&self, headers: &HeaderMap, path: &str) -> Result<(), Refusal> {
        let text = |name| headers.get(name).map(|v| v.to_str().unwrap_or("\u{fffd}"));
        let host = text(header::HOST);
        if self.loopback {
            if let Some(h) = host.filter(|h| !is_loopback_authority(h)) {
                return Err((
                    Limit::HttpHost,
                    StatusCode::FORBIDDEN,
                    format!(
                        "Host {:?} is not a loopback name; this port is bound to loopback",
                        crate::limits::for_log(h)
                    ),
                ));
            }
        }
        if let Some(origin) = text(header::ORIGIN) {
            let from = origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"));
            let allowed = match from {
                Some(a) if self.loopback => is_loopback_authority(a),
                Some(a) => host.is_some_and(|h| h.eq_ignore_ascii_case(a)),
                None => false,
            };
            if !allowed {
                return Err((
                    Limit::HttpOrigin,
                    StatusCode::FORBIDDEN,
                    format!(
                        "cross-origin request from {:?} refused",
                        crate::limits::for_log(origin)
                    ),
                ));
            }
        }
        if let (Some(token), false) = (&self.token, path == "/healthcheck") {
            let given = text(header::AUTHORIZATION).and_then(|a| a.strip_prefix("Bearer "));
            if !given.is_some_and(|g| same_secret(g.as_bytes(), token.as_bytes())) {
                return Err((
                    Limit::HttpToken,
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong bearer token (Authorization: Bearer <--http-token>)".into(),
                ));
            }
        }
        Ok(())
    }
}

/// `host[:port]` names a loopback host: `localhost`, `127.0.0.0/8` or `[::1]`.
fn is_loopback_authority(authority: &str) -> bool {
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.split(':').next().unwrap_or(""),
    };
    crate::config::is_loopback_host(host)
}

/// Compare secrets in time independent of where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

async fn guard(State(access): State<Arc<Access>>, req: Request, next: Next) -> Response {
    match access.check(req.headers(), req.uri().path()) {
        Ok(()) => next.run(req).await,
        Err((limit, status, why)) => {
            limit.refused();
            tracing::warn!(path = %crate::limits::for_log(req.uri().path()), "HTTP request refused: {why}");
            let mut response = detail(status, why);
            if status == StatusCode::UNAUTHORIZED {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, "Bearer".parse().unwrap());
            }
            response
        }
    }
}

/// A request that would open a new MCP session (a POST without `Mcp-Session-Id`) is refused
/// while `MAX_MCP_SESSIONS` are open; idle sessions expire (rmcp's keep-alive, 5 minutes).
async fn session_cap(
    State(sessions): State<Arc<LocalSessionManager>>,
    req: Request,
    next: Next,
) -> Response {
    if req.method() == Method::POST && !req.headers().contains_key("mcp-session-id") {
        let open = sessions.sessions.read().await.len();
        if open >= MAX_MCP_SESSIONS {
            Limit::McpSessions.refused();
            return detail(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "{open} MCP sessions are open (at most {MAX_MCP_SESSIONS}); close one \
                     (DELETE /mcp) or wait for idle ones to expire"
                ),
            );
        }
    }
    next.run(req).await
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
    let text = blocking(w, |w| crate::metrics::render(&w.cwm, &w.health())).await?;
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
    let cleared = blocking(w, move |w| w.cwm.tiers.clear(force)).await?;
    tracing::info!(
        force,
        l1 = cleared.l1,
        lower = cleared.lower,
        "cache cleared via HTTP"
    );
    Ok(Json(json!({"status": "ok", "cleared": {"tier": "l1"}})))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ChecksumRequest {
    block_ids: Vec<u32>,
    /// Blocks per chunk.
    chunk_size: i64,
    instance_id: u64,
    layerwise: bool,
}

fn detail(status: StatusCode, detail: impl Into<String>) -> Response {
    (status, Json(json!({"detail": detail.into()}))).into_response()
}

/// LMCache's `POST /cache/checksums`: MD5 digests of a registered engine's KV blocks,
/// `chunk_size` blocks per chunk, as LMCache's server computes them (`engine_mem::checksum`),
/// so `lmcache bench server` can check that a retrieve wrote back what was stored. Errors are
/// LMCache's: 404 unknown instance, 400 no `block_ids` or `chunk_size` < 1; plus 400 for a
/// block id out of range and 501 (with the reason) for an instance whose memory cwm could not
/// open (CUDA descriptors, unsupported layouts).
async fn cache_checksums(
    State(w): State<Arc<Windows>>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, Response> {
    use crate::engine_mem::checksum::{compress_ids, Checksums};
    let req: ChecksumRequest = serde_json::from_slice(&body).map_err(|e| {
        detail(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("invalid body: {e}"),
        )
    })?;
    let inst = w.cwm.registry.get(req.instance_id).ok_or_else(|| {
        detail(
            StatusCode::NOT_FOUND,
            format!("instance_id {} not registered", req.instance_id),
        )
    })?;
    if req.block_ids.is_empty() {
        return Err(detail(StatusCode::BAD_REQUEST, "block_ids is required"));
    }
    if req.block_ids.len() > MAX_CHECKSUM_BLOCKS {
        Limit::ChecksumBlocks.refused();
        return Err(detail(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{} block_ids; at most {MAX_CHECKSUM_BLOCKS} per request (ask in parts)",
                req.block_ids.len()
            ),
        ));
    }
    if req.chunk_size <= 0 {
        return Err(detail(
            StatusCode::BAD_REQUEST,
            "chunk_size must be positive",
        ));
    }
    let chunk = usize::try_from(req.chunk_size).unwrap_or(usize::MAX);
    let layerwise = req.layerwise;
    let ids = req.block_ids;
    let (ids, result) = blocking(w, move |_| {
        let r = match &inst.kv {
            Ok(kv) => kv
                .checksums(&ids, chunk, layerwise)
                .map_err(|e| detail(StatusCode::BAD_REQUEST, e.to_string())),
            Err(reason) => Err(detail(
                StatusCode::NOT_IMPLEMENTED,
                format!("checksum not supported for this instance: {reason}"),
            )),
        };
        (ids, r)
    })
    .await?;
    let checksums = match result? {
        Checksums::Chunks(c) => json!(c),
        Checksums::Layers(layers) => json!(layers
            .into_iter()
            .enumerate()
            .map(|(i, d)| (format!("layer_{i}"), json!(d)))
            .collect::<serde_json::Map<_, _>>()),
    };
    Ok(Json(json!({
        "status": "success",
        "chunk_size": req.chunk_size,
        "num_chunks": ids.len().div_ceil(chunk),
        "chunk_checksums": checksums,
        "layerwise": layerwise,
        "block_id_ranges": compress_ids(&ids),
    })))
}
