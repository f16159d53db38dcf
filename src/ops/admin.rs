//! The small ops: `get_chunk_size`, `get_experimental`, `noop`, `ping`,
//! `report_block_allocation`, `clear`.

use std::sync::Arc;

use connector_protocol::{codec, Op};

use super::command::Command;
use super::registry::Member;
use super::{Cwm, OpError};

/// The server's chunk size in tokens.
pub struct GetChunkSize;

impl Command for GetChunkSize {
    const OP: Op = Op::GetChunkSize;
    type Answer = Option<u64>;

    fn parse(_: &[&[u8]]) -> Result<Self, OpError> {
        Ok(GetChunkSize)
    }

    fn run(self, cwm: &Arc<Cwm>) -> Result<Option<u64>, OpError> {
        Ok(Some(cwm.settings.chunk_size as u64))
    }

    fn failed() -> Option<u64> {
        None
    }
}

/// The experimental features this server offers: none.
pub struct GetExperimental;

impl Command for GetExperimental {
    const OP: Op = Op::GetExperimental;
    type Answer = Option<&'static [&'static str]>;

    fn parse(_: &[&[u8]]) -> Result<Self, OpError> {
        Ok(GetExperimental)
    }

    fn run(self, _: &Arc<Cwm>) -> Result<Self::Answer, OpError> {
        Ok(Some(&[]))
    }

    fn failed() -> Self::Answer {
        None
    }
}

pub struct Noop;

impl Command for Noop {
    const OP: Op = Op::Noop;
    type Answer = Option<&'static str>;

    fn parse(_: &[&[u8]]) -> Result<Self, OpError> {
        Ok(Noop)
    }

    fn run(self, _: &Arc<Cwm>) -> Result<Self::Answer, OpError> {
        Ok(Some("OK"))
    }

    fn failed() -> Self::Answer {
        None
    }
}

/// A worker's heartbeat: keeps its registrations alive, and tells one cwm does not know to
/// re-register.
pub struct Ping {
    pub instance_id: Option<u64>,
}

impl Command for Ping {
    const OP: Op = Op::Ping;
    type Answer = bool;

    fn parse(f: &[&[u8]]) -> Result<Self, OpError> {
        Ok(Ping {
            instance_id: codec::decode_opt_u64("instance_id", f[0])?,
        })
    }

    /// `true`, except the first ping of an instance cwm does not know (`recovery::Prompts`).
    fn run(self, cwm: &Arc<Cwm>) -> Result<bool, OpError> {
        let Some(id) = self.instance_id else {
            return Ok(true);
        };
        let mut known = false;
        if let Some(inst) = cwm.registry.get(id) {
            inst.touch(true);
            known = true;
        }
        if let Some(ctx) = cwm.engine_driven.get(id) {
            ctx.liveness().lock().touch(true);
            known = true;
        }
        Ok(known || cwm.prompts.ping_unknown(id))
    }

    fn failed() -> bool {
        false
    }
}

/// The engine's block allocation report: cwm has no use for it (its arguments are not read).
pub struct ReportBlockAllocation;

impl Command for ReportBlockAllocation {
    const OP: Op = Op::ReportBlockAllocation;
    type Answer = ();

    fn parse(_: &[&[u8]]) -> Result<Self, OpError> {
        Ok(ReportBlockAllocation)
    }

    fn run(self, _: &Arc<Cwm>) -> Result<(), OpError> {
        Ok(())
    }

    fn failed() {}
}

/// Empty the cache of everything no window pins (`force`: lookup-locked objects too).
pub struct Clear {
    pub force: bool,
}

impl Command for Clear {
    const OP: Op = Op::Clear;
    type Answer = ();

    fn parse(f: &[&[u8]]) -> Result<Self, OpError> {
        Ok(Clear {
            force: codec::decode_bool("force", f[0])?,
        })
    }

    fn run(self, cwm: &Arc<Cwm>) -> Result<(), OpError> {
        let cleared = cwm.tiers.clear(self.force);
        tracing::info!(
            force = self.force,
            l1 = cleared.l1,
            lower = cleared.lower,
            "clear"
        );
        Ok(())
    }

    fn failed() {}
}
