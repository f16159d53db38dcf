//! The connection to Redis: a small tokio runtime, `connections` multiplexed connections (to
//! one server, or cluster connections that hold one per node), the health of the link, and
//! reconnection with backoff.
//!
//! Every operation runs under the configured deadline and never waits for a link that is down:
//! while down, callers get `Down` at once until the backoff allows one caller to try again.
//! Failures are logged once per incident (when the link goes down and when it comes back), and
//! the state is kept for `/status` and `/metrics`.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, IntoConnectionInfo, RedisError, RedisResult, TlsCertificates};
use thiserror::Error;

pub use crate::store::tier::LinkStatus;

use super::batch::Batches;
use super::config::{Endpoints, L3Config};

#[derive(Debug, Error)]
pub enum LinkError {
    #[error("L3 is unreachable (retrying with backoff)")]
    Down,
    #[error("L3 operation exceeded its {0:?} deadline")]
    Timeout(Duration),
    #[error("L3: {0}")]
    Redis(#[from] RedisError),
}

/// One connection: to a single server, or to a whole cluster (routing by slot).
#[derive(Clone)]
pub enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Conn {
    pub async fn query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> RedisResult<T> {
        match self {
            Conn::Single(c) => cmd.query_async(c).await,
            Conn::Cluster(c) => cmd.query_async(c).await,
        }
    }
}

enum Target {
    Single(Box<redis::Client>),
    Cluster(Box<redis::cluster::ClusterClient>),
}

struct Down {
    since: Instant,
    retry_at: Instant,
    backoff: Duration,
}

#[derive(Default)]
struct Health {
    /// Some while the link is down.
    down: Mutex<Option<Down>>,
    answered: AtomicBool,
    incidents: AtomicU64,
    full: AtomicBool,
    last_error: Mutex<Option<String>>,
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

pub struct Link {
    /// Taken at drop (shut down in the background: dropping may happen on any thread).
    rt: Option<tokio::runtime::Runtime>,
    target: Target,
    slots: Vec<Mutex<Option<Conn>>>,
    next: AtomicUsize,
    timeout: Duration,
    health: Health,
    endpoints: Vec<String>,
    batches: Arc<Batches>,
}

impl Link {
    /// Build the clients; connects lazily, so a Redis absent at start only means "down".
    pub fn new(config: &L3Config) -> anyhow::Result<Link> {
        // rustls needs a process-wide crypto provider when more than one could be compiled in.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let certs = match &config.tls_ca {
            Some(path) => Some(TlsCertificates {
                client_tls: None,
                root_cert: Some(std::fs::read(path).map_err(|e| {
                    anyhow::anyhow!("cannot read L3 CA certificate {}: {e}", path.display())
                })?),
            }),
            None => None,
        };
        let with_password = |url: &str| -> anyhow::Result<redis::ConnectionInfo> {
            let info = url.into_connection_info()?;
            Ok(match &config.password {
                Some(p) => {
                    let settings = info.redis_settings().clone().set_password(p);
                    info.set_redis_settings(settings)
                }
                None => info,
            })
        };
        let t = config.timeout;
        let target = match &config.endpoints {
            Endpoints::Single(url) => {
                let info = with_password(url)?;
                Target::Single(Box::new(match certs {
                    Some(c) => redis::Client::build_with_tls(info, c)?,
                    None => redis::Client::open(info)?,
                }))
            }
            Endpoints::Cluster(urls) => {
                let infos = urls
                    .iter()
                    .map(|u| with_password(u))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let mut b = ClusterClientBuilder::new(infos)
                    .connection_timeout(t)
                    .response_timeout(t)
                    .retries(2);
                if let Some(c) = certs {
                    b = b.certs(c);
                }
                Target::Cluster(Box::new(b.build()?))
            }
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cwm-l3")
            .enable_all()
            .build()?;
        Ok(Link {
            rt: Some(rt),
            target,
            slots: (0..config.connections.max(1))
                .map(|_| Mutex::new(None))
                .collect(),
            next: AtomicUsize::new(0),
            timeout: t,
            health: Health::default(),
            endpoints: config.endpoints_redacted(),
            batches: Arc::default(),
        })
    }

