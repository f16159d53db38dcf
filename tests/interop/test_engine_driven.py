"""Engine-driven transfers (vLLM's default on CPU) with the REAL lmcache 0.5.6 client code.

What runs for real: the msgspec encoders/decoders of every op (`RegisterEngineDrivenContextPayload`,
`RegisterEngineDrivenContextResponse`, `PrepareStoreResponse`, `PrepareRetrieveResponse`), the
ZMQ client, `create_engine_driven_context` choosing the shared-memory mode, and
`EngineDrivenContextShm`: it opens cwm's pool by name (`multiprocessing.shared_memory`, resource
tracker unregistered), turns slot descriptors into tensor views at `offset` / `length` / `shape`
/ `dtype`, and sends prepare/commit exactly as the vLLM worker does.

What does not: torch. The views are numpy arrays over the same shared memory (a 20-line
`frombuffer` for the fake torch, below), and the test writes/reads them where the worker's
`gather_paged_kv_to_cpu` / `scatter_cpu_to_paged_kv` would. The chunk layout those kernels
produce is checked separately, by storing through `store` (lmcache_driven mode, vLLM's CPU HND
layout) and reading the same object back through the engine-driven path.

`base.py` imports torch kernels (`lmcache_native`, `gpu_connector.utils`) at module level; they
are stubbed only if they cannot be imported, so the real `base.py` and `shm.py` load.
"""
from __future__ import annotations

import os
import sys
import types

import numpy as np
import pytest

import interop_lib as lib

import lmcache  # noqa: E402  (after interop_lib: the fake torch is on the path)
import torch  # noqa: E402  (the fake torch)


def _load_engine_driven_modules():
    root = os.path.dirname(lmcache.__file__)
    if "lmcache.v1.multiprocess.transfer_context" not in sys.modules:
        # Skip the package __init__ (it imports the CUDA/async contexts); leaf modules still load.
        pkg = types.ModuleType("lmcache.v1.multiprocess.transfer_context")
        pkg.__path__ = [os.path.join(root, "v1/multiprocess/transfer_context")]
        pkg.__package__ = pkg.__name__
        sys.modules[pkg.__name__] = pkg
    for name, attrs in (("lmcache.v1.gpu_connector.utils", {"LayoutHints": dict}),
                        ("lmcache.lmcache_native", {})):
        try:
            __import__(name)
        except ImportError:
            stub = types.ModuleType(name)
            stub.__dict__.update(attrs)
            sys.modules[name] = stub
    from lmcache.v1.distributed.api import MemoryLayoutDesc
    from lmcache.v1.multiprocess.custom_types import (
        PrepareRetrieveResponse,
        PrepareStoreResponse,
        RegisterEngineDrivenContextPayload,
        RegisterEngineDrivenContextResponse,
    )
    from lmcache.v1.multiprocess.transfer_context.base import (
        EngineDrivenContextMetadata,
        create_engine_driven_context,
    )
    from lmcache.v1.multiprocess.transfer_context.shm import EngineDrivenContextShm
    return types.SimpleNamespace(**locals())


ed = _load_engine_driven_modules()

pytestmark = pytest.mark.mock_xfail("the mock server has no engine-driven ops")

NP_BY_SIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


class NpTensor:
    """The part of torch.Tensor that EngineDrivenContextShm uses, over a numpy view."""

    def __init__(self, arr: np.ndarray, dtype):
        self.arr, self.dtype = arr, dtype

    def view(self, shape):
        return NpTensor(self.arr.reshape(tuple(shape)), self.dtype)

    def element_size(self) -> int:
        return self.dtype.itemsize

    @property
    def shape(self):
        return torch.Size(self.arr.shape)


def _frombuffer(buffer, dtype, count=-1, offset=0):
    return NpTensor(np.frombuffer(buffer, dtype=NP_BY_SIZE[dtype.itemsize], count=count, offset=offset), dtype)


def _empty(shape, dtype=None, **_kw):
    return NpTensor(np.empty(shape, dtype=NP_BY_SIZE[dtype.itemsize]), dtype)


@pytest.fixture(autouse=True)
def numpy_backed_torch(monkeypatch):
    monkeypatch.setattr(torch, "frombuffer", _frombuffer, raising=False)
    monkeypatch.setattr(torch, "empty", _empty, raising=False)


# A worker of vLLM's CPU backend: per layer [NB, NH, BS, 2*HS] (HND), K and V fused, so LMCache
# sends use_mla=True (one plane) and hidden = NH * 2*HS.
NL, BS, NH, HS = 2, 16, 2, 32
HIDDEN = NH * 2 * HS
SLOTS = lib.CHUNK
OBJECT_BYTES = NL * SLOTS * HIDDEN * 2


