"""Negative cases: every request that the client waits on gets an answer, failures are expressed
as results (store/retrieve -> (b"", False)), and the server keeps serving afterwards."""
import os

import msgspec
import pytest
import zmq

import interop_lib as lib

enc = msgspec.msgpack.encode
OP_STORE, OP_RETRIEVE, OP_GET_CHUNK_SIZE = 6, 7, 21


# ---- well-formed requests with bad semantics (real client) ---------------------------------------

def test_retrieve_unknown_chunks(client, make_cache, uniq):
    dst = make_cache("dst")
    dst.fill_sentinel()
    before = dst.snapshot()
    iid = lib.new_iid()
    dst.register(client, iid, uniq)
    toks = lib.tokens_for(uniq, 600)
    res = client.retrieve(lib.mkkey(uniq, toks, 0, 512, "r"), iid, [list(range(1, 33))], lib.EVENT, 0)
    assert res[1] is False, res
    assert lib.unchanged_blocks(dst, before, range(dst.nb)) == []


def test_unknown_instance(client, uniq):
    toks = lib.tokens_for(uniq, 512)
    key = lib.mkkey(uniq, toks, 0, 512, "r")
    assert client.store(key, lib.new_iid(), [list(range(1, 33))], lib.EVENT) == (b"", False)
    assert client.retrieve(key, lib.new_iid(), [list(range(1, 33))], lib.EVENT, 0) == (b"", False)


def test_unregistered_instance_is_unknown(client, make_cache, uniq):
    kv = make_cache()
    iid = lib.new_iid()
    kv.register(client, iid, uniq)
    assert client.unregister_kv_cache(iid) is None
    toks = lib.tokens_for(uniq, 256)
    assert client.store(lib.mkkey(uniq, toks, 0, 256, "r"), iid, [list(range(1, 17))], lib.EVENT) == (b"", False)


def test_short_block_list(client, make_cache, uniq):
    src, dst = make_cache("src"), make_cache("dst")
    src.fill_random(5)
    iid, iid_d = lib.new_iid(), lib.new_iid()
    src.register(client, iid, uniq)
    dst.register(client, iid_d, uniq)
    toks = lib.tokens_for(uniq, 512)
    assert client.store(lib.mkkey(uniq, toks, 0, 512, "s"), iid, [list(range(1, 6))], lib.EVENT)[1] is False
    assert client.store(lib.mkkey(uniq, toks, 0, 512, "s"), iid, [list(range(1, 32))], lib.EVENT)[1] is False
    assert lib.lookup_hits(client, lib.mkkey(uniq, toks, 0, 512, "l", worker_id=None)) == 0
    assert client.store(lib.mkkey(uniq, toks, 0, 512, "s"), iid, [list(range(1, 33))], lib.EVENT)[1] is True
    assert lib.lookup_hits(client, lib.mkkey(uniq, toks, 0, 512, "l2", worker_id=None)) == 2
    dst.fill_sentinel()
    before = dst.snapshot()
    assert client.retrieve(lib.mkkey(uniq, toks, 0, 512, "l2"), iid_d, [list(range(1, 20))], lib.EVENT, 0)[1] is False
    assert lib.unchanged_blocks(dst, before, range(dst.nb)) == []


def test_wrong_number_of_block_groups(client, make_cache, uniq):
    src = make_cache("src")
    iid = lib.new_iid()
    src.register(client, iid, uniq)
    toks = lib.tokens_for(uniq, 256)
    b = list(range(1, 17))
    assert client.store(lib.mkkey(uniq, toks, 0, 256, "s"), iid, [b, b], lib.EVENT)[1] is False
    assert client.store(lib.mkkey(uniq, toks, 0, 256, "s"), iid, [], lib.EVENT)[1] is False
    assert client.retrieve(lib.mkkey(uniq, toks, 0, 256, "s"), iid, [b, b], lib.EVENT, 0)[1] is False


