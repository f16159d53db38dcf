//! The MCP tools: an rmcp tool router over `windows::Windows`, with no logic of its own. Each
//! tool takes a JSON-schema'd request and returns a structured result; a failed operation is a
//! tool error (`isError: true`) whose text says what was wrong. Window operations touch disk
//! and many cores, so they run on the blocking pool, never on the reactor threads.
//!
//! Also `forward_stdio`: `cwm mcp`, a stdio MCP server that forwards every tool call to a
//! running sidecar's streamable HTTP endpoint.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::{Json, Parameters};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, ClientConfig, ClientRequest, Implementation,
    JsonRpcMessage, JsonRpcNotification, ListToolsResult, NumberOrString, PaginatedRequestParams,
    ProgressNotificationParam, ProgressToken, Request, RequestMetaObject, ServerCapabilities,
    ServerConfig, ServerNotification, ServerResult,
};
use rmcp::service::{
    Peer, PeerRequestOptions, RequestContext, RunningService, RxJsonRpcMessage, ServiceError,
    TxJsonRpcMessage,
};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::{StreamableHttpClientTransport, Transport};
use rmcp::{schemars, ServiceExt};
use rmcp::{tool, tool_handler, tool_router, ErrorData, RoleClient, RoleServer, ServerHandler};
use schemars::JsonSchema;
use serde::Deserialize;

use crate::store::quota::{QuotaEntry, QuotaTier};
use crate::tenant;
use crate::windows::*;

const INSTRUCTIONS: &str = "cwm keeps vLLM's KV cache. A session is a cache_salt: every request \
of a conversation carries it. window_freeze names a session's cached context and makes it durable; \
window_thaw loads it back into memory (optionally under a new session id) so the next request \
with that salt and prefix skips prefill entirely. window_clone branches a window without copying data.";

/// Tools take no arguments.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
pub struct NoArgs {}

/// A tenant, by its cache_salt (`_default` for requests that send none).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SaltArgs {
    pub cache_salt: String,
}

/// A tenant's own limit to remove: on one tier, or on every tier when `tier` is left out.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaDeleteArgs {
    pub cache_salt: String,
    pub tier: Option<QuotaTier>,
}

/// A tenant's new limit (unknown fields are refused by `SetQuota`).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct QuotaSetArgs {
    pub cache_salt: String,
    #[serde(flatten)]
    pub quota: tenant::SetQuota,
}

#[derive(Clone)]
pub struct WindowTools {
    windows: Arc<Windows>,
    #[allow(dead_code)] // read by the tool_handler macro
    tool_router: ToolRouter<Self>,
}

impl WindowTools {
    pub fn new(windows: Arc<Windows>) -> WindowTools {
        WindowTools {
            windows,
            tool_router: Self::tool_router(),
        }
    }

    /// Run a window operation on the blocking pool.
    async fn run<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Windows) -> Result<T, WindowError> + Send + 'static,
    ) -> Result<Json<T>, String> {
        let windows = self.windows.clone();
        match tokio::task::spawn_blocking(move || op(&windows)).await {
            Ok(Ok(v)) => Ok(Json(v)),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(format!("internal error: {e}")),
        }
    }
}

