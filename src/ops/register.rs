//! `register_kv_cache`: open the engine's KV memory and remember the instance.
//!
//! Idempotent per instance id (workers re-register after a heartbeat recovery). What cannot be
//! served is recorded with its reason instead of rejected, so later transfers fail cleanly.

use connector_protocol::{codec, ipc, EngineGroupInfo, LayoutHints};

use super::registry::Instance;
use super::{Cwm, OpError};
use crate::engine_mem::{self, EngineMemory};

impl Cwm {
    pub(super) fn register_kv_cache(&self, f: &[&[u8]]) -> Result<(), OpError> {
        let id = codec::decode_u64("instance_id", f[0])?;
        if let Some(existing) = self.registry.get(id) {
            existing.touch(false);
            tracing::debug!(instance_id = id, "re-register: already registered");
            return Ok(());
        }
        let descriptors = ipc::decode_descriptor_list(f[1])?;
        let model = codec::decode_str("model_name", f[2])?;
        let world_size = codec::decode_u64("world_size", f[3])?;
        let engine = codec::decode_str("engine_type", f[4])?;
        let hints: LayoutHints = codec::decode("layout_hints", f[5])?;
        let groups: Vec<EngineGroupInfo> = codec::decode("engine_group_infos", f[6])?;
        connector_protocol::validate_model_name(model)?;
        let world_size = u32::try_from(world_size)
            .ok()
            .filter(|w| (1..=255).contains(w))
            .ok_or(connector_protocol::KeyError::Rank {
                world_size: world_size.min(u32::MAX as u64) as u32,
                worker_id: 0,
            })?;
        let kv = self.open_kv(&descriptors, hints.kv_layout.as_deref(), &groups);
        match &kv {
            Ok(kv) => tracing::info!(
                instance_id = id,
                model,
                world_size,
                engine,
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
                model,
                "registered KV cache cannot be served: {reason}"
            ),
        }
        if let Some(warm_up) = kv.as_ref().ok().and_then(|kv| kv.warm_up()) {
            // Mapping a multi-GiB engine cache page by page takes tens of milliseconds per GiB:
            // done in the background, so neither this reply nor the first store waits for it.
            crate::background::spawn("cwm-engine-warm-up", move || {
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
        }
        self.registry
            .insert(Instance::new(id, model, world_size, kv));
        Ok(())
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
        let kv = engine_mem::open(descriptors, hint).map_err(|e| e.to_string())?;
        kv.layout()
            .check_chunking(
                self.settings.chunk_size as u64,
                group.tokens_per_block as u64,
            )
            .map_err(|e| e.to_string())?;
        Ok(kv)
    }
}
