//! A small blocking MP client (ZMQ DEALER), speaking exactly what LMCache's client sends.
//! Used by `cwm bench` and the integration tests; the real LMCache client is exercised by
//! `tests/interop`.

use std::time::Duration;

use connector_protocol::{
    codec, BlockAllocationRecord, EngineGroupInfo, IpcCacheServerKey, IpcDescriptor, LayoutHints,
    Op, PrepareRetrieveResponse, PrepareStoreResponse, RegisterEngineDrivenContextPayload,
    RegisterEngineDrivenContextResponse, TransferResult,
};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("zmq: {0}")]
    Zmq(#[from] zmq::Error),
    #[error("no reply to {op} within {timeout:?}")]
    Timeout { op: String, timeout: Duration },
    #[error("bad reply to {op}: {reason}")]
    BadReply { op: String, reason: String },
}

pub struct MpClient {
    _ctx: zmq::Context,
    socket: zmq::Socket,
    next_uid: u64,
    pub timeout: Duration,
}

/// The event handle LMCache's CPU client sends (`stub_cpu_device.py`).
const STUB_EVENT: &[u8] = b"stub_ipc_handle";

impl MpClient {
    pub fn connect(endpoint: &str) -> Result<MpClient, ClientError> {
        let ctx = zmq::Context::new();
        let socket = ctx.socket(zmq::DEALER)?;
        socket.set_linger(0)?;
        socket.set_reconnect_ivl_max(1000)?;
        socket.connect(endpoint)?;
        Ok(MpClient {
            _ctx: ctx,
            socket,
            next_uid: 0,
            timeout: Duration::from_secs(10),
        })
    }

    /// Send raw frames (uid and op included) without waiting: for malformed-input tests.
    pub fn send_raw(&self, frames: &[Vec<u8>]) -> Result<(), ClientError> {
        self.socket.send_multipart(frames, 0)?;
        Ok(())
    }

    /// Receive one raw reply (uid, op, payload?) or time out.
    pub fn recv_raw(&self) -> Result<Option<Vec<Vec<u8>>>, ClientError> {
        if self
            .socket
            .poll(zmq::POLLIN, self.timeout.as_millis() as i64)?
            == 0
        {
            return Ok(None);
        }
        Ok(Some(self.socket.recv_multipart(0)?))
    }

    /// One RPC: returns the payload frame (None = the server sent no payload).
    pub fn call(&mut self, op: Op, payloads: &[Vec<u8>]) -> Result<Option<Vec<u8>>, ClientError> {
        let uid = codec::encode_u64(self.next_uid);
        self.next_uid += 1;
        let mut frames = vec![uid.clone(), op.to_frame()];
        frames.extend_from_slice(payloads);
        self.send_raw(&frames)?;
        loop {
            let Some(mut reply) = self.recv_raw()? else {
                return Err(ClientError::Timeout {
                    op: op.name().to_string(),
                    timeout: self.timeout,
                });
            };
            if reply.first() != Some(&uid) {
                continue; // a late reply to an earlier, timed-out call
            }
            if reply.len() < 2 || reply.len() > 3 {
                return Err(ClientError::BadReply {
                    op: op.name().into(),
                    reason: format!("{} frames", reply.len()),
                });
            }
            return Ok(if reply.len() == 3 { reply.pop() } else { None });
        }
    }

    fn bad(op: &Op, e: impl std::fmt::Display) -> ClientError {
        ClientError::BadReply {
            op: op.name().into(),
            reason: e.to_string(),
        }
    }

    fn call_u64(&mut self, op: Op, payloads: &[Vec<u8>]) -> Result<u64, ClientError> {
        let payload = self
            .call(op.clone(), payloads)?
            .ok_or_else(|| Self::bad(&op, "no payload"))?;
        codec::decode_u64("result", &payload).map_err(|e| Self::bad(&op, e))
    }

    fn call_transfer(
        &mut self,
        op: Op,
        payloads: &[Vec<u8>],
    ) -> Result<TransferResult, ClientError> {
        let payload = self
            .call(op.clone(), payloads)?
            .ok_or_else(|| Self::bad(&op, "no payload"))?;
        TransferResult::decode(&payload).map_err(|e| Self::bad(&op, e))
    }