    /// Run `op` on a connection, within the deadline. Fails at once while the link is down.
    pub fn run<T, F, Fut>(&self, op: F) -> Result<T, LinkError>
    where
        T: Send + 'static,
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>> + Send + 'static,
    {
        let i = self.next.fetch_add(1, Relaxed) % self.slots.len();
        let conn = self.conn(i)?;
        self.finish(self.block(op(conn)), i..i + 1)
    }

    /// Run `op` with every connection (`connections` of them, each to every node), within the
    /// deadline: for work that wants several commands in flight on separate sockets.
    pub fn run_all<T, F, Fut>(&self, op: F) -> Result<T, LinkError>
    where
        T: Send + 'static,
        F: FnOnce(Vec<Conn>) -> Fut,
        Fut: Future<Output = RedisResult<T>> + Send + 'static,
    {
        let conns = (0..self.slots.len())
            .map(|i| self.conn(i))
            .collect::<Result<Vec<_>, _>>()?;
        self.finish(self.block(op(conns)), 0..self.slots.len())
    }

    /// The connection of slot `i`, connecting it if needed (not while the link is down).
    fn conn(&self, i: usize) -> Result<Conn, LinkError> {
        let slot = &self.slots[i];
        let existing = slot.lock().clone();
        match existing {
            Some(c) => Ok(c),
            None => {
                self.may_connect()?;
                let c = match self.block(self.connect()) {
                    Ok(c) => c,
                    Err(e) => return Err(self.failed(e)),
                };
                *slot.lock() = Some(c.clone());
                Ok(c)
            }
        }
    }

    /// Note the outcome of an operation that used the connections of `slots`.
    fn finish<T>(
        &self,
        result: Result<T, LinkError>,
        slots: std::ops::Range<usize>,
    ) -> Result<T, LinkError> {
        match result {
            Ok(v) => {
                self.recovered();
                Ok(v)
            }
            Err(e) => {
                if broken(&e) {
                    for s in &self.slots[slots] {
                        s.lock().take();
                    }
                } else if matches!(&e, LinkError::Redis(_)) {
                    // The server answered (e.g. OOM when full): the link itself is up.
                    self.recovered();
                }
                Err(self.failed(e))
            }
        }
    }

    /// The slot map and round-trip count of `batch`.
    pub fn batches(&self) -> &Arc<Batches> {
        &self.batches
    }

    /// Whether an operation would be attempted now (false while down and backing off).
    pub fn usable(&self) -> bool {
        self.health
            .down
            .lock()
            .as_ref()
            .is_none_or(|d| Instant::now() >= d.retry_at)
    }

    /// Note a write refused for lack of memory (logged once until a write succeeds).
    pub fn note_full(&self, e: &RedisError) {
        if !self.health.full.swap(true, Relaxed) {
            tracing::warn!(
                "L3 Redis is full ({e}): cache chunks are not written until it has room \
                 (maxmemory-policy volatile-lru evicts cache chunks, which carry a TTL)"
            );
        }
    }

    pub fn note_write_ok(&self) {
        if self.health.full.swap(false, Relaxed) {
            tracing::info!("L3 Redis accepts writes again");
        }
    }

    pub fn status(&self) -> LinkStatus {
        let down = self.health.down.lock();
        LinkStatus {
            state: match (&*down, self.health.answered.load(Relaxed)) {
                (Some(_), _) => "down",
                (None, true) => "up",
                (None, false) => "connecting",
            }
            .into(),
            endpoints: self.endpoints.clone(),
            incidents: self.health.incidents.load(Relaxed),
            down_for_secs: down.as_ref().map(|d| d.since.elapsed().as_secs_f64()),
            last_error: self.health.last_error.lock().clone(),
            full: self.health.full.load(Relaxed),
        }
    }

    pub fn is_up(&self) -> bool {
        self.health.down.lock().is_none() && self.health.answered.load(Relaxed)
    }