def test_block_ids_out_of_range(client, make_cache, uniq):
    src, dst = make_cache("src"), make_cache("dst")
    src.fill_random(6)
    iid, iid_d = lib.new_iid(), lib.new_iid()
    src.register(client, iid, uniq)
    dst.register(client, iid_d, uniq)
    toks = lib.tokens_for(uniq, 512)
    good = list(range(1, 33))
    for bad in (64, 1000, 2**31, 2**40, -1):
        blocks = [bad] + good[1:]
        res = client.store(lib.mkkey(uniq, toks, 0, 512, "s"), iid, [blocks], lib.EVENT)
        assert res[1] is False, f"store with block id {bad}: {res!r}"
    assert lib.lookup_hits(client, lib.mkkey(uniq, toks, 0, 512, "l0", worker_id=None)) == 0
    assert client.store(lib.mkkey(uniq, toks, 0, 512, "s"), iid, [good], lib.EVENT)[1] is True
    dst.fill_sentinel()
    before = dst.snapshot()
    for bad in (64, 5000, -3):
        assert lib.lookup_hits(client, lib.mkkey(uniq, toks, 0, 512, f"l{bad}", worker_id=None)) == 2
        res = client.retrieve(lib.mkkey(uniq, toks, 0, 512, f"l{bad}"), iid_d, [good[:-1] + [bad]], lib.EVENT, 0)
        assert res[1] is False, f"retrieve with block id {bad}: {res!r}"
        assert lib.unchanged_blocks(dst, before, range(dst.nb)) == [], f"retrieve with block id {bad} wrote blocks"
    # still fully functional
    assert lib.lookup_hits(client, lib.mkkey(uniq, toks, 0, 512, "ok", worker_id=None)) == 2
    assert client.retrieve(lib.mkkey(uniq, toks, 0, 512, "ok"), iid_d, [good], lib.EVENT, 0)[1] is True
    assert lib.compare_blocks(src, good, dst, good) == []


def test_bad_key_ranges(client, make_cache, uniq):
    """Unaligned / out-of-range key ranges and bad worker ids: answered with False, not dropped."""
    src = make_cache("src")
    src.fill_random(7)
    iid = lib.new_iid()
    src.register(client, iid, uniq)
    toks = lib.tokens_for(uniq, 300)
    b = list(range(1, 33))
    cases = {
        "unaligned end": lib.mkkey(uniq, toks, 0, 100, "s"),
        "unaligned start": lib.mkkey(uniq, toks, 10, 256, "s"),
        "end beyond tokens": lib.mkkey(uniq, toks, 0, 512, "s"),
        "start > end": lib.mkkey(uniq, toks, 256, 0, "s"),
        "worker_id None": lib.mkkey(uniq, toks, 0, 256, "s", worker_id=None),
        "worker_id >= world_size": lib.mkkey(uniq, toks, 0, 256, "s", worker_id=3),
    }
    for what, key in cases.items():
        res = client.store(key, iid, [b], lib.EVENT)
        assert res[1] is False, f"store with {what}: {res!r}"
        res = client.retrieve(key, iid, [b], lib.EVENT, 0)
        assert res[1] is False, f"retrieve with {what}: {res!r}"
    assert client.get_chunk_size() == 256


def _cuda_wrappers(kind: str, nl=2):
    out = []
    for layer in range(nl):
        md = lib.TensorMetadata(dtype="bfloat16", shape=(64, 16, 2, 64), stride=(2048, 128, 64, 1),
                                storage_offset=layer * 64 * 2048 if kind == "cuda" else 0,
                                device_uuid="4f1d6c2a-9b3e-4c4d-8a9b-0123456789ab")
        if kind == "cuda":
            d = lib.CudaIPCData(version=1, metadata=md,
                                handle=(0, b"\x03c" + bytes(range(64)), nl * 64 * 2048 * 2, 0,
                                        b"/torch_4242_1_0", 0, bytes(64), True))
        else:
            d = lib.RawCudaIPCData(version=1, metadata=md, ipc_handle=bytes(range(64)),
                                   alloc_offset=layer * 64 * 2048 * 2, nbytes=64 * 2048 * 2)
        out.append(lib.DeviceIPCWrapper.Deserialize(msgspec.msgpack.encode(d)))
    return out


@pytest.mark.parametrize("kind", ["cuda", "cuda_raw"])
def test_cuda_descriptors_answered(client, uniq, kind, server):
    iid = lib.new_iid()
    egi = [lib.EngineGroupInfo(engine_group_id=0, layer_indices=(0, 1), tokens_per_block=16)]
    r = client.register_kv_cache(iid, _cuda_wrappers(kind), uniq, 1, lib.EngineType.VLLM, {"kv_layout": "NHD"}, egi)
    assert r is None
    toks = lib.tokens_for(uniq, 256)
    assert client.store(lib.mkkey(uniq, toks, 0, 256, "s"), iid, [list(range(1, 17))], lib.EVENT)[1] is False
    assert client.retrieve(lib.mkkey(uniq, toks, 0, 256, "s"), iid, [list(range(1, 17))], lib.EVENT, 0)[1] is False
    assert lib.lookup_hits(client, lib.mkkey(uniq, toks, 0, 256, "l", worker_id=None)) == 0
    assert client.ping(iid) is True
    assert client.unregister_kv_cache(iid) is None
    assert client.get_chunk_size() == 256