    pub fn get_chunk_size(&mut self) -> Result<u64, ClientError> {
        self.call_u64(Op::GetChunkSize, &[])
    }

    pub fn ping(&mut self, instance_id: Option<u64>) -> Result<bool, ClientError> {
        let arg = instance_id.map_or_else(codec::encode_nil, codec::encode_u64);
        let payload = self
            .call(Op::Ping, &[arg])?
            .ok_or_else(|| Self::bad(&Op::Ping, "no payload"))?;
        codec::decode_bool("result", &payload).map_err(|e| Self::bad(&Op::Ping, e))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn register_kv_cache(
        &mut self,
        instance_id: u64,
        descriptors: &[IpcDescriptor],
        model: &str,
        world_size: u32,
        kv_layout: Option<&str>,
        groups: &[EngineGroupInfo],
    ) -> Result<(), ClientError> {
        let request = crate::ops::RegisterKvCache {
            instance_id,
            descriptors: descriptors.to_vec(),
            model_name: model.to_string(),
            world_size: world_size as u64,
            engine_type: "vllm".into(),
            layout_hints: LayoutHints {
                kv_layout: kv_layout.map(str::to_string),
            },
            engine_groups: groups.to_vec(),
        };
        let frames = request
            .to_frames()
            .ok_or_else(|| Self::bad(&Op::RegisterKvCache, "unsupported descriptor kind"))?;
        self.call(Op::RegisterKvCache, &frames)?;
        Ok(())
    }

    pub fn unregister_kv_cache(&mut self, instance_id: u64) -> Result<(), ClientError> {
        self.call(Op::UnregisterKvCache, &[codec::encode_u64(instance_id)])?;
        Ok(())
    }

    /// `store` with the CPU client's stub event handle.
    pub fn store(
        &mut self,
        key: &IpcCacheServerKey,
        instance_id: u64,
        blocks: &[Vec<u32>],
    ) -> Result<TransferResult, ClientError> {
        self.store_after(key, instance_id, blocks, STUB_EVENT)
    }

    /// `store` ordered after the engine's event `event` (a CUDA IPC event handle).
    pub fn store_after(
        &mut self,
        key: &IpcCacheServerKey,
        instance_id: u64,
        blocks: &[Vec<u32>],
        event: &[u8],
    ) -> Result<TransferResult, ClientError> {
        let payloads = [
            codec::encode(key),
            codec::encode_u64(instance_id),
            codec::encode_block_ids(blocks),
            codec::encode_bin(event),
        ];
        self.call_transfer(Op::Store, &payloads)
    }

    /// `retrieve` with the CPU client's stub event handle.
    pub fn retrieve(
        &mut self,
        key: &IpcCacheServerKey,
        instance_id: u64,
        blocks: &[Vec<u32>],
        skip_tokens: u64,
    ) -> Result<TransferResult, ClientError> {
        self.retrieve_after(key, instance_id, blocks, STUB_EVENT, skip_tokens)
    }

    /// `retrieve` ordered after the engine's event `event`.
    pub fn retrieve_after(
        &mut self,
        key: &IpcCacheServerKey,
        instance_id: u64,
        blocks: &[Vec<u32>],
        event: &[u8],
        skip_tokens: u64,
    ) -> Result<TransferResult, ClientError> {
        let payloads = [
            codec::encode(key),
            codec::encode_u64(instance_id),
            codec::encode_block_ids(blocks),
            codec::encode_bin(event),
            codec::encode_u64(skip_tokens),
        ];
        self.call_transfer(Op::Retrieve, &payloads)
    }

    pub fn lookup(&mut self, key: &IpcCacheServerKey) -> Result<(), ClientError> {
        self.call(Op::Lookup, &[codec::encode(key), codec::encode_u64(1)])?;
        Ok(())
    }

    pub fn query_prefetch_status(&mut self, request_id: &str) -> Result<u64, ClientError> {
        self.call_u64(Op::QueryPrefetchStatus, &[codec::encode_str(request_id)])
    }

    /// `query_prefetch_status` as the protocol allows it: `None` while the lookup is still
    /// running (no payload frame, or a msgpack nil).
    pub fn poll_prefetch_status(&mut self, request_id: &str) -> Result<Option<u64>, ClientError> {
        let op = Op::QueryPrefetchStatus;
        match self.call(op.clone(), &[codec::encode_str(request_id)])? {
            None => Ok(None),
            Some(payload) => {
                codec::decode_opt_u64("result", &payload).map_err(|e| Self::bad(&op, e))
            }
        }
    }

    pub fn free_lookup_locks(&mut self, key: &IpcCacheServerKey) -> Result<(), ClientError> {
        self.call(
            Op::FreeLookupLocks,
            &[codec::encode(key), codec::encode_u64(1)],
        )?;
        Ok(())
    }

    pub fn end_session(&mut self, request_id: &str) -> Result<(), ClientError> {
        self.call(Op::EndSession, &[codec::encode_str(request_id)])?;
        Ok(())
    }

    pub fn report_block_allocation(
        &mut self,
        pid: u64,
        model: &str,
        records: &[BlockAllocationRecord],
    ) -> Result<(), ClientError> {
        self.call(
            Op::ReportBlockAllocation,
            &[
                codec::encode_u64(pid),
                codec::encode_str(model),
                codec::encode(records),
            ],
        )?;
        Ok(())
    }

    pub fn clear(&mut self, force: bool) -> Result<(), ClientError> {
        self.call(Op::Clear, &[codec::encode_bool(force)])?;
        Ok(())
    }

    fn call_decoded<T: serde::de::DeserializeOwned>(
        &mut self,
        op: Op,
        payloads: &[Vec<u8>],
    ) -> Result<T, ClientError> {
        let payload = self
            .call(op.clone(), payloads)?
            .ok_or_else(|| Self::bad(&op, "no payload"))?;
        codec::decode("result", &payload).map_err(|e| Self::bad(&op, e))
    }

    fn call_bool(&mut self, op: Op, payloads: &[Vec<u8>]) -> Result<bool, ClientError> {
        let payload = self
            .call(op.clone(), payloads)?
            .ok_or_else(|| Self::bad(&op, "no payload"))?;
        codec::decode_bool("result", &payload).map_err(|e| Self::bad(&op, e))
    }

    /// Engine-driven mode: register a worker; the answer names the pool to map.
    pub fn register_engine_driven_context(
        &mut self,
        payload: &RegisterEngineDrivenContextPayload,
    ) -> Result<RegisterEngineDrivenContextResponse, ClientError> {
        self.call_decoded(
            Op::RegisterKvCacheEngineDrivenContext,
            &[codec::encode(payload)],
        )
    }

    pub fn unregister_engine_driven_context(
        &mut self,
        instance_id: u64,
    ) -> Result<(), ClientError> {
        self.call(
            Op::UnregisterKvCacheEngineDrivenContext,
            &[codec::encode_u64(instance_id)],
        )?;
        Ok(())
    }

    /// The raw `prepare_store` reply: `{"context": {}}` (no slots offered) decodes to empty
    /// lists too; use `call` to tell the two apart.
    pub fn prepare_store(
        &mut self,
        key: &IpcCacheServerKey,
        instance_id: u64,
    ) -> Result<PrepareStoreResponse, ClientError> {
        self.call_decoded(
            Op::PrepareStore,
            &[codec::encode(key), codec::encode_u64(instance_id)],
        )
    }

    /// `data` empty in shared-memory mode (what LMCache's client sends); pickle bytes otherwise.
    pub fn commit_store(
        &mut self,
        key: &IpcCacheServerKey,
        instance_id: u64,
        data: &[u8],
    ) -> Result<bool, ClientError> {
        self.call_bool(
            Op::CommitStore,
            &[
                codec::encode(key),
                codec::encode_u64(instance_id),
                codec::encode_bin(data),
            ],
        )
    }

    pub fn prepare_retrieve(
        &mut self,
        key: &IpcCacheServerKey,
        instance_id: u64,
    ) -> Result<PrepareRetrieveResponse, ClientError> {
        self.call_decoded(
            Op::PrepareRetrieve,
            &[codec::encode(key), codec::encode_u64(instance_id)],
        )
    }

    pub fn commit_retrieve(
        &mut self,
        key: &IpcCacheServerKey,
        instance_id: u64,
    ) -> Result<bool, ClientError> {
        self.call_bool(
            Op::CommitRetrieve,
            &[codec::encode(key), codec::encode_u64(instance_id)],
        )
    }
}
