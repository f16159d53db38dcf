//! The LMCache MP transport: a ZMQ ROUTER socket that LMCache's DEALER clients talk to.
//!
//! One thread owns the ROUTER (ZMQ sockets are single-threaded). It answers cheap ops inline
//! and hands transfer ops (which copy KV memory) to a fixed set of lanes; a client's transfers
//! always go to the same lane, so they run in submission order, as LMCache's affinity pool
//! guarantees. Lanes send replies back over an inproc PUSH/PULL pair that the socket thread
//! polls next to the ROUTER. Frames that cannot be decoded are logged and, whenever a uid and
//! op frame exist to echo, still answered.
//!
//! `CWM_LOG=info,cwm::trace=debug` logs every op as it is answered: its name, uid, the time it
//! waited for its lane and the time its handler ran, so a request can be followed through the
//! server (how BENCHMARKS.md traces a warm vLLM request).

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use connector_protocol::frame::{decode_incoming, Incoming};
use connector_protocol::{Op, Reply};

use crate::ops::{failure_reply, is_transfer, Cwm};

/// The MP port after the stop signal.
struct Stopping {
    since: Instant,
    answered: u64,
    /// Heartbeats answered `false`.
    degraded: u64,
}

/// A received multipart message: routing id, then the client's frames.
type Message = Vec<Vec<u8>>;

const REPLIES: &str = "inproc://cwm-mp-replies";

/// After the stop signal the MP port closes once no request came for this long (a gap inside
/// one engine request, e.g. its prefill between lookup and store, is shorter)...
const STOP_QUIET: Duration = Duration::from_millis(500);
/// ...and when engines are still busy this long after the signal, their heartbeats are
/// answered `false`: the connector then enters its degraded mode and stops sending, so the
/// port can close without a request in flight (its recovery re-registers with the next cwm)...
const STOP_DEGRADE_AFTER: Duration = Duration::from_secs(1);
/// ...and it closes this long after the signal in any case (more than one heartbeat interval,
/// 10 s by default, and its ping timeout).
const STOP_GRACE: Duration = Duration::from_secs(15);

pub struct MpServer {
    ctx: zmq::Context,
    router: zmq::Socket,
    replies: zmq::Socket,
    endpoint: String,
}

impl MpServer {
    /// Bind the ROUTER on `tcp://host:port` (port 0 picks a free one; see `endpoint`).
    pub fn bind(host: &str, port: u16) -> anyhow::Result<MpServer> {
        let ctx = zmq::Context::new();
        let router = ctx.socket(zmq::ROUTER)?;
        router.set_router_mandatory(true)?;
        // A client that never reads its replies gets at most this many queued; the rest are
        // dropped and counted (`send`), so it cannot grow cwm's memory.
        router.set_sndhwm(crate::limits::MP_SEND_HWM)?;
        router.set_rcvhwm(0)?;
        router.set_linger(0)?;
        let endpoint = bind_tcp(&router, host, port)?;
        if !endpoint_is_loopback(&endpoint) {
            tracing::warn!(
                %endpoint,
                "the MP port is bound beyond loopback: the LMCache protocol carries no \
                 credentials, so anyone who can reach this port can read and write every \
                 tenant's KV cache and register engine memory; keep it on loopback or a \
                 trusted pod network (docs/SECURITY.md)"
            );
        }
        let replies = ctx.socket(zmq::PULL)?;
        replies.set_rcvhwm(0)?;
        replies.bind(REPLIES)?;
        Ok(MpServer {
            ctx,
            router,
            replies,
            endpoint,
        })
    }

