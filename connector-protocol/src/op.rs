//! Operation identifiers: the frozen legacy id table (`transport/zmq_impl/wire.py`) and names.
//!
//! A request's op frame is a msgpack positive int (legacy id) or a msgpack str (name). A server
//! must accept both for any op; replies echo the request's op frame verbatim.

use crate::reader::{marker_kind, Int, Reader};
use crate::DecodeError;

/// Every operation of the MP protocol that cwm knows by name. `Other` carries a name that is
/// syntactically valid but not in this list (answered by nobody, logged by the server).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Op {
    RegisterKvCache,
    UnregisterKvCache,
    RegisterQCache,
    UnregisterQCache,
    StoreQ,
    Store,
    Retrieve,
    Lookup,
    QueryPrefetchStatus,
    WaitPrefetchStatus,
    FreeLookupLocks,
    EndSession,
    RegisterKvCacheEngineDrivenContext,
    UnregisterKvCacheEngineDrivenContext,
    PrepareStore,
    CommitStore,
    PrepareRetrieve,
    CommitRetrieve,
    Clear,
    GetChunkSize,
    Ping,
    ReportBlockAllocation,
    Noop,
    CbRegisterRope,
    CbUnregisterRope,
    CbRetrievePreComputed,
    CbUnifiedLookup,
    P2pLookupAndLock,
    P2pQueryLookupResults,
    P2pUnlockObjects,
    GetExperimental,
    CbProtocolHandshake,
    SubscribeKvEvents,
    CbReorderPlan,
    ServerModuleCall,
    Other(String),
}

/// The op table: variant, wire name, legacy id (`wire.py`), arity (spec §3.1 / §2.4).
macro_rules! op_table {
    ($( $variant:ident = $name:literal, $id:expr, $arity:expr; )*) => {
        impl Op {
            /// Every named op (everything but `Other`), in legacy-id order then the str-only ops.
            pub const ALL: &'static [Op] = &[$(Op::$variant,)*];

            /// `(name, legacy id, arity)` of a named op.
            fn info(&self) -> Option<(&'static str, Option<u8>, Option<usize>)> {
                match self {
                    $(Op::$variant => Some(($name, $id, $arity)),)*
                    Op::Other(_) => None,
                }
            }

            pub fn from_name(name: &str) -> Op {
                match name {
                    $($name => Op::$variant,)*
                    other => Op::Other(other.to_string()),
                }
            }
        }
    };
}

op_table! {
    RegisterKvCache = "register_kv_cache", Some(1), Some(7);
    UnregisterKvCache = "unregister_kv_cache", Some(2), Some(1);
    RegisterQCache = "register_q_cache", Some(3), None;
    UnregisterQCache = "unregister_q_cache", Some(4), None;
    StoreQ = "store_q", Some(5), None;
    Store = "store", Some(6), Some(4);
    Retrieve = "retrieve", Some(7), Some(5);
    Lookup = "lookup", Some(8), Some(2);
    QueryPrefetchStatus = "query_prefetch_status", Some(9), Some(1);
    WaitPrefetchStatus = "wait_prefetch_status", Some(10), Some(2);
    // 11 is retired and must never be reused.
    FreeLookupLocks = "free_lookup_locks", Some(12), Some(2);
    EndSession = "end_session", Some(13), Some(1);
    RegisterKvCacheEngineDrivenContext = "register_kv_cache_engine_driven_context", Some(14), Some(1);
    UnregisterKvCacheEngineDrivenContext = "unregister_kv_cache_engine_driven_context", Some(15), Some(1);
    PrepareStore = "prepare_store", Some(16), Some(2);
    CommitStore = "commit_store", Some(17), Some(3);
    PrepareRetrieve = "prepare_retrieve", Some(18), Some(2);
    CommitRetrieve = "commit_retrieve", Some(19), Some(2);
    Clear = "clear", Some(20), Some(1);
    GetChunkSize = "get_chunk_size", Some(21), Some(0);
    Ping = "ping", Some(22), Some(1);
    ReportBlockAllocation = "report_block_allocation", Some(23), Some(3);
    Noop = "noop", Some(24), Some(0);
    CbRegisterRope = "cb_register_rope", Some(25), None;
    CbUnregisterRope = "cb_unregister_rope", Some(26), None;
    CbRetrievePreComputed = "cb_retrieve_pre_computed", Some(27), None;
    CbUnifiedLookup = "cb_unified_lookup", Some(28), None;
    P2pLookupAndLock = "p2p_lookup_and_lock", Some(29), None;
    P2pQueryLookupResults = "p2p_query_lookup_results", Some(30), None;
    P2pUnlockObjects = "p2p_unlock_objects", Some(31), None;
    GetExperimental = "get_experimental", Some(32), Some(0);
    CbProtocolHandshake = "cb_protocol_handshake", Some(33), None;
    SubscribeKvEvents = "subscribe_kv_events", None, Some(4);
    CbReorderPlan = "cb_reorder_plan", None, None;
    ServerModuleCall = "server_module_call", None, None;
}