def _shm_wrapper(name, nbytes, shape, stride, off=0):
    md = lib.TensorMetadata(dtype="bfloat16", shape=shape, stride=stride, storage_offset=off, device_uuid="cpu")
    return lib.CpuShmTensorWrapper.from_wire(lib.CpuShmIPCData(version=1, metadata=md, shm_name=name, nbytes=nbytes))


def _raw_register(raw, iid, model, name, nbytes, shape, stride, off=0):
    """register_kv_cache with a cpu_shm descriptor the real client would refuse to build."""
    desc = {"type": "cpu_shm", "shm_name": name, "nbytes": nbytes, "version": 1,
            "metadata": {"dtype": "bfloat16", "shape": list(shape), "stride": list(stride),
                         "storage_offset": off, "device_uuid": "cpu"}}
    egi = {"engine_group_id": 0, "layer_indices": [0], "tokens_per_block": 16, "sw_size_tokens": -1,
           "extra_object_group_tag": 0, "recurrent_state": False}
    frames = [enc(900), enc(1), enc(iid), enc([msgspec.msgpack.Ext(1, enc(desc))]), enc(model), enc(1),
              enc("vllm"), enc({"kv_layout": "NHD"}), enc([egi])]
    return raw.request(frames)


def test_bad_cpu_shm_descriptors(client, make_cache, uniq, raw):
    """Missing segment, nbytes larger than the segment, views beyond nbytes: answered, no crash,
    transfers for those instances fail."""
    kv = make_cache("small", nb=8)                      # 4 layers x 8 blocks, 128 KiB
    seg = kv.segments[0]
    shape, stride = (8, 16, 2, 64), (2048, 128, 64, 1)
    big_shape = (64, 16, 2, 64)
    egi = [lib.EngineGroupInfo(engine_group_id=0, layer_indices=(0,), tokens_per_block=16)]
    via_client = {
        "missing segment": (f"/cwmit_missing_{os.getpid()}", seg.size, shape, stride, 0),
        "nbytes > segment size": ("/" + seg.name, seg.size * 16, big_shape, stride, 0),
    }
    via_raw = {   # the real client validates these; a buggy or hostile peer might still send them
        "view beyond nbytes": ("/" + seg.name, seg.size, big_shape, stride, 0),
        "offset beyond nbytes": ("/" + seg.name, seg.size, shape, stride, seg.size),
        "nbytes 0": ("/" + seg.name, 0, shape, stride, 0),
    }
    toks = lib.tokens_for(uniq, 256)
    blocks = [list(range(40, 56))]          # beyond the real segment for the large views
    for what, (name, nbytes, shp, strd, off) in {**via_client, **via_raw}.items():
        iid = lib.new_iid()
        model = f"{uniq}-{what}"
        if what in via_client:
            r = client.register_kv_cache(iid, [_shm_wrapper(name, nbytes, shp, strd, off)], model, 1,
                                         lib.EngineType.VLLM, {"kv_layout": "NHD"}, egi)
            assert r is None, f"{what}: register returned {r!r}"
        else:
            reply = _raw_register(raw, iid, model, name, nbytes, shp, strd, off)
            assert reply is not None, f"{what}: register_kv_cache got no reply"
            assert reply[:2] == [enc(900), enc(1)], reply
        res = client.store(lib.mkkey(model, toks, 0, 256, "s"), iid, blocks, lib.EVENT)
        assert res[1] is False, f"{what}: store returned {res!r}"
        res = client.retrieve(lib.mkkey(model, toks, 0, 256, "s"), iid, blocks, lib.EVENT, 0)
        assert res[1] is False, f"{what}: retrieve returned {res!r}"
        assert client.unregister_kv_cache(iid) is None
        assert server_alive(client)


def server_alive(client):
    return client.get_chunk_size() == 256


# ---- malformed frames (raw pyzmq DEALER) ----------------------------------------------------------

class RawDealer:
    def __init__(self, url):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(url)

    def request(self, frames, timeout=lib.RPC_TIMEOUT):
        self.sock.send_multipart(frames)
        if self.sock.poll(int(timeout * 1000)):
            return self.sock.recv_multipart()
        return None

    def drain(self, timeout=0.3):
        out = []
        while self.sock.poll(int(timeout * 1000)):
            out.append(self.sock.recv_multipart())
        return out

    def close(self):
        self.sock.close(0)


@pytest.fixture
def raw(server):
    d = RawDealer(server.url)
    yield d
    d.close()


