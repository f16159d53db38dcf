//! The server's receive path: split the input into ZMQ frames, decode them with
//! `decode_incoming`, check the arity, and decode every payload with the op's typed decoder.
//! No input may panic; values that decode must re-encode stably.
#![no_main]

mod common;

use common::{descriptors, split_frames, typed};
use connector_protocol::codec;
use connector_protocol::frame::{decode_incoming, Incoming};
use connector_protocol::*;
use libfuzzer_sys::fuzz_target;

fn key(frame: &[u8]) {
    typed::<IpcCacheServerKey>("key", frame);
    if let Ok(k) = codec::decode::<IpcCacheServerKey>("key", frame) {
        // What the server does next with a key: hash it and build object keys.
        let hasher = TokenHasher::new(16);
        let end = usize::try_from(k.end).unwrap_or(usize::MAX);
        let start = usize::try_from(k.start).unwrap_or(usize::MAX);
        let _ = hasher.chunk_hashes(&k.token_ids, start, end);
        let _ = validate_model_name(&k.model_name);
        let _ = validate_cache_salt(&k.cache_salt);
        let _ = checked_kv_rank(k.world_size, k.worker_id.unwrap_or(0));
    }
}

fn payloads(op: &Op, p: &[&[u8]]) {
    let u64_ = |f: &[u8]| {
        let _ = codec::decode_u64("int", f);
    };
    let str_ = |f: &[u8]| {
        let _ = codec::decode_str("str", f);
    };
    match (op, p) {
        (Op::Ping, [id]) => {
            let _ = codec::decode_opt_u64("instance_id", id);
        }
        (Op::RegisterKvCache, [iid, kv, model, ws, engine, hints, groups]) => {
            u64_(iid);
            descriptors(kv);
            str_(model);
            u64_(ws);
            str_(engine);
            typed::<LayoutHints>("layout_hints", hints);
            typed::<Vec<EngineGroupInfo>>("engine_group_infos", groups);
        }
        (Op::UnregisterKvCache | Op::UnregisterKvCacheEngineDrivenContext, [iid]) => u64_(iid),
        (Op::Lookup | Op::FreeLookupLocks, [k, tp]) => {
            key(k);
            u64_(tp);
        }
        (Op::QueryPrefetchStatus | Op::EndSession, [rid]) => str_(rid),
        (Op::WaitPrefetchStatus, [rid, timeout]) => {
            str_(rid);
            let _ = codec::decode_f64("timeout", timeout);
        }
        (Op::Store, [k, iid, blocks, event]) | (Op::Retrieve, [k, iid, blocks, event, _]) => {
            key(k);
            u64_(iid);
            if let Ok(ids) = codec::decode_block_ids(blocks) {
                assert_eq!(
                    codec::decode_block_ids(&codec::encode_block_ids(&ids)),
                    Ok(ids)
                );
            }
            let _ = codec::decode_bin("event_ipc_handle", event);
            if let [.., skip] = p {
                if *op == Op::Retrieve {
                    u64_(skip);
                }
            }
        }
        (Op::Clear, [force]) => {
            let _ = codec::decode_bool("force", force);
        }
        (Op::ReportBlockAllocation, [pid, model, records]) => {
            u64_(pid);
            str_(model);
            typed::<Vec<BlockAllocationRecord>>("records", records);
        }
        (Op::RegisterKvCacheEngineDrivenContext, [payload]) => {
            typed::<RegisterEngineDrivenContextPayload>("payload", payload);
        }
        (Op::PrepareStore | Op::PrepareRetrieve | Op::CommitRetrieve, [k, iid]) => {
            key(k);
            u64_(iid);
        }
        (Op::CommitStore, [k, iid, data]) => {
            key(k);
            u64_(iid);
            let _ = codec::decode_bin("data", data);
        }
        (Op::SubscribeKvEvents, [iid, model, cursor, max]) => {
            u64_(iid);
            str_(model);
            let _ = codec::decode_i64("cursor", cursor);
            u64_(max);
        }
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let frames = split_frames(data);
    match decode_incoming(&frames) {
        Ok(Incoming::Request(req)) => {
            // The reply echoes uid and op frames verbatim.
            let reply = Reply::to(&req, None);
            assert_eq!(reply.frames(), vec![req.uid, req.op_frame]);
            assert_eq!(Op::from_frame(req.op_frame).as_ref(), Ok(&req.op));
            if let Ok(p) = req.expect_arity() {
                payloads(&req.op, p);
            }
            // Also feed every payload to the response decoders.
            for p in &req.payloads {
                let _ = TransferResult::decode(p);
                typed::<PrepareRetrieveResponse>("resp", p);
                typed::<PrepareStoreResponse>("resp", p);
            }
        }
        Ok(Incoming::Control { .. }) => {}
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
