//! LMCache's classic remote-server transport (`remote_url: "lm://host:port"`, `--lm-port`):
//! what `lmcache_server` / `python -m lmcache.v1.server` serves to LMCache's in-process
//! connector (`LMCacheConnectorV1`), on cwm's tiers.
//!
//! Blocking TCP with a thread per connection, as the reference server, capped at
//! `LM_MAX_CONNECTIONS` (LMCache opens one connection per vLLM worker and sends one request at
//! a time on it). Each request is decoded (`connector_protocol::lm`) and run as a command of
//! `ops::remote`; requests on a connection run in order. What a client gets:
//!
//! - PUT: no reply (as the reference). A payload larger than L1 is read and dropped, so the
//!   connection stays in step; a key cwm cannot store under is read and not stored.
//! - GET: a hit's header and exact bytes, or a miss header. EXIST: 200 or 400. HEALTH: 200.
//! - LIST: no reply, as the reference server (it has no case for LIST; the stock client never
//!   sends it).
//! - A header that does not decode (unknown codes, a key LMCache itself could not parse), a
//!   connection closed or silent for `LM_STALL_SECS` in the middle of a request, or a reply
//!   the client does not read within that time: the connection is closed (the reference closes
//!   on the same headers); other clients are not affected.
//!
//! Every request is counted per op (`cwm_ops_total{op="lm_get"}`, ...), every dropped client
//! and refused connection per limit (`cwm_refused_total{limit="lm_frame"}`, ...).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use connector_protocol::lm::{
    ClientHeader, Command, ServerHeader, CLIENT_HEADER_LEN, SERVER_HEADER_LEN,
};
use thiserror::Error;

use crate::limits::{for_log, Limit, LM_MAX_CONNECTIONS, LM_STALL_SECS};
use crate::ops::remote::{RemoteExists, RemoteGet, RemoteObject, RemotePut};
use crate::ops::Cwm;

/// How often blocked reads and the accept loop look at the shutdown flag.
const POLL: Duration = Duration::from_millis(200);
/// A PUT payload is read in pieces of at most this many bytes, so memory grows with what the
/// client actually sends, not with the length it claims.
const READ_PIECE: usize = 8 << 20;

pub struct LmServer {
    listener: TcpListener,
    addr: SocketAddr,
}

impl LmServer {
    /// Bind `host:port` (port 0 picks a free one; see `addr`).
    pub fn bind(host: &str, port: u16) -> anyhow::Result<LmServer> {
        let host = if host.eq_ignore_ascii_case("localhost") {
            "127.0.0.1"
        } else {
            host.trim_start_matches('[').trim_end_matches(']')
        };
        let listener = TcpListener::bind((host, port))
            .map_err(|e| anyhow::anyhow!("cannot bind the lm:// port {host}:{port}: {e}"))?;
        let addr = listener.local_addr()?;
        if !addr.ip().is_loopback() {
            tracing::warn!(
                %addr,
                "the lm:// port is bound beyond loopback: LMCache's remote protocol carries no \
                 credentials, so anyone who can reach this port can read and write every \
                 object stored over it; keep it on loopback or a trusted pod network \
                 (docs/SECURITY.md)"
            );
        }
        listener.set_nonblocking(true)?;
        Ok(LmServer { listener, addr })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serve until `shutdown` is set, then wait for the connections' threads. Blocks.
    pub fn run(self, cwm: Arc<Cwm>, shutdown: Arc<AtomicBool>) -> anyhow::Result<()> {
        let mut connections: Vec<JoinHandle<()>> = Vec::new();
        while !shutdown.load(Ordering::Relaxed) {
            let (stream, peer) = match self.listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(POLL / 4);
                    continue;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors and the like: the listener is fine, try again.
                    tracing::warn!("lm:// accept failed: {e}");
                    std::thread::sleep(POLL);
                    continue;
                }
            };
            connections.retain(|c| !c.is_finished());
            if connections.len() >= LM_MAX_CONNECTIONS {
                Limit::LmConnections.refused();
                tracing::warn!(
                    %peer,
                    open = connections.len(),
                    "lm:// connection refused: too many open connections"
                );
                continue;
            }
            let (cwm, shutdown) = (cwm.clone(), shutdown.clone());
            let spawned = std::thread::Builder::new()
                .name("cwm-lm-conn".into())
                .spawn(move || Connection::new(stream, peer, shutdown).serve(&cwm));
            match spawned {
                Ok(handle) => connections.push(handle),
                Err(e) => tracing::warn!(%peer, "lm:// connection dropped: no thread: {e}"),
            }
        }
        for c in connections {
            let _ = c.join();
        }
        Ok(())
    }
}