def register(client: lib.Client, iid: int, model: str, use_mla: bool = True):
    payload = ed.RegisterEngineDrivenContextPayload(
        instance_id=iid, model_name=model, world_size=1, block_size=BS, num_layers=NL,
        hidden_dim_size=HIDDEN, dtype_str="bfloat16", use_mla=use_mla, num_physical_slots=SLOTS)
    return client.register_kv_cache_engine_driven_context(payload)


def open_context(client: lib.Client, resp, use_mla: bool = True):
    """What EngineDrivenTransferContext.register does with the answer."""
    shape = [NL, SLOTS, HIDDEN] if use_mla else [2, NL, SLOTS, HIDDEN]
    metadata = ed.EngineDrivenContextMetadata(
        layout_desc=ed.MemoryLayoutDesc(shapes=[torch.Size(shape)], dtypes=[torch.bfloat16]),
        block_size=BS, use_mla=use_mla)
    return ed.create_engine_driven_context(metadata, client.raw, lib.RPC_TIMEOUT,
                                           shm_name=resp.shm_name, pool_size=resp.pool_size)


def pattern(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1 << 16, size=shape, dtype=np.uint16)


@pytest.fixture
def worker(client, uniq):
    """A registered engine-driven worker: (instance id, real SHM context). Unregistered after."""
    iid = lib.new_iid()
    resp = register(client, iid, uniq)
    assert isinstance(resp, ed.RegisterEngineDrivenContextResponse)
    assert resp.shm_name and resp.pool_size > 0, f"cwm must offer its pool (shm mode), got {resp!r}"
    ctx = open_context(client, resp)
    assert isinstance(ctx, ed.EngineDrivenContextShm), "the client fell back to pickle mode"
    yield iid, ctx
    ctx.close()
    assert client.unregister_kv_cache_engine_driven_context(iid) is None


def test_store_lookup_retrieve_through_the_pool(client, worker, uniq):
    iid, ctx = worker
    toks = lib.tokens_for(uniq, 600)
    key = lib.mkkey(uniq, toks, 0, 512, "r1")
    buffers, indices = ctx.prepare_store(key, iid)
    assert indices == [0, 1] and len(buffers) == 2
    for buf in buffers:
        assert tuple(buf.shape) == (NL, SLOTS, HIDDEN)
    assert lib.lookup_hits(client, lib.mkkey(uniq, toks, 0, 512, "early", worker_id=None)) == 0
    written = [pattern(i, (NL, SLOTS, HIDDEN)) for i in indices]
    for buf, data in zip(buffers, written):
        buf.arr[...] = data                     # the worker's gather, straight into the pool
    assert ctx.commit_store(key, iid, buffers) is True

    # Stored: a second store of the range has nothing to write ([], []).
    assert ctx.prepare_store(key, iid) == ([], [])
    assert lib.lookup_hits(client, lib.mkkey(uniq, toks, 0, 512, "r2", worker_id=None)) == 2
    got = ctx.prepare_retrieve(lib.mkkey(uniq, toks, 0, 512, "r2"), iid)
    assert got is not None and len(got) == 2
    for buf, data in zip(got, written):
        assert np.array_equal(buf.arr, data)
    assert ctx.commit_retrieve(lib.mkkey(uniq, toks, 0, 512, "r2"), iid) is True


def test_split_kv_objects_have_two_planes(client, uniq):
    iid = lib.new_iid()
    resp = register(client, iid, uniq, use_mla=False)
    ctx = open_context(client, resp, use_mla=False)
    try:
        toks = lib.tokens_for(uniq, 256)
        buffers, indices = ctx.prepare_store(lib.mkkey(uniq, toks, 0, 256, "r"), iid)
        assert indices == [0] and tuple(buffers[0].shape) == (2, NL, SLOTS, HIDDEN)
        buffers[0].arr[...] = pattern(3, (2, NL, SLOTS, HIDDEN))
        assert ctx.commit_store(lib.mkkey(uniq, toks, 0, 256, "r"), iid, buffers) is True
        del buffers                             # views into the pool must go before close()
    finally:
        ctx.close()
        client.unregister_kv_cache_engine_driven_context(iid)


def test_objects_stored_by_lmcache_driven_mode_are_served(client, worker, make_cache, uniq):
    """A chunk stored through `store` from vLLM's CPU layout (HND) is, byte for byte, the
    object the engine-driven worker reads: [layers, tokens, heads * (K|V)], token-major."""
    iid, ctx = worker
    kv = make_cache("hnd", layout="HND", nl=NL, bs=BS, nh=NH, hs=HS)
    kv.fill_random(7)
    kv_iid = lib.new_iid()
    kv.register(client, kv_iid, uniq)
    toks = lib.tokens_for(uniq, 256)
    blocks = list(range(1, 17))
    assert client.store(lib.mkkey(uniq, toks, 0, 256, "s"), kv_iid, [blocks], lib.EVENT)[1] is True
    assert lib.lookup_hits(client, lib.mkkey(uniq, toks, 0, 256, "r", worker_id=None)) == 1
    got = ctx.prepare_retrieve(lib.mkkey(uniq, toks, 0, 256, "r"), iid)
    assert got is not None
    want = np.stack([np.concatenate([kv.logical(layer, b)[0] for b in blocks]).reshape(SLOTS, HIDDEN)
                     for layer in range(NL)])
    assert np.array_equal(got[0].arr, want)
    assert ctx.commit_retrieve(lib.mkkey(uniq, toks, 0, 256, "r"), iid) is True
    client.unregister_kv_cache(kv_iid)