def _still_serving(client, server):
    assert server.alive(), "server process died"
    assert client.get_chunk_size() == 256
    assert client.ping(None) is True


def test_garbage_ops_do_not_crash(client, raw, server):
    garbage = [
        [enc(1), b"\xc1"],                                   # op frame is not msgpack
        [enc(2), enc(250)],                                  # unknown legacy id
        [enc(3), enc(11)],                                   # retired id
        [enc(4), enc("definitely_not_an_op"), enc(1)],       # unknown op name
        [enc(5), enc(1.5)],                                  # op of the wrong type
        [enc(6), enc(None)],
        [enc(7), enc(-1)],
        [enc(8), enc(2**64 - 1)],
        [enc(9), b""],                                       # empty op = stream control, unknown stream
        [enc(10), b"", b"ack"],
        [enc(11), b"", b"cancel"],
        [enc(12)],                                           # uid only
        [b"\xc1", enc(OP_GET_CHUNK_SIZE)],                   # undecodable uid
        [b"", enc(OP_GET_CHUNK_SIZE)],                       # empty uid frame
        [enc("not-an-int-uid"), enc(OP_GET_CHUNK_SIZE)],
        [enc(13), enc(OP_GET_CHUNK_SIZE), b"unexpected"],    # extra payload frame
        [enc(14), enc(8)],                                   # lookup without payloads
        [enc(15), enc(8), b"\xc1", b"\xc1"],                 # lookup with garbage payloads
        [enc(16), enc(1), b"\xc1", b"", b"", b"", b"", b"", b""],   # register_kv_cache garbage
        [enc(17), enc(1), enc(1), enc([msgspec.msgpack.Ext(1, b"\xc1")]), enc("m"), enc(1), enc("vllm"),
         enc({}), enc([])],                                  # register with a broken ext-1 descriptor
        [enc(18), enc(1), enc(1), enc([msgspec.msgpack.Ext(7, b"x")]), enc("m"), enc(1), enc("vllm"),
         enc({}), enc([])],                                  # unknown ext type
        [enc(19), enc(9), enc(12345)],                       # query_prefetch_status with an int
        [enc(20), enc(22), enc("x")],                        # ping with a str
        [enc(21), enc(20), enc("yes")],                      # clear with a str
        [enc(22), enc(13)],                                  # end_session without payload
        [enc(23), enc(OP_GET_CHUNK_SIZE)] + [b"x" * 1_000_000],   # big junk frame
    ]
    for frames in garbage:
        raw.sock.send_multipart(frames)
        _still_serving(client, server)
    raw.drain()
    _still_serving(client, server)


def _key_bytes(**over):
    fields = dict(model_name="m-raw", world_size=1, worker_id=0, token_ids=tuple(range(256)), start=0, end=256,
                  request_id="raw", cache_salt="", request_configs=None, num_kv_readers=1)
    fields.update(over)
    return enc(fields)


def _malformed_transfers(iid):
    ev = enc(lib.EVENT)
    blocks = enc([list(range(1, 17))])
    key = _key_bytes()
    store = {
        "key not msgpack": [b"\xc1", enc(iid), blocks, ev],
        "key is a str": [enc("hello"), enc(iid), blocks, ev],
        "key is an empty map": [enc({}), enc(iid), blocks, ev],
        "key missing fields": [enc({"model_name": "m-raw"}), enc(iid), blocks, ev],
        "key truncated array32 header": [b"\xdd\xff\xff\xff\xff", enc(iid), blocks, ev],
        "key token_ids truncated array32": [b"\x84" + enc("model_name") + enc("m") + enc("world_size") + enc(1)
                                            + enc("worker_id") + enc(0) + enc("token_ids") + b"\xdd\x7f\xff\xff\xff",
                                            enc(iid), blocks, ev],
        "token id >= 2^32": [_key_bytes(token_ids=(2**40,) * 256), enc(iid), blocks, ev],
        "negative token id": [_key_bytes(token_ids=(-1,) * 256), enc(iid), blocks, ev],
        "token_ids not ints": [_key_bytes(token_ids=("a",) * 256), enc(iid), blocks, ev],
        "world_size 0": [_key_bytes(world_size=0), enc(iid), blocks, ev],
        "negative world_size": [_key_bytes(world_size=-2), enc(iid), blocks, ev],
        "iid not msgpack": [key, b"\xc1", blocks, ev],
        "iid is a str": [key, enc("iid"), blocks, ev],
        "iid negative": [key, enc(-1), blocks, ev],
        "blocks not msgpack": [key, enc(iid), b"\xc1", ev],
        "blocks is a str": [key, enc(iid), enc("blocks"), ev],
        "blocks flat list": [key, enc(iid), enc(list(range(1, 17))), ev],
        "blocks of strs": [key, enc(iid), enc([["a"] * 16]), ev],
        "event not bytes": [key, enc(iid), blocks, enc(123)],
        "too few frames (1)": [key],
        "too few frames (3)": [key, enc(iid), blocks],
        "no payload frames": [],
    }
    retrieve = {name: frames + [enc(0)] for name, frames in store.items() if len(frames) == 4}
    retrieve.update({
        "skip not msgpack": [key, enc(iid), blocks, ev, b"\xc1"],
        "skip is a str": [key, enc(iid), blocks, ev, enc("zero")],
        "too few frames (4)": [key, enc(iid), blocks, ev],
        "too few frames (2)": [key, enc(iid)],
    })
    return store, retrieve