#[tool_router]
impl WindowTools {
    #[tool(
        description = "Make a session's cached context durable under a name: the newest token chain stored with cache_salt = session_id is written to disk, pinned and recorded as a window. Fails if nothing is cached for that session or the name is taken."
    )]
    async fn window_freeze(
        &self,
        Parameters(req): Parameters<FreezeRequest>,
    ) -> Result<Json<FreezeReport>, String> {
        self.run(move |w| w.freeze(&req)).await
    }

    #[tool(
        description = "Load a window's KV chunks into memory under its session id (or new_session_id), so the next vLLM request with that cache_salt and the window's token prefix hits in full. Reports tokens ready, bytes, tiers read and elapsed time; sends progress notifications while loading."
    )]
    async fn window_thaw(
        &self,
        Parameters(req): Parameters<ThawRequest>,
        context: RequestContext<RoleServer>,
    ) -> Result<Json<ThawReport>, String> {
        let token = context.meta.get_progress_token();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, usize)>();
        let windows = self.windows.clone();
        let job = tokio::task::spawn_blocking(move || {
            // At most ~100 notifications, whatever the window's size.
            let progress = |done: usize, total: usize| {
                if done == total || done % total.div_ceil(100).max(1) == 0 {
                    let _ = tx.send((done, total));
                }
            };
            windows.thaw(&req, &progress)
        });
        // Loading threads send as they finish, so counts can arrive out of order; MCP wants
        // progress to increase with every notification: a stale count is not sent.
        let mut sent = 0;
        while let Some((done, total)) = rx.recv().await {
            if done <= sent {
                continue;
            }
            sent = done;
            if let Some(token) = &token {
                let _ = context
                    .peer
                    .notify_progress(
                        ProgressNotificationParam::new(token.clone(), done as f64)
                            .with_total(total as f64)
                            .with_message(format!("{done}/{total} chunks loaded")),
                    )
                    .await;
            }
        }
        match job.await {
            Ok(Ok(report)) => Ok(Json(report)),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(format!("internal error: {e}")),
        }
    }

    #[tool(
        description = "Branch a window: a new window sharing the same stored data (no byte copy), with its own default session id. Deleting either never breaks the other."
    )]
    async fn window_clone(
        &self,
        Parameters(req): Parameters<CloneRequest>,
    ) -> Result<Json<WindowSummary>, String> {
        self.run(move |w| w.clone_window(&req)).await
    }

    #[tool(description = "List windows, filtered by tag, model or name prefix, with paging.")]
    async fn window_list(
        &self,
        Parameters(req): Parameters<ListRequest>,
    ) -> Result<Json<WindowList>, String> {
        self.run(move |w| w.list(&req)).await
    }

    #[tool(
        description = "Status of a window (chunks on disk, resident in memory, missing) and/or of a session (its stored token chains and the windows frozen from it)."
    )]
    async fn window_status(
        &self,
        Parameters(req): Parameters<StatusRequest>,
    ) -> Result<Json<StatusReport>, String> {
        self.run(move |w| w.status(&req)).await
    }

    #[tool(
        description = "Delete a window. Its data is released once no other window (clone) references it."
    )]
    async fn window_delete(
        &self,
        Parameters(req): Parameters<DeleteRequest>,
    ) -> Result<Json<DeleteReport>, String> {
        self.run(move |w| w.delete(&req)).await
    }

    #[tool(
        description = "Turn a session's auto-save on or off (whatever the server default), optionally naming its window (default autosave-<session_id>) and its idle seconds. An auto-saved session idle that long after new chunks has its newest chain frozen as that window, replacing its last auto-save atomically. Persisted."
    )]
    async fn session_autosave(
        &self,
        Parameters(req): Parameters<AutoSaveRequest>,
    ) -> Result<Json<AutoSaveSetting>, String> {
        self.run(move |w| w.set_autosave(&req)).await
    }

    #[tool(description = "Sessions (cache_salts) with cached token chains, most recent first.")]
    async fn session_list(
        &self,
        Parameters(_): Parameters<NoArgs>,
    ) -> Result<Json<SessionList>, String> {
        self.run(|w| Ok(w.session_list())).await
    }

    #[tool(description = "Cache statistics: lookups, hits and misses, bytes and objects per tier.")]
    async fn cache_stats(
        &self,
        Parameters(_): Parameters<NoArgs>,
    ) -> Result<Json<CacheStats>, String> {
        self.run(|w| Ok(w.cache_stats())).await
    }

    #[tool(
        description = "Set a tenant's quota: the bytes its cache_salt may occupy on a tier (limit_gb, GiB; tier \"l1\" memory, the default, \"l2\" disk with its frozen windows, \"l3\" Redis, counted for the whole fleet). A store over it drops that tenant's own least recently used chunks, never another's; a window_freeze over the L2 or L3 quota fails. `_default` names the empty salt."
    )]
    async fn quota_set(
        &self,
        Parameters(req): Parameters<QuotaSetArgs>,
    ) -> Result<Json<QuotaEntry>, String> {
        let tiers = &self.windows.cwm.tiers;
        tenant::set(tiers, &req.cache_salt, &req.quota)
            .map(Json)
            .map_err(|e| e.to_string())
    }

    #[tool(
        description = "A tenant's quota on each tier (its own, or the default for every salt) and its usage there."
    )]
    async fn quota_get(
        &self,
        Parameters(req): Parameters<SaltArgs>,
    ) -> Result<Json<tenant::SaltQuota>, String> {
        tenant::get(&self.windows.cwm.tiers, &req.cache_salt)
            .map(Json)
            .map_err(|e| e.to_string())
    }

    #[tool(
        description = "Remove a tenant's own quota on one tier (tier) or on every tier (the default for every salt applies again). Fails if it had none."
    )]
    async fn quota_delete(
        &self,
        Parameters(req): Parameters<QuotaDeleteArgs>,
    ) -> Result<Json<tenant::SaltQuota>, String> {
        let tiers = &self.windows.cwm.tiers;
        tenant::remove(tiers, &req.cache_salt, req.tier)
            .and_then(|_| tenant::get(tiers, &req.cache_salt))
            .map(Json)
            .map_err(|e| e.to_string())
    }

    #[tool(description = "Every tenant quota, and the tenants using the most of each tier.")]
    async fn quota_list(
        &self,
        Parameters(_): Parameters<NoArgs>,
    ) -> Result<Json<tenant::QuotaList>, String> {
        Ok(Json(tenant::list(&self.windows.cwm.tiers)))
    }

    #[tool(description = "Whether the sidecar is up, with its version and uptime.")]
    async fn health(&self, Parameters(_): Parameters<NoArgs>) -> Result<Json<Health>, String> {
        self.run(|w| Ok(w.health())).await
    }
}

