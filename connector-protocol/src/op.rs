//! Operation identifiers: the frozen legacy id table (`transport/zmq_impl/wire.py`) and names.
//!
//! A request's op frame is a msgpack positive int (legacy id) or a msgpack str (name). A server
//! must accept both for any op; replies echo the request's op frame verbatim.

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

impl Op {
    /// Decode an op frame: a msgpack positive int in the legacy table, or a msgpack str.
    /// An unknown int id (including the retired id 11) is an error; an unknown name is `Other`.
    pub fn from_frame(frame: &[u8]) -> Result<Op, DecodeError> {
        todo!()
    }

    /// Encode as the real client does: the legacy id when the op has one, else its name.
    pub fn to_frame(&self) -> Vec<u8> {
        todo!()
    }

    pub fn from_legacy_id(id: u64) -> Option<Op> {
        todo!()
    }

    pub fn legacy_id(&self) -> Option<u8> {
        todo!()
    }

    pub fn from_name(name: &str) -> Op {
        todo!()
    }

    /// The wire name (`"register_kv_cache"`, …).
    pub fn name(&self) -> &str {
        todo!()
    }

    /// Number of payload frames the real client sends for this op (RPC arity), when known.
    pub fn arity(&self) -> Option<usize> {
        todo!()
    }
}