def test_missing_chunk_is_a_miss(client, worker, uniq):
    iid, ctx = worker
    toks = lib.tokens_for(uniq, 512)
    buffers, _ = ctx.prepare_store(lib.mkkey(uniq, toks, 0, 256, "s"), iid)
    buffers[0].arr[...] = 1
    assert ctx.commit_store(lib.mkkey(uniq, toks, 0, 256, "s"), iid, buffers) is True
    assert lib.lookup_hits(client, lib.mkkey(uniq, toks, 0, 512, "r", worker_id=None)) == 1
    key = lib.mkkey(uniq, toks, 0, 512, "r")
    resp = client.prepare_retrieve(key, iid)
    assert isinstance(resp, ed.PrepareRetrieveResponse)
    assert resp.success is False and resp.data == b"" and resp.context == {}
    assert ctx.prepare_retrieve(key, iid) is None
    assert client.commit_retrieve(key, iid) is False     # nothing was prepared


def test_commit_without_prepare_is_false(client, worker, uniq):
    iid, _ = worker
    key = lib.mkkey(uniq, lib.tokens_for(uniq, 256), 0, 256, "r")
    assert client.commit_store(key, iid, b"") is False


def test_pickle_payload_is_refused_and_frees_the_reservation(client, worker, uniq):
    """A worker that could not map the pool falls back to the pickle context (without telling
    the server): its commit carries the data inline. cwm answers False and drops the slots it
    had reserved, so a later store of the chunk gets them again."""
    iid, ctx = worker
    toks = lib.tokens_for(uniq, 256)
    key = lib.mkkey(uniq, toks, 0, 256, "r")
    pickled = ed.create_engine_driven_context(ctx.metadata, client.raw, lib.RPC_TIMEOUT,
                                              shm_name="", pool_size=0)
    assert type(pickled).__name__ == "EngineDrivenContextPickle"
    assert pickled.prepare_store(key, iid) is None       # cwm reserved a slot; pickle ignores it
    assert pickled.commit_store(key, iid, [_empty((NL, SLOTS, HIDDEN), torch.bfloat16).arr]) is False
    buffers, indices = ctx.prepare_store(key, iid)
    assert indices == [0], "the reservation was dropped with the refused commit"
    assert ctx.commit_store(key, iid, buffers) is True


def test_unknown_instance_gets_no_slots(client, uniq):
    key = lib.mkkey(uniq, lib.tokens_for(uniq, 256), 0, 256, "r")
    resp = client.prepare_store(key, lib.new_iid())
    assert isinstance(resp, ed.PrepareStoreResponse) and resp.context == {}
    assert client.prepare_retrieve(key, lib.new_iid()).success is False
    assert client.commit_store(key, lib.new_iid(), b"") is False


def test_unregister_releases_pending_prepares(client, uniq):
    iid = lib.new_iid()
    ctx = open_context(client, register(client, iid, uniq))
    toks = lib.tokens_for(uniq, 256)
    key = lib.mkkey(uniq, toks, 0, 256, "r")
    assert ctx.prepare_store(key, iid)[1] == [0]
    assert client.unregister_kv_cache_engine_driven_context(iid) is None
    assert client.commit_store(key, iid, b"") is False
    # Re-registered, the chunk can be stored again: the old reservation is gone.
    register(client, iid, uniq)
    assert ctx.prepare_store(key, iid)[1] == [0]
    ctx.close()                                 # (no view of the pool is kept above)
    client.unregister_kv_cache_engine_driven_context(iid)


def test_re_register_answers_the_same_pool(client, uniq):
    iid = lib.new_iid()
    first = register(client, iid, uniq)
    assert register(client, iid, uniq) == first
    client.unregister_kv_cache_engine_driven_context(iid)


def test_pool_is_unlinked_when_the_server_stops(new_server, uniq):
    srv = new_server()
    c = lib.Client(srv.url)
    try:
        resp = register(c, lib.new_iid(), uniq)
    finally:
        c.close()
    path = "/dev/shm/" + resp.shm_name.lstrip("/")
    assert os.path.exists(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    srv.stop()
    assert not os.path.exists(path)
