//! The `cwm` command line.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use cwm::bench::BenchArgs;
use cwm::config::Config;
use cwm::serve::Sidecar;

#[derive(Parser)]
#[command(
    name = "cwm",
    version,
    about = "KV-cache sidecar for vLLM: a drop-in LMCache server with a native tensor store",
    // A flag given twice takes its last value (scripts append overrides to a base command).
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar (LMCache MP protocol on --port).
    Serve(Box<ServeArgs>),
    /// Measure store/retrieve GB/s and lookup latency through the MP protocol, next to memcpy.
    Bench(BenchArgs),
    /// A stdio MCP server forwarding every tool call to a running sidecar's HTTP /mcp.
    Mcp(McpArgs),
    /// Context windows of a data directory (with the sidecar stopped): list, export, import.
    #[command(subcommand)]
    Windows(WindowsCommand),
    /// What this host offers cwm (CUDA driver and GPUs, pinned-memory limit, /dev/shm, THP)
    /// and what cwm will do with it.
    Doctor {
        /// The L1 budget to check against (GiB), as `serve --l1-size-gb`.
        #[arg(long, default_value_t = 8.0)]
        l1_size_gb: f64,
    },
}

#[derive(Args)]
struct DataDirArgs {
    /// TOML config file (its l2_path and chunk_size are used).
    #[arg(long, env = "CWM_CONFIG")]
    config: Option<PathBuf>,
    /// Directory of the L2 disk tier [default: $XDG_STATE_HOME/cwm, else ~/.local/state/cwm].
    #[arg(long, env = "CWM_L2_PATH")]
    l2_path: Option<PathBuf>,
}

impl DataDirArgs {
    fn open(&self) -> anyhow::Result<cwm::windows::Windows> {
        let mut c = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(p) = &self.l2_path {
            c.l2_path = p.clone();
        }
        cwm::serve::open_offline(&c)
    }
}

#[derive(Subcommand)]
enum WindowsCommand {
    /// List the windows of the data directory.
    List(DataDirArgs),
    /// Write one window to a portable, checksummed file.
    Export {
        name: String,
        file: PathBuf,
        #[command(flatten)]
        dir: DataDirArgs,
    },
    /// Add a window from an exported file to the data directory.
    Import {
        file: PathBuf,
        /// Import under this name instead of the exported one.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        dir: DataDirArgs,
    },
}

#[derive(Args)]
struct McpArgs {
    /// The sidecar's MCP endpoint.
    #[arg(long, env = "CWM_MCP_URL", default_value = "http://127.0.0.1:8080/mcp")]
    url: String,
    /// The sidecar's bearer token (its --http-token), sent with every request.
    #[arg(long, env = "CWM_HTTP_TOKEN", hide_env_values = true)]
    http_token: Option<String>,
}