impl Op {
    /// Decode an op frame: a msgpack positive int in the legacy table, or a msgpack str.
    /// An unknown int id (including the retired id 11) is an error; an unknown name is `Other`.
    /// Trailing bytes after the int/str are an error.
    pub fn from_frame(frame: &[u8]) -> Result<Op, DecodeError> {
        use rmp::Marker;

        let hex = |f: &[u8]| {
            let shown = &f[..f.len().min(16)];
            let more = if f.len() > 16 { "…" } else { "" };
            format!("{}{more}", hex::encode(shown))
        };
        let mut r = Reader::new("op frame", frame);
        let m = r
            .peek_marker("op")
            .map_err(|_| DecodeError::UnknownOp("empty op frame".into()))?;
        let op = match marker_kind(m) {
            "int" => match r.int("op") {
                Ok(Int::U(id)) => Op::from_legacy_id(id).ok_or_else(|| {
                    DecodeError::UnknownOp(if id == 11 {
                        "legacy id 11 (retired, never reused)".to_string()
                    } else {
                        format!("legacy id {id} (not in the table 1..=33)")
                    })
                })?,
                Ok(Int::I(id)) => {
                    return Err(DecodeError::UnknownOp(format!("negative op id {id}")));
                }
                Err(e) => {
                    return Err(DecodeError::UnknownOp(format!(
                        "op frame {}: {e}",
                        hex(frame)
                    )))
                }
            },
            "str" => match r.str("op") {
                Ok(name) => Op::from_name(name),
                Err(e) => {
                    return Err(DecodeError::UnknownOp(format!(
                        "op frame {}: {e}",
                        hex(frame)
                    )))
                }
            },
            kind => {
                let kind = if m == Marker::Reserved {
                    "not msgpack"
                } else {
                    kind
                };
                return Err(DecodeError::UnknownOp(format!(
                    "op frame {} is a msgpack {kind}, expected an int (legacy id) or a str (name)",
                    hex(frame)
                )));
            }
        };
        if r.remaining() != 0 {
            return Err(DecodeError::UnknownOp(format!(
                "op frame {} has {} trailing byte(s) after the op",
                hex(frame),
                r.remaining()
            )));
        }
        Ok(op)
    }

    /// Encode as the real client does: the legacy id when the op has one, else its name.
    pub fn to_frame(&self) -> Vec<u8> {
        match self.legacy_id() {
            // All legacy ids are < 128: a positive fixint, one byte.
            Some(id) => vec![id],
            None => crate::codec::encode_str(self.name()),
        }
    }

    pub fn from_legacy_id(id: u64) -> Option<Op> {
        Op::ALL
            .iter()
            .find(|op| op.legacy_id().map(u64::from) == Some(id))
            .cloned()
    }

    pub fn legacy_id(&self) -> Option<u8> {
        self.info().and_then(|(_, id, _)| id)
    }

    /// The wire name (`"register_kv_cache"`, …).
    pub fn name(&self) -> &str {
        match self {
            Op::Other(name) => name,
            named => named.info().map_or("", |(name, _, _)| name),
        }
    }