def test_malformed_store_retrieve_answered_false(client, raw, server, make_cache):
    kv = make_cache()
    iid = lib.new_iid()
    kv.register(client, iid, "m-raw")
    store, retrieve = _malformed_transfers(iid)
    sent = {}                                   # uid -> (name, op)
    uid = 1000
    for op, cases in ((OP_STORE, store), (OP_RETRIEVE, retrieve)):
        for what, payloads in cases.items():
            uid += 1
            sent[uid] = (f"{'store' if op == OP_STORE else 'retrieve'} with {what}", op)
            raw.sock.send_multipart([enc(uid), enc(op)] + payloads)
    replies = {}
    deadline = lib.time.monotonic() + lib.RPC_TIMEOUT
    while len(replies) < len(sent) and lib.time.monotonic() < deadline:
        if raw.sock.poll(100):
            msg = raw.sock.recv_multipart()
            try:
                replies[msgspec.msgpack.decode(msg[0])] = msg
            except Exception:  # noqa: BLE001
                replies[("undecodable uid", len(replies))] = msg
    failures = []
    for uid, (name, op) in sent.items():
        reply = replies.get(uid)
        if reply is None:
            failures.append(f"{name}: no reply within {lib.RPC_TIMEOUT:g}s")
        elif reply[1] != enc(op):
            failures.append(f"{name}: reply does not echo the op frame: {reply[1]!r}")
        elif len(reply) != 3:
            failures.append(f"{name}: expected one payload frame, got {len(reply) - 2}")
        else:
            try:
                got = msgspec.msgpack.decode(reply[2])
            except msgspec.DecodeError as e:
                got = f"undecodable payload {reply[2]!r}: {e}"
            if got != [b"", False]:
                failures.append(f"{name}: reply {got!r}, expected [b'', False]")
    assert server.alive(), "server process died"
    assert not failures, f"{len(failures)} of {len(sent)} malformed requests mishandled:\n" + "\n".join(failures)
    _still_serving(client, server)
    # the instance used above still works normally
    kv.fill_random(3)
    toks = tuple(range(256))
    assert client.store(lib.mkkey("m-raw", toks, 0, 256, "ok"), iid, [list(range(1, 17))], lib.EVENT)[1] is True


def test_too_many_payload_frames_answered(client, raw, server, make_cache):
    """Extra trailing frames: a reply must still arrive (either outcome is tolerable)."""
    kv = make_cache()
    iid = lib.new_iid()
    kv.register(client, iid, "m-raw")
    frames = [enc(77), enc(OP_STORE), _key_bytes(request_id="extra"), enc(iid), enc([list(range(1, 17))]),
              enc(lib.EVENT), enc(0), enc("junk")]
    reply = raw.request(frames)
    assert reply is not None, "store with extra payload frames got no reply"
    assert reply[:2] == [enc(77), enc(OP_STORE)]
    got = msgspec.msgpack.decode(reply[2])
    assert isinstance(got, list) and len(got) == 2 and isinstance(got[0], bytes) and isinstance(got[1], bool), got
    _still_serving(client, server)


def test_op_by_name_string(raw):
    """Ops may arrive as msgpack strings instead of legacy ids (wire.py:62-72); the reply's op frame
    must name the same op (the real client compares names)."""
    from lmcache.v1.multiprocess.transport.zmq_impl.wire import decode_operation
    for uid, (op, payloads, want) in enumerate([("get_chunk_size", [], 256), ("noop", [], "OK"),
                                                ("ping", [enc(None)], True)]):
        reply = raw.request([enc(uid), enc(op)] + payloads)
        assert reply is not None, f"{op} sent by name got no reply"
        assert reply[0] == enc(uid) and decode_operation(reply[1]) == op, reply
        assert msgspec.msgpack.decode(reply[2]) == want