/// Flags mirror `lmcache server`'s. Each also reads `CWM_<NAME>` from the environment and
/// the key of the same name (with `_`) from the config file.
#[derive(Args)]
struct ServeArgs {
    /// TOML config file.
    #[arg(long, env = "CWM_CONFIG")]
    config: Option<PathBuf>,
    /// Interface for the MP server [default: localhost].
    #[arg(long, env = "CWM_HOST")]
    host: Option<String>,
    /// Port of the MP server [default: 5555].
    #[arg(long, env = "CWM_PORT")]
    port: Option<u16>,
    /// Tokens per chunk [default: 256].
    #[arg(long, env = "CWM_CHUNK_SIZE")]
    chunk_size: Option<usize>,
    /// L1 memory budget in GiB [default: 8].
    #[arg(long, env = "CWM_L1_SIZE_GB")]
    l1_size_gb: Option<f64>,
    /// L1 eviction policy: LRU.
    #[arg(long, env = "CWM_EVICTION_POLICY")]
    eviction_policy: Option<String>,
    /// Chunk hash algorithm: blake3.
    #[arg(long, env = "CWM_HASH_ALGORITHM")]
    hash_algorithm: Option<String>,
    /// Seconds before an unreleased lookup read lock lapses [default: 300].
    #[arg(long, env = "CWM_LOCK_TTL_SECS")]
    lock_ttl_secs: Option<u64>,
    /// Seconds before an idle request session is dropped [default: 600].
    #[arg(long, env = "CWM_SESSION_TTL_SECS")]
    session_ttl_secs: Option<u64>,
    /// When L1's pages are committed: eager (in the background, ahead of use) or lazy (by the
    /// first store touching them) [default: eager].
    #[arg(long, env = "CWM_L1_POPULATE")]
    l1_populate: Option<cwm::store::populate::L1Populate>,
    /// Seconds a worker may be silent after pinging before it is unregistered [default: 120].
    #[arg(long, env = "CWM_WORKER_REAP_TIMEOUT_SECS")]
    worker_reap_timeout_secs: Option<u64>,
    /// Seconds a worker that never pinged stays registered [default: 3600].
    #[arg(long, env = "CWM_WORKER_REGISTRATION_GRACE_SECS")]
    worker_registration_grace_secs: Option<u64>,
    /// Threads serving store/retrieve requests [default: 4].
    #[arg(long, env = "CWM_TRANSFER_LANES")]
    transfer_lanes: Option<usize>,
    /// Serve vLLM's engine-driven transfers (its CPU default) from a shared-memory L1 pool
    /// [default: true]; `--engine-driven false` or `--no-engine-driven` turns it off.
    #[arg(long, env = "CWM_ENGINE_DRIVEN", num_args = 0..=1, default_missing_value = "true")]
    engine_driven: Option<bool>,
    /// Keep L1 in private memory and refuse engine-driven contexts (wins over --engine-driven).
    #[arg(long)]
    no_engine_driven: bool,
    /// Name of the shared-memory L1 pool in /dev/shm [default: cwm_l1_<pid>_<n>].
    #[arg(long, env = "CWM_SHM_NAME")]
    shm_name: Option<String>,
    /// Seconds an engine-driven prepare may wait for its commit before it is released [default: 300].
    #[arg(long, env = "CWM_ENGINE_DRIVEN_TTL_SECS")]
    engine_driven_ttl_secs: Option<u64>,
    /// On SIGTERM/SIGINT, seconds the L2 and L3 write-behind queues may take to drain before
    /// cwm exits anyway; a second signal exits at once [default: 30].
    #[arg(long, env = "CWM_DRAIN_TIMEOUT_SECS")]
    drain_timeout_secs: Option<u64>,
    /// Auto-save every session idle this many seconds after new chunks were stored, as the
    /// window `autosave-<session>` (replaced atomically by the next); needs L2 [default: 0, off].
    #[arg(long, env = "CWM_AUTO_SAVE_IDLE_SECS")]
    auto_save_idle_secs: Option<u64>,
    /// Directory of the L2 disk tier [default: $XDG_STATE_HOME/cwm, else ~/.local/state/cwm].
    #[arg(long, env = "CWM_L2_PATH")]
    l2_path: Option<std::path::PathBuf>,
    /// L2 disk budget in GiB; 0 turns the disk tier off [default: 32].
    #[arg(long, env = "CWM_L2_SIZE_GB")]
    l2_size_gb: Option<f64>,
    /// Size of one L2 segment file in MiB [default: 256].
    #[arg(long, env = "CWM_L2_SEGMENT_MB")]
    l2_segment_mb: Option<u64>,
    /// L2 compression: zstd or none [default: zstd].
    #[arg(long, env = "CWM_L2_COMPRESSION")]
    l2_compression: Option<String>,
    /// zstd level for L2 records [default: 1].
    #[arg(long, env = "CWM_L2_COMPRESSION_LEVEL", allow_negative_numbers = true)]
    l2_compression_level: Option<i32>,
    /// When L2 data is fsynced: always, interval or never [default: interval].
    #[arg(long, env = "CWM_L2_FSYNC")]
    l2_fsync: Option<String>,
    /// Interval of the interval fsync policy in ms [default: 1000].
    #[arg(long, env = "CWM_L2_FSYNC_INTERVAL_MS")]
    l2_fsync_interval_ms: Option<u64>,
    /// MiB of stored objects that may wait for L2 before write-behind drops work [default: 1024].
    #[arg(long, env = "CWM_L2_WRITE_QUEUE_MB")]
    l2_write_queue_mb: Option<u64>,
    /// Port of LMCache's classic remote-server protocol (LMCacheConnectorV1's
    /// `remote_url: "lm://host:port"`) on --host [default: off].
    #[arg(long, env = "CWM_LM_PORT")]
    lm_port: Option<u16>,
    /// Port of the HTTP server: MCP at /mcp, /metrics, /status; 0 picks a free one [default: 8080].
    #[arg(long, env = "CWM_HTTP_PORT")]
    http_port: Option<u16>,
    /// Bearer token for every HTTP route but /healthcheck (MCP included); required when
    /// --host is beyond loopback [default: none].
    #[arg(long, env = "CWM_HTTP_TOKEN", hide_env_values = true)]
    http_token: Option<String>,
    /// L3: one Redis, redis://[user[:password]@]host:port (rediss:// for TLS); the password may
    /// come from CWM_L3_PASSWORD instead [default: no L3].
    #[arg(long, env = "CWM_L3_URL")]
    l3_url: Option<String>,
    /// L3: seed nodes of a Redis Cluster, comma-separated URLs (instead of --l3-url).
    #[arg(long, env = "CWM_L3_CLUSTER")]
    l3_cluster: Option<String>,
    /// Prefix of every L3 key [default: cwm].
    #[arg(long, env = "CWM_L3_NAMESPACE")]
    l3_namespace: Option<String>,
    /// Which chunks go to L3: always, frozen (windows only) or never [default: always].
    #[arg(long, env = "CWM_L3_WRITE")]
    l3_write: Option<String>,
    /// Deadline of one L3 operation in ms [default: 5000].
    #[arg(long, env = "CWM_L3_TIMEOUT_MS")]
    l3_timeout_ms: Option<u64>,
    /// Connections per Redis node [default: 4].
    #[arg(long, env = "CWM_L3_CONNECTIONS")]
    l3_connections: Option<usize>,
    /// TTL of cache chunks in L3, seconds; window chunks have none [default: 86400].
    #[arg(long, env = "CWM_L3_TTL_SECS")]
    l3_ttl_secs: Option<u64>,
    /// MiB of stored objects that may wait for L3 before write-behind drops work; one queue
    /// feeds every tier, holding the larger of this and --l2-write-queue-mb [default: 1024].
    #[arg(long, env = "CWM_L3_WRITE_QUEUE_MB")]
    l3_write_queue_mb: Option<u64>,
    /// PEM file of the CA that signed the Redis servers' certificates (rediss://).
    #[arg(long, env = "CWM_L3_TLS_CA")]
    l3_tls_ca: Option<PathBuf>,
    /// GiB of L1 each cache_salt may occupy unless given its own quota over HTTP
    /// (`PUT /quota/{salt}`); 0: no limit [default: 0].
    #[arg(long, env = "CWM_L1_QUOTA_GB_PER_SALT")]
    l1_quota_gb_per_salt: Option<f64>,
    /// GiB of L2 each cache_salt's records may take (frozen windows included) unless given
    /// its own quota (`PUT /quota/{salt}` with `"tier": "l2"`); 0: no limit [default: 0].
    #[arg(long, env = "CWM_L2_QUOTA_GB_PER_SALT")]
    l2_quota_gb_per_salt: Option<f64>,
    /// GiB each cache_salt's records may take in L3, counted fleet-wide in Redis (give every
    /// sidecar the same), unless given its own quota (`"tier": "l3"`); 0: no limit [default: 0].
    #[arg(long, env = "CWM_L3_QUOTA_GB_PER_SALT")]
    l3_quota_gb_per_salt: Option<f64>,
    /// Encryption at rest: a file of 64 hex digits (`openssl rand -hex 32 > key; chmod 600
    /// key`), readable by its owner only; records in L2, L3 and window exports are sealed
    /// with a key per cache_salt derived from it [default: off].
    #[arg(long, env = "CWM_ENCRYPTION_KEY_FILE")]
    encryption_key_file: Option<PathBuf>,
}

