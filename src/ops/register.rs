//! `register_kv_cache`: open the engine's KV memory and remember the instance;
//! `unregister_kv_cache`: forget it.
//!
//! Idempotent per instance id (workers re-register after a heartbeat recovery). What cannot be
//! served is recorded with its reason instead of rejected, so later transfers fail cleanly.
//! What can be served is journaled (`journal`), so a restarted cwm reopens it (`recovery`).

use crate::limits::for_log;
use connector_protocol::{codec, ipc, EngineGroupInfo, LayoutHints, Op};

use std::sync::Arc;

use super::command::Command;
use super::registry::Instance;
use super::{Cwm, OpError};
use crate::engine_mem::cuda::{self, PinnedHost};
use crate::engine_mem::pin_l1;
use crate::engine_mem::{self, EngineMemory};

/// Tests: register L1 with the driver in pieces of this many bytes instead of 1 GiB.
pub const PIN_PIECE_ENV: &str = pin_l1::PIECE_ENV;

/// `register_kv_cache`: a worker's KV cache memory, described by IPC descriptors.
pub struct RegisterKvCache {
    pub instance_id: u64,
    /// One per layer (or one for a fused layout): shared memory or CUDA IPC handles.
    pub descriptors: Vec<ipc::IpcDescriptor>,
    pub model_name: String,
    pub world_size: u64,
    pub engine_type: String,
    pub layout_hints: LayoutHints,
    pub engine_groups: Vec<EngineGroupInfo>,
}

impl Command for RegisterKvCache {
    const OP: Op = Op::RegisterKvCache;
    type Answer = ();

    fn parse(f: &[&[u8]]) -> Result<Self, OpError> {
        Ok(RegisterKvCache {
            instance_id: codec::decode_u64("instance_id", f[0])?,
            descriptors: ipc::decode_descriptor_list(f[1])?,
            model_name: codec::decode_str("model_name", f[2])?.to_string(),
            world_size: codec::decode_u64("world_size", f[3])?,
            engine_type: codec::decode_str("engine_type", f[4])?.to_string(),
            layout_hints: codec::decode("layout_hints", f[5])?,
            engine_groups: codec::decode("engine_group_infos", f[6])?,
        })
    }

    fn run(self, cwm: &Arc<Cwm>) -> Result<(), OpError> {
        cwm.register_kv_cache(self)
    }

    fn failed() {}
}

/// `unregister_kv_cache`: forget an instance (its memory is unmapped once no copy uses it).
pub struct UnregisterKvCache {
    pub instance_id: u64,
}

impl Command for UnregisterKvCache {
    const OP: Op = Op::UnregisterKvCache;
    type Answer = ();

    fn parse(f: &[&[u8]]) -> Result<Self, OpError> {
        Ok(UnregisterKvCache {
            instance_id: codec::decode_u64("instance_id", f[0])?,
        })
    }

    fn run(self, cwm: &Arc<Cwm>) -> Result<(), OpError> {
        let id = self.instance_id;
        if cwm.registry.remove(id).is_none() {
            tracing::warn!(instance_id = id, "unregister_kv_cache: unknown instance");
        } else {
            tracing::info!(instance_id = id, "unregistered");
        }
        cwm.forget_journaled(&[id]);
        Ok(())
    }

    fn failed() {}
}

impl RegisterKvCache {
    /// The request's seven argument frames as the MP protocol carries them (encoded as the
    /// real client encodes them): what the journal keeps. `None` when a descriptor is of a kind
    /// cwm cannot encode (nor serve).
    pub fn to_frames(&self) -> Option<Vec<Vec<u8>>> {
        if self
            .descriptors
            .iter()
            .any(|d| matches!(d, ipc::IpcDescriptor::Unsupported { .. }))
        {
            return None;
        }
        Some(vec![
            codec::encode_u64(self.instance_id),
            ipc::encode_descriptor_list(&self.descriptors),
            codec::encode_str(&self.model_name),
            codec::encode_u64(self.world_size),
            codec::encode_str(&self.engine_type),
            codec::encode(&self.layout_hints),
            codec::encode(&self.engine_groups),
        ])
    }
}

/// A registration checked and its memory opened (or why it cannot be served).
pub(super) struct Opened {
    pub world_size: u32,
    pub kv: Result<Box<dyn EngineMemory>, String>,
}

impl Cwm {
    fn register_kv_cache(&self, r: RegisterKvCache) -> Result<(), OpError> {
        let id = r.instance_id;
        if let Some(existing) = self.registry.get(id) {
            existing.touch(false);
            tracing::debug!(instance_id = id, "re-register: already registered");
            return Ok(());
        }
        let opened = self.open_registration(&r)?;
        if opened.kv.is_ok() {
            self.journal_registration(&r);
        }
        self.install(id, &r.model_name, opened, false);
        Ok(())
    }