/// Why a connection ends.
#[derive(Debug, Error)]
enum End {
    #[error("closed by the client")]
    Closed,
    #[error("shutting down")]
    Shutdown,
    #[error("closed in the middle of a request ({got} of {want} bytes)")]
    Truncated { got: usize, want: usize },
    #[error("silent for {LM_STALL_SECS} s in the middle of a request")]
    Stalled,
    #[error("malformed header: {0}")]
    Malformed(#[from] connector_protocol::lm::LmError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// What a request is answered.
enum Answer {
    /// PUT, LIST.
    Nothing,
    Header(ServerHeader),
    /// A GET hit: its header, then its bytes.
    Object(RemoteObject),
}

struct Connection {
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: Arc<AtomicBool>,
}

impl Connection {
    fn new(stream: TcpStream, peer: SocketAddr, shutdown: Arc<AtomicBool>) -> Connection {
        Connection {
            stream,
            peer,
            shutdown,
        }
    }

    fn serve(mut self, cwm: &Arc<Cwm>) {
        let setup = self
            .stream
            .set_nonblocking(false)
            .and_then(|()| self.stream.set_nodelay(true))
            .and_then(|()| self.stream.set_read_timeout(Some(POLL)))
            .and_then(|()| {
                self.stream
                    .set_write_timeout(Some(Duration::from_secs(LM_STALL_SECS)))
            });
        if let Err(e) = setup {
            tracing::warn!(peer = %self.peer, "lm:// connection dropped: {e}");
            return;
        }
        tracing::debug!(peer = %self.peer, "lm:// client connected");
        let end = loop {
            if let Err(end) = self.request(cwm) {
                break end;
            }
        };
        match end {
            End::Closed | End::Shutdown => {
                tracing::debug!(peer = %self.peer, "lm:// client gone: {end}")
            }
            End::Io(_) => tracing::info!(peer = %self.peer, "lm:// client dropped: {end}"),
            End::Truncated { .. } | End::Stalled | End::Malformed(_) => {
                Limit::LmFrame.refused();
                tracing::warn!(peer = %self.peer, "lm:// client dropped: {}", for_log(&end));
            }
        }
    }

    /// Read, run and answer one request.
    fn request(&mut self, cwm: &Arc<Cwm>) -> Result<(), End> {
        let mut raw = [0u8; CLIENT_HEADER_LEN];
        self.fill(&mut raw, false)?;
        let _busy = crate::background::foreground_op();
        let started = Instant::now();
        let header = ClientHeader::decode(&raw)?;
        let op = match header.command {
            Command::Put => "lm_put",
            Command::Get => "lm_get",
            Command::Exist => "lm_exist",
            Command::List => "lm_list",
            Command::Health => "lm_health",
        };
        let (answer, failed) = match header.command {
            Command::Put => (Answer::Nothing, self.put(cwm, header)?),
            Command::Get => match (RemoteGet { key: header.key }).run(cwm) {
                Ok(Some(object)) => (Answer::Object(object), None),
                Ok(None) => (Answer::Header(ServerHeader::MISS), None),
                Err(e) => (Answer::Header(ServerHeader::MISS), Some(e.to_string())),
            },
            Command::Exist => match (RemoteExists { key: header.key }).run(cwm) {
                Ok(true) => (Answer::Header(ServerHeader::OK), None),
                Ok(false) => (Answer::Header(ServerHeader::MISS), None),
                Err(e) => (Answer::Header(ServerHeader::MISS), Some(e.to_string())),
            },
            Command::Health => (Answer::Header(ServerHeader::OK), None),
            Command::List => (Answer::Nothing, None),
        };
        // Counted before the answer leaves: a client that has it sees it in /metrics.
        cwm.counters.record_op(op, started.elapsed());
        if let Some(why) = failed {
            cwm.counters.record_error(op);
            tracing::warn!(peer = %self.peer, op, "{}", for_log(why));
        }
        match answer {
            Answer::Nothing => Ok(()),
            Answer::Header(h) => self.send_header(&h),
            Answer::Object(object) => {
                let payload = object.payload();
                self.send_header(&ServerHeader::hit(payload.len() as u32, object.meta))?;
                self.stream.write_all(payload)?;
                Ok(())
            }
        }
    }

    /// PUT: read the payload and store it. `Some(why)` when it was not stored.
    fn put(&mut self, cwm: &Arc<Cwm>, header: ClientHeader) -> Result<Option<String>, End> {
        let len = header.length as usize;
        let l1 = cwm.tiers.l1_occupancy().capacity_bytes;
        if len as u64 >= l1 {
            self.discard(len)?;
            Limit::LmObjectSize.refused();
            return Ok(Some(format!(
                "a {len}-byte object does not fit L1 ({l1} bytes): read and dropped"
            )));
        }
        let mut put = RemotePut::new(header.key, header.meta);
        let buffer = put.buffer();
        let mut left = len;
        while left > 0 {
            let piece = left.min(READ_PIECE);
            let start = buffer.len();
            buffer.resize(start + piece, 0);
            self.fill(&mut buffer[start..], true).map_err(|e| match e {
                End::Truncated { got, .. } => End::Truncated {
                    got: len - left + got,
                    want: len,
                },
                e => e,
            })?;
            left -= piece;
        }
        Ok(put.run(cwm).err().map(|e| e.to_string()))
    }

    /// A reply header in one write: the client reads it with a single `recv(36)`.
    fn send_header(&mut self, header: &ServerHeader) -> Result<(), End> {
        let bytes: [u8; SERVER_HEADER_LEN] = header.encode();
        self.stream.write_all(&bytes)?;
        Ok(())
    }

    /// Fill `buf` from the client. `in_request`: part of the request was already read, so a
    /// close is a truncation and silence is bounded.
    fn fill(&mut self, buf: &mut [u8], in_request: bool) -> Result<(), End> {
        let mut got = 0;
        let mut progress = Instant::now();
        while got < buf.len() {
            match self.stream.read(&mut buf[got..]) {
                Ok(0) if got == 0 && !in_request => return Err(End::Closed),
                Ok(0) => {
                    return Err(End::Truncated {
                        got,
                        want: buf.len(),
                    })
                }
                Ok(n) => {
                    got += n;
                    progress = Instant::now();
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if self.shutdown.load(Ordering::Relaxed) {
                        return Err(End::Shutdown);
                    }
                    if (got > 0 || in_request)
                        && progress.elapsed() > Duration::from_secs(LM_STALL_SECS)
                    {
                        return Err(End::Stalled);
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Read and drop `len` bytes.
    fn discard(&mut self, len: usize) -> Result<(), End> {
        let mut scratch = vec![0u8; 64 << 10];
        let mut left = len;
        while left > 0 {
            let piece = left.min(scratch.len());
            self.fill(&mut scratch[..piece], true)?;
            left -= piece;
        }
        Ok(())
    }
}