    /// The bound endpoint, e.g. `tcp://127.0.0.1:5555`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Serve until `shutdown` is set and then no request came for `STOP_QUIET` (at most
    /// `STOP_GRACE`; heartbeats answered `false` from `STOP_DEGRADE_AFTER`). Blocks the
    /// calling thread.
    pub fn run(self, cwm: Arc<Cwm>, lanes: usize, shutdown: Arc<AtomicBool>) -> anyhow::Result<()> {
        let mut lane_tx = Vec::new();
        let mut workers: Vec<JoinHandle<()>> = Vec::new();
        for i in 0..lanes.max(1) {
            let (tx, rx) = mpsc::channel::<(Message, Instant)>();
            let push = self.ctx.socket(zmq::PUSH)?;
            push.set_sndhwm(0)?;
            push.connect(REPLIES)?;
            let cwm = cwm.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("cwm-lane-{i}"))
                    .spawn(move || lane(cwm, rx, push))?,
            );
            lane_tx.push(tx);
        }
        let mut items_buf = [
            self.router.as_poll_item(zmq::POLLIN),
            self.replies.as_poll_item(zmq::POLLIN),
        ];
        // After the stop signal the port keeps answering (STOP_QUIET, STOP_DEGRADE_AFTER,
        // STOP_GRACE): a request a client sent just before or after the signal is answered
        // instead of lost with the socket. The connector never resends one: it would wait out
        // its timeout, and a lost PREPARE_STORE kills an engine.
        // Engines idle at the signal are not waited for (after one last look at the socket).
        let mut stop: Option<Stopping> = None;
        let mut last_request = Instant::now();
        loop {
            if shutdown.load(Ordering::Relaxed) {
                let now = Instant::now();
                let first_look = stop.is_none();
                let st = stop.get_or_insert(Stopping {
                    since: now,
                    answered: 0,
                    degraded: 0,
                });
                let quiet = now.duration_since(last_request) >= STOP_QUIET;
                if !first_look && (quiet || now.duration_since(st.since) >= STOP_GRACE) {
                    tracing::info!(
                        answered_after_stop = st.answered,
                        heartbeats_answered_false = st.degraded,
                        ms = now.duration_since(st.since).as_secs_f64() * 1e3,
                        "MP port closing ({})",
                        if quiet {
                            "no request for the quiet period"
                        } else {
                            "still busy at the end of the grace period"
                        }
                    );
                    break;
                }
            }
            let timeout = if stop.is_some() { 10 } else { 100 };
            zmq::poll(&mut items_buf, timeout)?;
            let (router_ready, replies_ready) =
                (items_buf[0].is_readable(), items_buf[1].is_readable());
            if router_ready {
                while let Ok(msg) = self.router.recv_multipart(zmq::DONTWAIT) {
                    last_request = Instant::now();
                    if let Some(st) = stop.as_mut() {
                        st.answered += 1;
                        if st.since.elapsed() >= STOP_DEGRADE_AFTER && self.degrade(&msg) {
                            st.degraded += 1;
                            continue;
                        }
                    }
                    self.on_message(&cwm, msg, Instant::now(), &lane_tx);
                }
            }
            if replies_ready {
                while let Ok(frames) = self.replies.recv_multipart(zmq::DONTWAIT) {
                    self.send(frames);
                }
            }
            items_buf = [
                self.router.as_poll_item(zmq::POLLIN),
                self.replies.as_poll_item(zmq::POLLIN),
            ];
        }
        drop(lane_tx);
        for w in workers {
            let _ = w.join();
        }
        // Replies the lanes produced before stopping still go out: queued, and given up to a
        // second to leave when the socket closes (linger 0 would drop them).
        while let Ok(frames) = self.replies.recv_multipart(zmq::DONTWAIT) {
            self.send(frames);
        }
        self.router.set_linger(1000)?;
        Ok(())
    }

    /// While stopping: answer a heartbeat `false` (the op's failure value) so its connector
    /// stops sending. Whether `msg` was one.
    fn degrade(&self, msg: &Message) -> bool {
        let frames: Vec<&[u8]> = msg.iter().skip(1).map(Vec::as_slice).collect();
        match decode_incoming(&frames) {
            Ok(Incoming::Request(req)) if req.op == Op::Ping => {
                let reply = Reply::to(&req, failure_reply(&req.op));
                self.send(reply_frames(&msg[0], &reply));
                true
            }
            _ => false,
        }
    }

    fn on_message(
        &self,
        cwm: &Arc<Cwm>,
        msg: Message,
        received: Instant,
        lanes: &[mpsc::Sender<(Message, Instant)>],
    ) {
        let frames: Vec<&[u8]> = msg.iter().skip(1).map(Vec::as_slice).collect();
        match decode_incoming(&frames) {
            Ok(Incoming::Request(req)) if is_transfer(&req.op) => {
                let lane = lane_of(&msg[0], lanes.len());
                if lanes[lane].send((msg, received)).is_err() {
                    tracing::error!("transfer lane {lane} is gone");
                }
            }
            Ok(Incoming::Request(req)) => {
                let reply = handle_guarded(cwm, &req);
                self.send(reply_frames(&msg[0], &Reply::to(&req, reply)));
                trace(&req, Duration::ZERO, received.elapsed());
            }
            Ok(Incoming::Control { .. }) => {
                tracing::debug!("stream control message ignored (cwm offers no streams)");
            }
            Err(e) => {
                tracing::warn!("undecodable request: {}", crate::limits::for_log(&e));
                let echoable = |f: &[u8]| f.len() <= crate::limits::MAX_ECHOED_FRAME;
                if frames.len() >= 2 && !(echoable(frames[0]) && echoable(frames[1])) {
                    // Not a real client's request; echoing would send its bulk back.
                    crate::limits::Limit::MpEcho.refused();
                } else if frames.len() >= 2 {
                    // Echo uid and op with no payload so a waiting client is not left hanging.
                    let reply = Reply {
                        uid: frames[0].to_vec(),
                        op_frame: frames[1].to_vec(),
                        payload: None,
                    };
                    self.send(reply_frames(&msg[0], &reply));
                }
            }
        }
    }

    fn send(&self, frames: Vec<Vec<u8>>) {
        match self.router.send_multipart(frames, zmq::DONTWAIT) {
            Ok(()) => {}
            // The client has MP_SEND_HWM replies it has not read.
            Err(zmq::Error::EAGAIN) => {
                crate::limits::Limit::MpReplyQueue.refused();
                tracing::debug!("reply dropped: the client's reply queue is full");
            }
            // EHOSTUNREACH: the client disconnected before its answer was ready.
            Err(e) => tracing::debug!("reply dropped: {e}"),
        }
    }
}