impl ServeArgs {
    fn into_config(self) -> anyhow::Result<Config> {
        let mut c = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        macro_rules! overlay {
            ($($field:ident),*) => { $( if let Some(v) = self.$field { c.$field = v; } )* };
        }
        overlay!(
            host,
            port,
            chunk_size,
            l1_size_gb,
            l1_populate,
            eviction_policy,
            hash_algorithm,
            lock_ttl_secs,
            session_ttl_secs,
            worker_reap_timeout_secs,
            worker_registration_grace_secs,
            transfer_lanes,
            engine_driven,
            engine_driven_ttl_secs,
            drain_timeout_secs,
            auto_save_idle_secs,
            l2_path,
            l2_size_gb,
            l2_segment_mb,
            l2_compression,
            l2_compression_level,
            l2_fsync,
            l2_fsync_interval_ms,
            l2_write_queue_mb,
            http_port,
            l3_namespace,
            l3_write,
            l3_timeout_ms,
            l3_connections,
            l3_ttl_secs,
            l3_write_queue_mb,
            l1_quota_gb_per_salt,
            l2_quota_gb_per_salt,
            l3_quota_gb_per_salt
        );
        for (field, value) in [
            (&mut c.l3_url, self.l3_url),
            (&mut c.l3_cluster, self.l3_cluster),
        ] {
            if value.is_some() {
                *field = value;
            }
        }
        if self.l3_tls_ca.is_some() {
            c.l3_tls_ca = self.l3_tls_ca;
        }
        if self.encryption_key_file.is_some() {
            c.encryption_key_file = self.encryption_key_file;
        }
        if self.shm_name.is_some() {
            c.shm_name = self.shm_name;
        }
        if self.http_token.is_some() {
            c.http_token = self.http_token;
        }
        if self.lm_port.is_some() {
            c.lm_port = self.lm_port;
        }
        if self.no_engine_driven {
            c.engine_driven = false;
        }
        c.validate()?;
        Ok(c)
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The bench's own server would log every registration and clear; its report is the output.
    let default_log = match cli.command {
        Command::Serve(_) => "info",
        Command::Bench(_) | Command::Mcp(_) | Command::Windows(_) | Command::Doctor { .. } => {
            "warn"
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CWM_LOG")
                .unwrap_or_else(|_| default_log.into()),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file or journald gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Serve(args) => serve(args.into_config()?),
        Command::Bench(args) => cwm::bench::run(&args),
        Command::Mcp(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(cwm::mcp::forward_stdio(
                &args.url,
                args.http_token.as_deref(),
            )),
        Command::Windows(cmd) => windows(cmd),
        Command::Doctor { l1_size_gb } => {
            print!(
                "{}",
                cwm::doctor::report((l1_size_gb.max(0.0) * (1u64 << 30) as f64) as u64)
            );
            Ok(())
        }
    }
}

fn windows(cmd: WindowsCommand) -> anyhow::Result<()> {
    match cmd {
        WindowsCommand::List(dir) => {
            let list = dir.open()?.list(&cwm::windows::ListRequest {
                limit: Some(500),
                ..Default::default()
            })?;
            println!("{}", serde_json::to_string_pretty(&list)?);
        }
        WindowsCommand::Export { name, file, dir } => {
            let bytes = dir.open()?.export(&name, &file)?;
            println!(
                "exported window {name} to {} ({bytes} bytes)",
                file.display()
            );
        }
        WindowsCommand::Import { file, name, dir } => {
            // Verified before the data directory is opened: a refused import creates nothing.
            let file = cwm::windows::export::WindowFile::read(&file, name.as_deref())?;
            let w = dir.open()?.import(&file)?;
            println!("{}", serde_json::to_string_pretty(&w)?);
        }
    }
    Ok(())
}

fn serve(config: Config) -> anyhow::Result<()> {
    let sidecar = Sidecar::start(&config)?;
    let stop = sidecar.shutdown_flag();
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // The second signal exits at once (status 130): registered first, it sees the flag
        // the first one set.
        signal_hook::flag::register_conditional_shutdown(signal, 130, stop.clone())?;
        signal_hook::flag::register(signal, stop.clone())?;
    }
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
    }
    tracing::info!("shutting down (a second SIGTERM/SIGINT exits at once)");
    sidecar.stop();
    Ok(())
}