fn server_config() -> ServerConfig {
    ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
        .with_server_info(Implementation::new("cwm", env!("CARGO_PKG_VERSION")))
        .with_instructions(INSTRUCTIONS)
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for WindowTools {
    fn get_info(&self) -> ServerConfig {
        server_config()
    }
}

// ----- cwm mcp: stdio → streamable HTTP --------------------------------------------------------

/// Forwards tool listing and calls to a sidecar's `/mcp`, and the sidecar's progress
/// notifications back to the client that asked for them.
struct Forwarder {
    upstream: RunningService<RoleClient, ClientConfig>,
    routes: ProgressRoutes,
}

/// Where a relayed notification goes: the stdio client and the progress token it gave.
struct Downstream {
    peer: Peer<RoleServer>,
    token: ProgressToken,
}

type Relayed = (Arc<Downstream>, ProgressNotificationParam);

/// The forwarded calls that asked for progress (upstream progress token -> where its
/// notifications go), and their notifications on the way down: one task sends them in the
/// order they were received, each written before the next.
#[derive(Clone)]
struct ProgressRoutes {
    routes: Arc<Mutex<HashMap<ProgressToken, Arc<Downstream>>>>,
    next: Arc<AtomicI64>,
    queue: tokio::sync::mpsc::UnboundedSender<Relayed>,
    queued: Arc<AtomicU64>,
    relayed: tokio::sync::watch::Receiver<u64>,
}

impl ProgressRoutes {
    /// No routes yet, and the task that sends relayed notifications.
    fn start() -> ProgressRoutes {
        let (queue, mut rx) = tokio::sync::mpsc::unbounded_channel::<Relayed>();
        let (count, relayed) = tokio::sync::watch::channel(0);
        tokio::spawn(async move {
            while let Some((down, params)) = rx.recv().await {
                let _ = down.peer.notify_progress(params).await;
                count.send_modify(|n| *n += 1);
            }
        });
        ProgressRoutes {
            routes: Default::default(),
            next: Default::default(),
            queue,
            queued: Default::default(),
            relayed,
        }
    }

    /// A fresh upstream token that relays to `token` of `peer`.
    fn route(&self, peer: Peer<RoleServer>, token: ProgressToken) -> ProgressToken {
        let up = ProgressToken(NumberOrString::Number(
            self.next.fetch_add(1, Ordering::Relaxed),
        ));
        self.routes
            .lock()
            .insert(up.clone(), Arc::new(Downstream { peer, token }));
        up
    }

    fn unroute(&self, up: &ProgressToken) {
        self.routes.lock().remove(up);
    }

    /// Queue `message` for its client when it is progress of a routed call; false otherwise.
    fn relay(&self, message: &RxJsonRpcMessage<RoleClient>) -> bool {
        let JsonRpcMessage::Notification(JsonRpcNotification {
            notification: ServerNotification::ProgressNotification(progress),
            ..
        }) = message
        else {
            return false;
        };
        let Some(down) = self
            .routes
            .lock()
            .get(&progress.params.progress_token)
            .cloned()
        else {
            return false;
        };
        let mut params = progress.params.clone();
        params.progress_token = down.token.clone();
        self.queued.fetch_add(1, Ordering::SeqCst);
        let _ = self.queue.send((down, params));
        true
    }

    /// Once every notification queued so far has been written to its client.
    async fn flushed(&self) {
        let queued = self.queued.load(Ordering::SeqCst);
        let _ = self.relayed.clone().wait_for(|n| *n >= queued).await;
    }
}

/// The upstream transport of `cwm mcp`: hands each progress notification of a forwarded call
/// to the relay as it is received, so a call's reply, received after them, can wait for them
/// to be written (`ProgressRoutes::flushed`).
///
/// Relaying from a `ClientHandler` instead loses progress: rmcp runs each notification's
/// handler on a task of its own, which the call's reply can overtake, and MCP clients drop
/// progress that arrives after the reply (the Python SDK did: a thaw's 2/2 never shown).
/// Nothing here awaits after taking a message: rmcp drops a pending `receive` whenever
/// something else wakes its loop.
struct RelayProgress<T> {
    inner: T,
    routes: ProgressRoutes,
}

impl<T: Transport<RoleClient>> Transport<RoleClient> for RelayProgress<T> {
    type Error = T::Error;

    fn send(
        &mut self,
        item: TxJsonRpcMessage<RoleClient>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        self.inner.send(item)
    }

    async fn receive(&mut self) -> Option<RxJsonRpcMessage<RoleClient>> {
        loop {
            let message = self.inner.receive().await?;
            if !self.routes.relay(&message) {
                return Some(message);
            }
        }
    }

    fn close(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send {
        self.inner.close()
    }
}

impl ServerHandler for Forwarder {
    fn get_info(&self) -> ServerConfig {
        server_config()
    }

    async fn list_tools(
        &self,
        request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        self.upstream
            .list_tools(request)
            .await
            .map_err(|e| ErrorData::internal_error(format!("cwm sidecar: {e}"), None))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let failed = |e: ServiceError| ErrorData::internal_error(format!("cwm sidecar: {e}"), None);
        let Some(token) = context.meta.get_progress_token() else {
            return self.upstream.call_tool_once(request).await.map_err(failed);
        };
        let up = self.routes.route(context.peer.clone(), token);
        let mut options = PeerRequestOptions::no_options();
        options.meta = Some(RequestMetaObject::with_progress_token(up.clone()));
        let reply = async {
            self.upstream
                .send_cancellable_request(
                    ClientRequest::CallToolRequest(Request::new(request)),
                    options,
                )
                .await?
                .await_response()
                .await
        }
        .await;
        // The call's progress was received before its reply: let it reach the client first.
        self.routes.unroute(&up);
        self.routes.flushed().await;
        match reply.map_err(failed)? {
            ServerResult::CallToolResult(r) => Ok(r.into()),
            other => Err(ErrorData::internal_error(
                format!("cwm sidecar answered a tool call with {other:?}"),
                None,
            )),
        }
    }
}

/// The sidecar's `/mcp` at `url`, with its bearer token when it has one.
fn upstream_config(url: &str, token: Option<&str>) -> StreamableHttpClientTransportConfig {
    let config = StreamableHttpClientTransportConfig::with_uri(url.to_string());
    match token {
        Some(t) => config.auth_header(t),
        None => config,
    }
}

/// Connect an MCP client to a sidecar's streamable HTTP endpoint (e.g.
/// `http://127.0.0.1:8080/mcp`), sending `token` as a bearer token when given.
pub async fn connect(
    url: &str,
    token: Option<&str>,
) -> anyhow::Result<RunningService<RoleClient, ClientConfig>> {
    let transport = StreamableHttpClientTransport::from_config(upstream_config(url, token));
    Ok(ClientConfig::default().serve(transport).await?)
}

/// `cwm mcp`: serve MCP on stdin/stdout, forwarding to the sidecar at `url`.
pub async fn forward_stdio(url: &str, token: Option<&str>) -> anyhow::Result<()> {
    let routes = ProgressRoutes::start();
    let transport = RelayProgress {
        inner: StreamableHttpClientTransport::from_config(upstream_config(url, token)),
        routes: routes.clone(),
    };
    let upstream = ClientConfig::default()
        .serve(transport)
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the cwm sidecar at {url}: {e}"))?;
    let service = Forwarder { upstream, routes }
        .serve(rmcp::transport::stdio())
        .await?;
    service.waiting().await?;
    Ok(())
}