/// Run a handler, turning a panic (a bug, never input) into the op's failure reply.
fn handle_guarded(cwm: &Arc<Cwm>, req: &connector_protocol::Request<'_>) -> Option<Vec<u8>> {
    let _busy = crate::background::foreground_op();
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cwm.handle(req))) {
        Ok(reply) => reply,
        Err(_) => {
            tracing::error!(
                op = req.op.name(),
                "handler panicked; answering with failure"
            );
            failure_reply(&req.op)
        }
    }
}

fn reply_frames(routing_id: &[u8], reply: &Reply) -> Vec<Vec<u8>> {
    let mut frames = Vec::with_capacity(4);
    frames.push(routing_id.to_vec());
    frames.extend(reply.frames().into_iter().map(<[u8]>::to_vec));
    frames
}

/// Bind `socket` on `tcp://host:port` (`localhost` as 127.0.0.1; port 0 picks a free one) and
/// return the bound endpoint, e.g. `tcp://127.0.0.1:5555`.
pub fn bind_tcp(socket: &zmq::Socket, host: &str, port: u16) -> anyhow::Result<String> {
    let host = if host == "localhost" {
        "127.0.0.1"
    } else {
        host
    };
    let port = if port == 0 {
        "*".to_string()
    } else {
        port.to_string()
    };
    socket
        .bind(&format!("tcp://{host}:{port}"))
        .map_err(|e| anyhow::anyhow!("cannot bind tcp://{host}:{port}: {e}"))?;
    socket
        .get_last_endpoint()?
        .map_err(|_| anyhow::anyhow!("endpoint is not UTF-8"))
}

/// Whether a bound `tcp://ip:port` endpoint listens on loopback only.
fn endpoint_is_loopback(endpoint: &str) -> bool {
    let addr = endpoint.strip_prefix("tcp://").unwrap_or(endpoint);
    addr.parse::<std::net::SocketAddr>()
        .is_ok_and(|a| a.ip().is_loopback())
}

fn lane_of(routing_id: &[u8], lanes: usize) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    routing_id.hash(&mut h);
    (h.finish() % lanes as u64) as usize
}

fn lane(cwm: Arc<Cwm>, rx: mpsc::Receiver<(Message, Instant)>, push: zmq::Socket) {
    for (msg, received) in rx {
        let started = Instant::now();
        let frames: Vec<&[u8]> = msg.iter().skip(1).map(Vec::as_slice).collect();
        let Ok(Incoming::Request(req)) = decode_incoming(&frames) else {
            continue;
        };
        let reply = handle_guarded(&cwm, &req);
        if let Err(e) = push.send_multipart(reply_frames(&msg[0], &Reply::to(&req, reply)), 0) {
            tracing::error!("cannot hand reply to the socket thread: {e}");
        }
        trace(&req, started - received, started.elapsed());
    }
}

/// One answered op for `cwm::trace` (see the module doc): `queued` waiting for a lane, `run`
/// decoding, handling and handing over the reply.
fn trace(req: &connector_protocol::Request<'_>, queued: Duration, run: Duration) {
    tracing::debug!(
        target: "cwm::trace",
        op = req.op.name(),
        // A msgpack int, the client's request counter: as hex, at most 9 bytes.
        uid = %req.uid.iter().take(9).map(|b| format!("{b:02x}")).collect::<String>(),
        queued_us = queued.as_micros() as u64,
        run_us = run.as_micros() as u64,
        "op answered"
    );
}