    /// Check a registration as a live `register_kv_cache` does and open its memory; logged.
    /// `Err`: refused outright (bad model name or world size); `kv` `Err`: cannot be served.
    pub(super) fn open_registration(&self, r: &RegisterKvCache) -> Result<Opened, OpError> {
        let id = r.instance_id;
        let (model, world_size, engine) = (r.model_name.as_str(), r.world_size, &r.engine_type);
        connector_protocol::validate_model_name(model)?;
        let world_size = u32::try_from(world_size)
            .ok()
            .filter(|w| (1..=255).contains(w))
            .ok_or(connector_protocol::KeyError::Rank {
                world_size: world_size.min(u32::MAX as u64) as u32,
                worker_id: 0,
            })?;
        let kv = self.open_kv(
            &r.descriptors,
            r.layout_hints.kv_layout.as_deref(),
            &r.engine_groups,
        );
        match &kv {
            Ok(kv) => tracing::info!(
                instance_id = id,
                model = %for_log(model),
                world_size,
                engine = %for_log(engine),
                layers = kv.layout().num_layers,
                blocks = kv.layout().num_blocks,
                block_size = kv.layout().block_size,
                heads = kv.layout().num_heads,
                planes = kv.layout().planes,
                dtype = %kv.layout().dtype,
                device = %kv.device(),
                layout = ?kv.layout().block_shape(),
                "registered KV cache"
            ),
            Err(reason) => tracing::error!(
                instance_id = id,
                model = %for_log(model),
                "registered KV cache cannot be served: {}",
                for_log(reason)
            ),
        }
        Ok(Opened { world_size, kv })
    }

    /// Start the engine memory's warm-up and add the instance to the registry (`pinged`: it
    /// was heard from by heartbeats before, as a restored registration was).
    pub(super) fn install(&self, id: u64, model: &str, opened: Opened, pinged: bool) {
        let Opened { world_size, kv } = opened;
        if let Some(warm_up) = kv.as_ref().ok().and_then(|kv| kv.warm_up()) {
            // Mapping an engine cache takes tens of milliseconds per GiB: off this thread, so
            // the reply does not wait for it, and at normal priority, since a retrieve that
            // arrives meanwhile waits for it (`engine_mem::warm`).
            let spawned = std::thread::Builder::new()
                .name("cwm-engine-warm-up".into())
                .spawn(move || {
                    let t = std::time::Instant::now();
                    match warm_up() {
                        Ok(bytes) => tracing::info!(
                            instance_id = id,
                            bytes,
                            ms = t.elapsed().as_secs_f64() * 1e3,
                            "engine memory mapped ahead of the first transfer"
                        ),
                        Err(e) => tracing::warn!(
                            instance_id = id,
                            "could not map engine memory ahead of use: {e}"
                        ),
                    }
                });
            // A warm-up that cannot start is dropped, which lets transfers go ahead unwarmed.
            if let Err(e) = spawned {
                tracing::warn!(instance_id = id, "could not start the engine warm-up: {e}");
            }
        }
        let instance = Instance::new(id, model, world_size, kv);
        if pinged {
            instance.touch(true);
        }
        self.registry.insert(instance);
    }

    fn open_kv(
        &self,
        descriptors: &[ipc::IpcDescriptor],
        hint: Option<&str>,
        groups: &[EngineGroupInfo],
    ) -> Result<Box<dyn EngineMemory>, String> {
        let [group] = groups else {
            return Err(format!(
                "{} engine groups (hybrid models are not supported yet; exactly one is)",
                groups.len()
            ));
        };
        let pinned = if engine_mem::is_gpu(descriptors) {
            self.pinned_l1(descriptors)
        } else {
            None
        };
        let kv = engine_mem::open_with(descriptors, hint, pinned).map_err(|e| e.to_string())?;
        kv.layout()
            .check_chunking(
                self.settings.chunk_size as u64,
                group.tokens_per_block as u64,
            )
            .map_err(|e| e.to_string())?;
        Ok(kv)
    }
}

/// The GPU path's state for `/status` and `/metrics`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GpuStatus {
    /// L1 bytes registered with the CUDA driver so far (pinning runs in the background after
    /// the first GPU engine registered; 0 before).
    pub l1_pinned_bytes: u64,
    /// Why pinning L1 stopped short, if it did (GPU copies from the rest run from pageable
    /// memory).
    pub l1_pin_error: Option<String>,
    /// Engine allocations opened over CUDA IPC.
    pub engine_mappings: usize,
}

impl Cwm {
    pub fn gpu_status(&self) -> GpuStatus {
        let (l1_pinned_bytes, l1_pin_error) = match self.gpu_l1.get() {
            Some(p) => (p.pinned_bytes(), p.error().map(str::to_string)),
            None => (0, None),
        };
        GpuStatus {
            l1_pinned_bytes,
            l1_pin_error,
            engine_mappings: cuda::mapping::open_count(),
        }
    }

    /// L1 for GPU copies: its pinning starts (in the background, `engine_mem::pin_l1`) when
    /// the first GPU engine registers; copies use whatever is pinned by then.
    fn pinned_l1(&self, descriptors: &[ipc::IpcDescriptor]) -> Option<Arc<PinnedHost>> {
        // Without a driver, or on a device this host lacks, the registration fails with that
        // reason; nothing to pin. Pinned with the engine's own device (contexts are lazy).
        let device = cuda::engine_device(descriptors).ok()?;
        // A GPU whose context failed is disabled alone: never pin (and cache a failure) with it.
        device.bind().ok()?;
        let pinning = self.gpu_l1.get_or_init(|| {
            let (base, len) = self.tiers.l1_memory();
            let me = self.me.clone();
            let in_use = move || {
                me.upgrade()
                    .map_or(0, |c| c.tiers.l1_occupancy().used_bytes)
            };
            pin_l1::start(device, base, len, self.settings.pin_l1, in_use)
        });
        Some(pinning.host().clone())
    }
}
