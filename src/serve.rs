//! `cwm serve`: build the sidecar from a `Config` and run it until shut down.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::engine_mem::pin_l1::PinScope;
use crate::ops::journal::Journal;
use crate::ops::{Cwm, ReapPolicy, Restored, Settings};
use crate::server::http::HttpServer;
use crate::server::lm::LmServer;
use crate::server::mp::MpServer;
use crate::session;
use crate::store::tiered::{AdoptPool, L1Memory, OpenError, Tiers, TiersConfig};
use crate::windows::Windows;

/// How often `cwm-autosave` looks for idle sessions to save.
const AUTOSAVE_TICK: Duration = Duration::from_millis(250);

/// A running sidecar. Dropping it shuts it down and waits for its threads.
pub struct Sidecar {
    pub cwm: Arc<Cwm>,
    pub mp_endpoint: String,
    pub windows: Arc<Windows>,
    /// Where the HTTP server (MCP, metrics, admin) listens.
    pub http_addr: std::net::SocketAddr,
    /// Where LMCache's classic remote protocol (`lm://`) listens, when `--lm-port` is set.
    pub lm_addr: Option<std::net::SocketAddr>,
    /// What the start restored from the registration journal.
    pub restored: Restored,
    /// From the start of `start` until the MP port answers (the journal restored).
    pub start_time: Duration,
    http: Option<HttpServer>,
    shutdown: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    drain_timeout: Duration,
    stopped: bool,
}

