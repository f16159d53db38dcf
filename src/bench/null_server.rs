//! The null server: a ZMQ ROUTER that answers every LMCache MP request at once with nothing
//! behind it: every lookup a miss, every store and retrieve acknowledged without copying a
//! byte, engine-driven mode unavailable. It decodes only the frame envelope (uid and op), never
//! a payload, so what a client measures against it is the client's own floor: its encoding,
//! the transport and the decoding of the answer. A server's lookup "as fast as the floor" is
//! measured against this, the same way.
//!
//! `cwm bench --null-server PORT` serves it until killed (for `benches/vs_lmcache.sh`, where
//! LMCache's own client measures it); `cwm bench --realistic` starts one in-process.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::Context;
use connector_protocol::frame::{decode_incoming, Incoming};
use connector_protocol::{codec, Op, Reply, TransferResult};

pub struct NullServer {
    _ctx: zmq::Context,
    router: zmq::Socket,
    endpoint: String,
    chunk_size: u64,
}

impl NullServer {
    /// Bind on `tcp://host:port` (port 0 picks a free one); `get_chunk_size` answers
    /// `chunk_size`, as the server it stands in for would.
    pub fn bind(host: &str, port: u16, chunk_size: u64) -> anyhow::Result<NullServer> {
        let ctx = zmq::Context::new();
        let router = ctx.socket(zmq::ROUTER)?;
        router.set_linger(0)?;
        let endpoint =
            crate::server::mp::bind_tcp(&router, host, port).context("bind the null server")?;
        Ok(NullServer {
            _ctx: ctx,
            router,
            endpoint,
            chunk_size,
        })
    }

    /// The bound endpoint, e.g. `tcp://127.0.0.1:5555`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Answer requests until `shutdown` is set; returns how many were answered.
    pub fn run(&self, shutdown: &AtomicBool) -> anyhow::Result<u64> {
        let mut answered = 0;
        while !shutdown.load(Ordering::Relaxed) {
            if self.router.poll(zmq::POLLIN, 100)? == 0 {
                continue;
            }
            while let Ok(msg) = self.router.recv_multipart(zmq::DONTWAIT) {
                let frames: Vec<&[u8]> = msg.iter().skip(1).map(Vec::as_slice).collect();
                let Ok(Incoming::Request(req)) = decode_incoming(&frames) else {
                    continue;
                };
                let reply = Reply::to(&req, answer(&req.op, self.chunk_size));
                let mut out: Vec<&[u8]> = vec![&msg[0]];
                out.extend(reply.frames());
                // A client gone before its answer is no concern of a floor measurement.
                let _ = self.router.send_multipart(out, zmq::DONTWAIT);
                answered += 1;
            }
        }
        Ok(answered)
    }

    /// Serve on a thread of this process until the returned handle stops it.
    pub fn spawn(self) -> anyhow::Result<RunningNullServer> {
        let endpoint = self.endpoint.clone();
        let shutdown = Arc::new(AtomicBool::new(false));
        let flag = shutdown.clone();
        let thread = std::thread::Builder::new()
            .name("cwm-null-server".into())
            .spawn(move || self.run(&flag))?;
        Ok(RunningNullServer {
            endpoint,
            shutdown,
            thread: Some(thread),
        })
    }
}

/// A null server on a thread; stopped when dropped.
pub struct RunningNullServer {
    pub endpoint: String,
    shutdown: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<u64>>>,
}

impl RunningNullServer {
    /// Stop it; returns how many requests it answered.
    pub fn stop(mut self) -> anyhow::Result<u64> {
        self.shutdown.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(answered)) => answered,
            Some(Err(_)) => anyhow::bail!("the null server's thread panicked"),
            None => Ok(0),
        }
    }
}

impl Drop for RunningNullServer {
    fn drop(&mut self) {
        self.shutdown.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The instant answer to `op`: the value its client reads as "done, nothing there".
fn answer(op: &Op, chunk_size: u64) -> Option<Vec<u8>> {
    match op {
        Op::GetChunkSize => Some(codec::encode_u64(chunk_size)),
        Op::GetExperimental => Some(codec::encode_str_list(&[])),
        Op::Noop => Some(codec::encode_str("OK")),
        Op::Ping => Some(codec::encode_bool(true)),
        Op::Store | Op::Retrieve => Some(TransferResult::DONE.encode()),
        // No chunk hit: the client's scheduler step ends with this one poll.
        Op::QueryPrefetchStatus | Op::WaitPrefetchStatus => Some(codec::encode_u64(0)),
        // Engine-driven mode: answered as unavailable, as cwm answers a failure.
        Op::RegisterKvCacheEngineDrivenContext
        | Op::PrepareStore
        | Op::PrepareRetrieve
        | Op::CommitStore
        | Op::CommitRetrieve => crate::ops::failure_reply(op),
        // register, unregister, lookup, free_lookup_locks, end_session, clear, ...: void.
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::MpClient;
    use connector_protocol::IpcCacheServerKey;

    #[test]
    fn answers_a_scheduler_step_and_transfers_without_a_server_behind_it() {
        let server = NullServer::bind("127.0.0.1", 0, 256)
            .unwrap()
            .spawn()
            .unwrap();
        let mut client = MpClient::connect(&server.endpoint).unwrap();
        assert_eq!(client.get_chunk_size().unwrap(), 256);
        let key = IpcCacheServerKey {
            model_name: "m".into(),
            world_size: 1,
            worker_id: None,
            token_ids: (0..4096).collect(),
            start: 0,
            end: 4096,
            request_id: "r".into(),
            cache_salt: String::new(),
            request_configs: None,
            num_kv_readers: 1,
        };
        client.lookup(&key).unwrap();
        assert_eq!(client.poll_prefetch_status("r").unwrap(), Some(0));
        let stored = client.store(&key, 7, &[vec![1, 2, 3]]).unwrap();
        assert!(stored.ok);
        client.end_session("r").unwrap();
        assert_eq!(server.stop().unwrap(), 5);
    }
}