    fn may_connect(&self) -> Result<(), LinkError> {
        let mut down = self.health.down.lock();
        match down.as_mut() {
            None => Ok(()),
            Some(d) if Instant::now() >= d.retry_at => {
                // This caller tries; the others keep failing fast until the next backoff.
                d.retry_at = Instant::now() + d.backoff;
                d.backoff = (d.backoff * 2).min(BACKOFF_MAX);
                Ok(())
            }
            Some(_) => Err(LinkError::Down),
        }
    }

    fn failed(&self, e: LinkError) -> LinkError {
        let connectivity = match &e {
            LinkError::Redis(r) => broken_redis(r),
            LinkError::Timeout(_) => true,
            LinkError::Down => false,
        };
        if connectivity {
            let mut down = self.health.down.lock();
            if down.is_none() {
                // Every connection went to the same servers: reconnect them all afterwards.
                for s in &self.slots {
                    s.lock().take();
                }
                self.health.incidents.fetch_add(1, Relaxed);
                tracing::warn!(
                    endpoints = ?self.endpoints,
                    "L3 Redis unreachable ({e}): serving from L1/L2, reconnecting with backoff"
                );
                *down = Some(Down {
                    since: Instant::now(),
                    retry_at: Instant::now() + BACKOFF_MIN,
                    backoff: BACKOFF_MIN * 2,
                });
            }
            *self.health.last_error.lock() = Some(e.to_string());
        }
        e
    }

    fn recovered(&self) {
        self.health.answered.store(true, Relaxed);
        let mut down = self.health.down.lock();
        if let Some(d) = down.take() {
            tracing::info!(
                endpoints = ?self.endpoints,
                down_secs = d.since.elapsed().as_secs_f64(),
                "L3 Redis reachable again"
            );
        }
    }

    fn connect(&self) -> impl Future<Output = RedisResult<Conn>> + Send + 'static {
        let t = self.timeout;
        let target = match &self.target {
            Target::Single(c) => Target::Single(c.clone()),
            Target::Cluster(c) => Target::Cluster(c.clone()),
        };
        async move {
            match target {
                Target::Single(c) => {
                    let config = AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(t))
                        .set_response_timeout(Some(t));
                    Ok(Conn::Single(
                        c.get_multiplexed_async_connection_with_config(&config)
                            .await?,
                    ))
                }
                Target::Cluster(c) => Ok(Conn::Cluster(c.get_async_connection().await?)),
            }
        }
    }

    /// Run a future on the L3 runtime and wait for it, at most the deadline. Callable from any
    /// thread, including tokio's blocking pool.
    fn block<T: Send + 'static>(
        &self,
        fut: impl Future<Output = RedisResult<T>> + Send + 'static,
    ) -> Result<T, LinkError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let t = self.timeout;
        let Some(rt) = &self.rt else {
            return Err(LinkError::Down);
        };
        rt.spawn(async move {
            let _ = tx.send(tokio::time::timeout(t, fut).await);
        });
        match rx.recv() {
            Ok(Ok(r)) => r.map_err(LinkError::from),
            Ok(Err(_)) | Err(_) => Err(LinkError::Timeout(t)),
        }
    }
}

fn broken(e: &LinkError) -> bool {
    match e {
        LinkError::Redis(r) => broken_redis(r),
        LinkError::Timeout(_) => true,
        LinkError::Down => false,
    }
}

/// Errors of the link itself (as opposed to a server's answer to one command).
pub(super) fn broken_redis(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
        || e.kind() == redis::ErrorKind::AuthenticationFailed
}

/// A Redis out of memory refusing a write (`OOM`), as a command's reply or in a pipeline's.
pub fn out_of_memory(e: &RedisError) -> bool {
    e.code() == Some("OOM")
        || (e.clone().into_server_errors())
            .is_some_and(|all| all.iter().any(|(_, s)| s.code() == "OOM"))
}

impl Drop for Link {
    fn drop(&mut self) {
        for s in &self.slots {
            s.lock().take();
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