    /// The wire name with a `'static` lifetime (`"<other>"` for `Other`), for error values.
    pub fn static_name(&self) -> &'static str {
        self.info().map_or("<other>", |(name, _, _)| name)
    }

    /// Number of payload frames the real client sends for this op (RPC arity), when known.
    pub fn arity(&self) -> Option<usize> {
        self.info().and_then(|(_, _, arity)| arity)
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_table_round_trips() {
        let mut ids = 0;
        for op in Op::ALL {
            assert_eq!(Op::from_name(op.name()), *op);
            assert_eq!(Op::from_frame(&op.to_frame()).unwrap(), *op);
            if let Some(id) = op.legacy_id() {
                ids += 1;
                assert_eq!(op.to_frame(), vec![id]);
                assert_eq!(Op::from_legacy_id(u64::from(id)), Some(op.clone()));
            }
        }
        assert_eq!(ids, 32, "ids 1..=33 without the retired 11");
        assert_eq!(Op::ALL.len(), 35);
        for id in 1..=33u64 {
            assert_eq!(Op::from_legacy_id(id).is_some(), id != 11, "id {id}");
        }
        assert_eq!(Op::from_legacy_id(0), None);
        assert_eq!(Op::from_legacy_id(34), None);
    }

    #[test]
    fn spec_ids() {
        assert_eq!(Op::RegisterKvCache.legacy_id(), Some(1));
        assert_eq!(Op::WaitPrefetchStatus.legacy_id(), Some(10));
        assert_eq!(Op::FreeLookupLocks.legacy_id(), Some(12));
        assert_eq!(Op::GetChunkSize.legacy_id(), Some(21));
        assert_eq!(Op::Noop.legacy_id(), Some(24));
        assert_eq!(Op::GetExperimental.legacy_id(), Some(32));
        assert_eq!(Op::CbProtocolHandshake.legacy_id(), Some(33));
        assert_eq!(Op::SubscribeKvEvents.legacy_id(), None);
        assert_eq!(Op::CbReorderPlan.legacy_id(), None);
        assert_eq!(Op::ServerModuleCall.legacy_id(), None);
    }

    #[test]
    fn arities() {
        let want = [
            (Op::GetChunkSize, 0),
            (Op::GetExperimental, 0),
            (Op::Noop, 0),
            (Op::Ping, 1),
            (Op::Clear, 1),
            (Op::EndSession, 1),
            (Op::QueryPrefetchStatus, 1),
            (Op::UnregisterKvCache, 1),
            (Op::RegisterKvCacheEngineDrivenContext, 1),
            (Op::UnregisterKvCacheEngineDrivenContext, 1),
            (Op::Lookup, 2),
            (Op::FreeLookupLocks, 2),
            (Op::WaitPrefetchStatus, 2),
            (Op::PrepareStore, 2),
            (Op::PrepareRetrieve, 2),
            (Op::CommitRetrieve, 2),
            (Op::CommitStore, 3),
            (Op::ReportBlockAllocation, 3),
            (Op::Store, 4),
            (Op::SubscribeKvEvents, 4),
            (Op::Retrieve, 5),
            (Op::RegisterKvCache, 7),
        ];
        for (op, n) in want {
            assert_eq!(op.arity(), Some(n), "{op}");
        }
        assert_eq!(Op::StoreQ.arity(), None);
        assert_eq!(Op::Other("x".into()).arity(), None);
    }

    #[test]
    fn op_frames_in_other_encodings() {
        // Any int width is accepted for a legacy id; names decode to the same op.
        assert_eq!(Op::from_frame(&[0xcc, 0x06]).unwrap(), Op::Store);
        assert_eq!(Op::from_frame(&[0xcd, 0x00, 0x06]).unwrap(), Op::Store);
        assert_eq!(
            Op::from_frame(&crate::codec::encode_str("store")).unwrap(),
            Op::Store
        );
        assert_eq!(
            Op::from_frame(&crate::codec::encode_str("my_plugin_op")).unwrap(),
            Op::Other("my_plugin_op".into())
        );
        let other = Op::Other("my_plugin_op".into());
        assert_eq!(other.name(), "my_plugin_op");
        assert_eq!(other.static_name(), "<other>");
        assert_eq!(other.to_frame(), crate::codec::encode_str("my_plugin_op"));
        assert_eq!(other.legacy_id(), None);
    }

    #[test]
    fn bad_op_frames() {
        for (frame, want) in [
            (vec![11u8], "retired"),
            (vec![34], "legacy id 34"),
            (vec![0xcc, 200], "legacy id 200"),
            (vec![0x00], "legacy id 0"),
            (vec![0xff], "negative"),
            (vec![0xc3], "bool"),
            (vec![0xc0], "nil"),
            (vec![0xc4, 0x01, 0x06], "bin"),
            (vec![0x90], "array"),
            (vec![0xc1], "not msgpack"),
            (vec![], "empty"),
            (vec![0x06, 0x00], "trailing"),
            (vec![0xa3, b's'], "truncated"),
            (vec![0xa2, 0xff, 0xfe], "UTF-8"),
            (vec![0xcd, 0x01], "truncated"),
        ] {
            match Op::from_frame(&frame) {
                Err(DecodeError::UnknownOp(msg)) => assert!(msg.contains(want), "{msg:?} / {want}"),
                other => panic!("{frame:02x?}: {other:?}"),
            }
        }
    }
}
