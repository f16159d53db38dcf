//! Commands: one op's arguments as typed values, whichever transport brought them.
//!
//! Each op's file defines its command, a struct implementing [`Command`]: how it is parsed from
//! the MP protocol's payload frames (their number is checked against the op table first),
//! whether it is a transfer (runs off the socket thread), what it does, and what the client is
//! answered when it fails. [`ROUTES`] is the one table from op to command; adding an op is a
//! struct in its file plus one line there. Another front end (`lm://`) builds the same structs
//! directly, without msgpack, and calls [`Command::run`].

use std::sync::Arc;

use connector_protocol::{
    codec, IpcCacheServerKey, Op, PrepareRetrieveResponse, RegisterEngineDrivenContextResponse,
    TransferResult,
};

use super::{admin, engine_driven, lookup, register, transfer, Cwm, OpError};

pub trait Command: Sized {
    const OP: Op;
    /// Copies engine memory or may wait: runs off the socket thread, in order per client.
    const TRANSFER: bool = false;
    type Answer: Answer;

    /// Decode the MP payload frames (exactly `OP.arity()` of them).
    fn parse(frames: &[&[u8]]) -> Result<Self, OpError>;

    fn run(self, cwm: &Arc<Cwm>) -> Result<Self::Answer, OpError>;

    /// What the client is answered when the command fails, so it never waits forever.
    fn failed() -> Self::Answer;
}

/// The `IPCCacheServerKey` frame most commands carry first.
pub(super) fn decode_key(frame: &[u8]) -> Result<IpcCacheServerKey, OpError> {
    Ok(codec::decode::<IpcCacheServerKey>(
        "IPCCacheServerKey",
        frame,
    )?)
}

/// A command's result as the MP protocol carries it: a payload frame, or none.
pub trait Answer {
    fn into_payload(self) -> Option<Vec<u8>>;
}

impl Answer for () {
    fn into_payload(self) -> Option<Vec<u8>> {
        None
    }
}

impl Answer for bool {
    fn into_payload(self) -> Option<Vec<u8>> {
        Some(codec::encode_bool(self))
    }
}

impl Answer for u64 {
    fn into_payload(self) -> Option<Vec<u8>> {
        Some(codec::encode_u64(self))
    }
}

impl Answer for &'static str {
    fn into_payload(self) -> Option<Vec<u8>> {
        Some(codec::encode_str(self))
    }
}

impl Answer for &'static [&'static str] {
    fn into_payload(self) -> Option<Vec<u8>> {
        Some(codec::encode_str_list(self))
    }
}

/// `None`: no payload frame (e.g. a prefetch still running).
impl<T: Answer> Answer for Option<T> {
    fn into_payload(self) -> Option<Vec<u8>> {
        self.and_then(Answer::into_payload)
    }
}

impl Answer for TransferResult {
    fn into_payload(self) -> Option<Vec<u8>> {
        Some(self.encode())
    }
}

impl Answer for RegisterEngineDrivenContextResponse {
    fn into_payload(self) -> Option<Vec<u8>> {
        Some(codec::encode(&self))
    }
}

impl Answer for PrepareRetrieveResponse {
    fn into_payload(self) -> Option<Vec<u8>> {
        Some(codec::encode(&self))
    }
}

/// A command run from its MP frames, with its answer encoded as the MP payload.
type RunFrames = fn(&Arc<Cwm>, &[&[u8]]) -> Result<Option<Vec<u8>>, OpError>;

/// How the MP server runs one op: the command's parse, run and failure value, type-erased.
pub struct Route {
    op: Op,
    pub transfer: bool,
    run: RunFrames,
    failed: fn() -> Option<Vec<u8>>,
}

impl Route {
    const fn of<C: Command>() -> Route {
        Route {
            op: C::OP,
            transfer: C::TRANSFER,
            run: run::<C>,
            failed: failed::<C>,
        }
    }

    pub fn run(&self, cwm: &Arc<Cwm>, frames: &[&[u8]]) -> Result<Option<Vec<u8>>, OpError> {
        (self.run)(cwm, frames)
    }

    pub fn failed(&self) -> Option<Vec<u8>> {
        (self.failed)()
    }
}

fn run<C: Command>(cwm: &Arc<Cwm>, frames: &[&[u8]]) -> Result<Option<Vec<u8>>, OpError> {
    Ok(C::parse(frames)?.run(cwm)?.into_payload())
}