impl Sidecar {
    /// Start every server of the sidecar on background threads.
    pub fn start(config: &Config) -> anyhow::Result<Sidecar> {
        let started = Instant::now();
        config.validate()?;
        let mut tiers = config.tiers_config()?;
        tiers.adopt_pool = pool_to_adopt(config, &tiers);
        let cwm = open_cwm(config, &tiers)?;
        // Before the MP port opens: the first request (maybe queued by a connector while cwm
        // was down) finds every registration that could be restored.
        let restored = restore_registrations(&cwm, config)?;
        let sessions = restore_sessions(&cwm, config)?;
        let windows = Arc::new(Windows::open(
            cwm.clone(),
            config.l2_enabled().then_some(config.l2_path.as_path()),
            config.auto_save_idle_secs,
        )?);
        let http = HttpServer::start(
            &config.host,
            config.http_port,
            config.http_token.as_deref(),
            windows.clone(),
        )?;
        let http_addr = http.addr;
        let shutdown = Arc::new(AtomicBool::new(false));
        let mp = MpServer::bind(&config.host, config.port)?;
        let mp_endpoint = mp.endpoint().to_string();
        let mut threads = Vec::new();
        {
            let (cwm, shutdown, lanes) = (cwm.clone(), shutdown.clone(), config.transfer_lanes);
            threads.push(
                std::thread::Builder::new()
                    .name("cwm-mp".into())
                    .spawn(move || {
                        if let Err(e) = mp.run(cwm, lanes, shutdown.clone()) {
                            tracing::error!("MP server stopped: {e}");
                            shutdown.store(true, Ordering::Relaxed);
                        }
                    })?,
            );
        }
        let lm_addr = match config.lm_port {
            Some(port) => Some(start_lm(&config.host, port, &cwm, &shutdown, &mut threads)?),
            None => None,
        };
        {
            let (cwm, shutdown) = (cwm.clone(), shutdown.clone());
            threads.push(std::thread::Builder::new().name("cwm-sweep".into()).spawn(
                move || {
                    let mut ticks = 0u64;
                    while !shutdown.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(200));
                        ticks += 1;
                        if ticks % 5 == 0 {
                            cwm.sweep();
                        }
                    }
                },
            )?);
        }
        {
            let (windows, shutdown) = (windows.clone(), shutdown.clone());
            threads.push(crate::background::spawn("cwm-autosave", move || {
                while !shutdown.load(Ordering::Relaxed) {
                    std::thread::sleep(AUTOSAVE_TICK);
                    windows.autosave_tick();
                }
            }));
        }
        let start_time = started.elapsed();
        let l2_path = if config.l2_enabled() {
            config.l2_path.display().to_string()
        } else {
            "off".into()
        };
        let leftovers = crate::shm_leftovers::find(std::path::Path::new("/dev/shm"));
        if !leftovers.is_empty() {
            tracing::warn!("{}", crate::shm_leftovers::summary(&leftovers));
        }
        tracing::info!(
            endpoint = %mp_endpoint,
            chunk_size = config.chunk_size,
            l1_gib = config.l1_size_gb,
            l1_pool = cwm.tiers.pool().map(|p| p.shm_name),
            l2_path = %l2_path,
            l1_pool_adopted = cwm.tiers.pool().is_some_and(|p| p.adopted),
            l1_quarantined_bytes = cwm.tiers.quarantined_bytes(),
            registrations_restored = restored.restored,
            engine_contexts_restored = restored.engine_driven,
            registrations_dropped = restored.dropped,
            journal_entries_corrupt = restored.corrupt,
            sessions_restored = sessions.sessions,
            session_chains_restored = sessions.chains,
            session_journal_bytes_dropped = sessions.replay.dropped_bytes,
            session_journal_entries_unopened = sessions.replay.unopened,
            dead_engine_shm_segments = leftovers.len(),
            start_ms = start_time.as_secs_f64() * 1e3,
            "cwm serving the LMCache MP protocol"
        );
        Ok(Sidecar {
            cwm,
            mp_endpoint,
            windows,
            http_addr,
            lm_addr,
            restored,
            start_time,
            http: Some(http),
            shutdown,
            threads,
            drain_timeout: Duration::from_secs(config.drain_timeout_secs),
            stopped: false,
        })
    }

    /// A handle that stops the sidecar when set (e.g. from a signal handler).
    pub fn shutdown_flag(&self) -> Arc<AtomicBool> {
        self.shutdown.clone()
    }

    pub fn stop(mut self) {
        self.stop_threads();
    }

    /// Stop: the MP server answers what it received (its lanes finish their queued transfers)
    /// and closes its port, so requests sent from now on wait in the clients' queues for the
    /// next cwm; then the write-behind queues of L2 and L3 drain, for at most the drain
    /// timeout, and L2 is fsynced and checkpointed.
    fn stop_threads(&mut self) {
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        self.shutdown.store(true, Ordering::Relaxed);
        if let Some(mut http) = self.http.take() {
            http.stop();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.drain_tiers();
        self.cwm.chains.sync_journal();
        self.leave_pool();
    }

    /// With engine-driven engines still registered (and journaled), the pool keeps its name:
    /// they map it, and the next cwm adopts it, so they go on without re-registering. Else the
    /// name goes now, so nothing new attaches to a stopped cwm; the memory goes back to the
    /// system once the last mapping (ours or an engine's) is gone.
    fn leave_pool(&self) {
        let Some(pool) = self.cwm.tiers.pool() else {
            return;
        };
        let engines = self.cwm.engine_driven.len();
        if engines > 0 && self.cwm.journaled() {
            self.cwm.tiers.retain_pool();
            tracing::info!(
                pool = %pool.shm_name,
                engines,
                "L1 pool kept for the next cwm: engine-driven engines map it"
            );
        } else {
            self.cwm.tiers.unlink_pool();
        }
    }

    /// Drain write-behind and checkpoint L2 so a restart finds everything quickly, waiting at
    /// most the drain timeout (what is still queued then is logged and left: its objects are
    /// lost with L1, the tiers stay consistent).
    fn drain_tiers(&self) {
        let started = Instant::now();
        let queued = self.cwm.tiers.stats().write_behind;
        let (done_tx, done) = std::sync::mpsc::channel();
        let cwm = self.cwm.clone();
        let spawned = std::thread::Builder::new()
            .name("cwm-drain".into())
            .spawn(move || {
                cwm.tiers.shutdown();
                let _ = done_tx.send(());
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the drain thread, draining here: {e}");
            self.cwm.tiers.shutdown();
            return;
        }
        match done.recv_timeout(self.drain_timeout) {
            Ok(()) => tracing::info!(
                queued_bytes = queued.queued_bytes,
                ms = started.elapsed().as_secs_f64() * 1e3,
                "write-behind drained, L2 fsynced and checkpointed"
            ),
            Err(_) => {
                let left = self.cwm.tiers.stats().write_behind;
                tracing::error!(
                    queued_bytes = left.queued_bytes,
                    held = left.held,
                    timeout_secs = self.drain_timeout.as_secs(),
                    "write-behind did not drain within the drain timeout \
                     (--drain-timeout-secs): exiting with these writes not done"
                );
            }
        }
    }
}

/// Where the registration journal lives: beside L2 (none without L2: the journal relies on
/// L2's directory lock for having one writer).
fn journal_dir(config: &Config) -> Option<std::path::PathBuf> {
    config
        .l2_enabled()
        .then(|| config.l2_path.join("registrations"))
}

/// The pool engine-driven engines of the previous cwm map, for L1 to adopt (`Tiers::open`
/// makes a new one if it cannot).
fn pool_to_adopt(config: &Config, tiers: &TiersConfig) -> Option<AdoptPool> {
    if !matches!(tiers.l1_memory, L1Memory::Shared(_)) {
        return None;
    }
    let pool = crate::ops::journaled_pool(&journal_dir(config)?)?;
    let size = crate::store::arena::Arena::round_len(tiers.l1.capacity_bytes) as u64;
    if pool.size != size {
        tracing::warn!(
            pool = %pool.name,
            journaled_bytes = pool.size,
            l1_bytes = size,
            "the L1 pool engines map is not adopted: L1's size changed (they re-register when \
             prompted)"
        );
        return None;
    }
    Some(AdoptPool {
        name: pool.name,
        ino: pool.ino,
    })
}

/// Attach the registration journal and reopen what it holds.
fn restore_registrations(cwm: &Arc<Cwm>, config: &Config) -> anyhow::Result<Restored> {
    let Some(dir) = journal_dir(config) else {
        return Ok(Restored::default());
    };
    let journal = Journal::open(&dir)
        .map_err(|e| anyhow::anyhow!("registration journal {}: {e}", dir.display()))?;
    cwm.attach_journal(journal);
    Ok(cwm.restore_registrations())
}

/// Attach the session index journal beside L2 (none without L2) and replay it, so sessions
/// stored before a restart or a crash can still be frozen.
fn restore_sessions(cwm: &Arc<Cwm>, config: &Config) -> anyhow::Result<session::Restored> {
    if !config.l2_enabled() {
        return Ok(session::Restored::default());
    }
    let path = config.l2_path.join("sessions.journal");
    cwm.chains
        .attach_journal(&path, cwm.tiers.sealer().clone())
        .map_err(|e| anyhow::anyhow!("session journal {}: {e}", path.display()))
}

/// Bind the `lm://` port and serve it on its own thread (`server::lm`).
fn start_lm(
    host: &str,
    port: u16,
    cwm: &Arc<Cwm>,
    shutdown: &Arc<AtomicBool>,
    threads: &mut Vec<JoinHandle<()>>,
) -> anyhow::Result<std::net::SocketAddr> {
    let lm = LmServer::bind(host, port)?;
    let addr = lm.addr();
    let (cwm, shutdown) = (cwm.clone(), shutdown.clone());
    threads.push(
        std::thread::Builder::new()
            .name("cwm-lm".into())
            .spawn(move || {
                if let Err(e) = lm.run(cwm, shutdown.clone()) {
                    tracing::error!("lm:// server stopped: {e}");
                    shutdown.store(true, Ordering::Relaxed);
                }
            })?,
    );
    tracing::info!(%addr, "cwm serving LMCache's remote protocol: remote_url lm://{addr}");
    Ok(addr)
}

/// The operations over the tiers `tiers` describes (built by `Tiers::open`).
fn open_cwm(config: &Config, tiers: &TiersConfig) -> anyhow::Result<Arc<Cwm>> {
    let tiers = open_tiers(tiers)?;
    Ok(Cwm::new(
        Settings {
            chunk_size: config.chunk_size,
            session_ttl: Duration::from_secs(config.session_ttl_secs),
            reap: ReapPolicy {
                after_ping: Duration::from_secs(config.worker_reap_timeout_secs),
                never_pinged: Duration::from_secs(config.worker_registration_grace_secs),
            },
            engine_driven_ttl: config.engine_driven_ttl(),
            pin_l1: match config.l1_populate {
                crate::store::populate::L1Populate::Eager => PinScope::All,
                crate::store::populate::L1Populate::Lazy => PinScope::InUse,
            },
        },
        tiers,
    ))
}

/// The window catalog and L2 of a data directory, opened without serving (for `cwm windows`).
/// The sidecar must not be running on the same directory: L2 has one writer.
pub fn open_offline(config: &Config) -> anyhow::Result<Windows> {
    config.validate()?;
    anyhow::ensure!(
        config.l2_enabled(),
        "windows live in L2: --l2-size-gb must be above 0"
    );
    let mut tiers = config.tiers_config()?;
    tiers.l1.capacity_bytes = 1 << 20;
    tiers.l1_memory = L1Memory::Private;
    let cwm = open_cwm(config, &tiers)?;
    Ok(Windows::open(cwm, Some(&config.l2_path), 0)?)
}

/// The tiers, with what to do about a failure in the user's terms.
fn open_tiers(config: &TiersConfig) -> anyhow::Result<Tiers> {
    let tiers = Tiers::open(config).map_err(|e| match e {
        OpenError::Pool { .. } => {
            anyhow::anyhow!("{e}; pass --no-engine-driven to keep L1 in private memory")
        }
        e => e.into(),
    })?;
    if matches!(config.l1_memory, L1Memory::Shared(_)) {
        warn_if_shm_is_short(config.l1.capacity_bytes);
    }
    match tiers.sealer().fingerprint() {
        Some(fingerprint) => tracing::info!(
            %fingerprint,
            "encryption at rest: records written to L2, L3 and window exports are sealed \
             (AES-256-GCM, a key per cache_salt)"
        ),
        None => tracing::debug!("encryption at rest: off (no --encryption-key-file)"),
    }
    Ok(tiers)
}

fn warn_if_shm_is_short(pool_bytes: u64) {
    if let Some(avail) = shm_available_bytes() {
        if avail < pool_bytes {
            tracing::warn!(
                l1_bytes = pool_bytes,
                shm_available = avail,
                "/dev/shm has less room than the L1 budget: L1 will stop growing when /dev/shm \
                 is full. Enlarge /dev/shm (docker: --shm-size) or lower --l1-size-gb; if no \
                 vLLM worker runs on CPU (GPU workers do not use the shared pool), \
                 --no-engine-driven keeps L1 in private memory"
            );
        }
    }
}

fn shm_available_bytes() -> Option<u64> {
    // SAFETY: `statvfs` is plain old data, for which all-zero bytes are a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a zeroed out-struct.
    let rc = unsafe { libc::statvfs(c"/dev/shm".as_ptr(), &mut st) };
    (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.stop_threads();
    }
}