fn failed<C: Command>() -> Option<Vec<u8>> {
    C::failed().into_payload()
}

/// Every op cwm serves. An op not listed is answered with no payload (and logged).
pub static ROUTES: &[Route] = &[
    Route::of::<admin::GetChunkSize>(),
    Route::of::<admin::GetExperimental>(),
    Route::of::<admin::Noop>(),
    Route::of::<admin::Ping>(),
    Route::of::<admin::ReportBlockAllocation>(),
    Route::of::<admin::Clear>(),
    Route::of::<register::RegisterKvCache>(),
    Route::of::<register::UnregisterKvCache>(),
    Route::of::<transfer::Store>(),
    Route::of::<transfer::Retrieve>(),
    Route::of::<lookup::Lookup>(),
    Route::of::<lookup::QueryPrefetchStatus>(),
    Route::of::<lookup::WaitPrefetchStatus>(),
    Route::of::<lookup::FreeLookupLocks>(),
    Route::of::<lookup::EndSession>(),
    Route::of::<engine_driven::RegisterContext>(),
    Route::of::<engine_driven::UnregisterContext>(),
    Route::of::<engine_driven::PrepareStore>(),
    Route::of::<engine_driven::CommitStore>(),
    Route::of::<engine_driven::PrepareRetrieve>(),
    Route::of::<engine_driven::CommitRetrieve>(),
];

/// The route of a served op.
pub fn route(op: &Op) -> Option<&'static Route> {
    ROUTES.iter().find(|r| r.op == *op)
}

/// Ops that copy engine memory or may wait: run off the socket thread, in order per client.
pub fn is_transfer(op: &Op) -> bool {
    route(op).is_some_and(|r| r.transfer)
}

/// What an op answers when it fails (no payload for ops cwm does not serve).
pub fn failure_reply(op: &Op) -> Option<Vec<u8>> {
    route(op).and_then(Route::failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_a_distinct_op_with_a_known_arity() {
        for (i, r) in ROUTES.iter().enumerate() {
            assert!(r.op.arity().is_some(), "{} has no arity", r.op);
            assert!(
                ROUTES[..i].iter().all(|o| o.op != r.op),
                "{} routed twice",
                r.op
            );
        }
        assert_eq!(ROUTES.len(), 21);
        assert!(route(&Op::StoreQ).is_none());
        assert!(route(&Op::Other("x".into())).is_none());
    }

    #[test]
    fn transfers_are_the_ops_that_copy_or_wait() {
        let transfers: Vec<&str> = ROUTES
            .iter()
            .filter(|r| r.transfer)
            .map(|r| r.op.name())
            .collect();
        assert_eq!(
            transfers,
            [
                "store",
                "retrieve",
                "wait_prefetch_status",
                "prepare_store",
                "commit_store",
                "prepare_retrieve",
                "commit_retrieve"
            ]
        );
    }

    #[test]
    fn failure_values_are_what_the_client_reads_as_failure() {
        let failed = |op| failure_reply(&op);
        assert_eq!(failed(Op::Store), Some(TransferResult::FAILED.encode()));
        assert_eq!(failed(Op::Retrieve), Some(TransferResult::FAILED.encode()));
        assert_eq!(failed(Op::QueryPrefetchStatus), Some(codec::encode_u64(0)));
        assert_eq!(failed(Op::WaitPrefetchStatus), Some(codec::encode_u64(0)));
        for op in [Op::Ping, Op::CommitStore, Op::CommitRetrieve] {
            assert_eq!(failed(op), Some(codec::encode_bool(false)));
        }
        assert_eq!(
            failed(Op::PrepareStore),
            Some(connector_protocol::PrepareStoreResponse::encode_unavailable())
        );
        assert_eq!(
            failed(Op::PrepareRetrieve),
            Some(codec::encode(&PrepareRetrieveResponse::default()))
        );
        assert_eq!(
            failed(Op::RegisterKvCacheEngineDrivenContext),
            Some(codec::encode(
                &RegisterEngineDrivenContextResponse::default()
            ))
        );
        for op in [Op::GetChunkSize, Op::Lookup, Op::Clear, Op::RegisterKvCache] {
            assert_eq!(failed(op), None);
        }
    }
}
