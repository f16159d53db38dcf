"""Context windows through the official Python MCP SDK (streamable HTTP) while the REAL lmcache
client stores and retrieves: store a conversation under salt S, window_freeze, restart `cwm
serve` on the same L2 directory (L1 empty), window_thaw (with progress notifications), every
chunk hits under S and retrieves byte-exact; a clone thaws under S2 while a third salt sees
nothing; bad inputs are tool errors that change nothing."""
import asyncio
import uuid

import pytest

import interop_lib as lib

pytestmark = pytest.mark.skipif(lib.TARGET == "mock", reason="MCP windows are cwm's own (no mock)")

from mcp import ClientSession  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402


async def _calls(url: str, calls: list[tuple[str, dict]], progress: list | None = None) -> list:
    """Run tool calls in one MCP session; each answer is (is_error, structured or text)."""
    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        if progress is not None:
            progress.append((done, total))

    out = []
    async with streamable_http_client(url) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            for name, args in calls:
                r = await session.call_tool(name, args, progress_callback=on_progress)
                text = "".join(getattr(c, "text", "") for c in r.content)
                out.append((r.is_error, text if r.is_error else r.structured_content))
    return out


def call(url: str, name: str, args: dict, progress: list | None = None):
    return asyncio.run(_calls(url, [(name, args)], progress))[0]


def test_freeze_restart_thaw_clone_over_mcp(log_dir, make_cache, uniq, tmp_path, monkeypatch):
    http = lib.free_port()
    # Appended last to `cwm serve`'s flags, so they win over the suite's defaults.
    monkeypatch.setenv("CWM_SERVER_ARGS", f"--http-port {http} --l2-path {tmp_path / 'l2'} --l2-size-gb 1")
    srv = lib.ServerProcess(log_dir, name="mcp").start()
    url = f"http://127.0.0.1:{http}/mcp"
    c = lib.Client(srv.url)
    try:
        src, dst = make_cache("src"), make_cache("dst")
        src.fill_random(11)
        dst.fill_sentinel()
        iid_s, iid_d = lib.new_iid(), lib.new_iid()
        src.register(c, iid_s, uniq)
        salt, salt2 = "conv-" + uuid.uuid4().hex[:8], "branch-" + uuid.uuid4().hex[:8]
        toks = lib.tokens_for(uniq, 600)
        assert c.store(lib.mkkey(uniq, toks, 0, 512, "s1", salt=salt), iid_s, [list(range(1, 33))],
                       lib.EVENT)[1] is True

        err, r = call(url, "window_freeze", {"session_id": salt, "window_name": "py-chat",
                                             "description": "from python", "tags": ["py"]})
        assert not err, r
        assert r["window"]["tokens"] == 512 and r["window"]["chunks"] == 2, r

        # Bad inputs: tool errors, nothing changes.
        before = call(url, "window_list", {})
        for name, args, want in [
            ("window_freeze", {"session_id": salt, "window_name": "py-chat"}, "taken"),
            ("window_freeze", {"session_id": "nobody-" + uniq[-8:], "window_name": "x"}, "nothing stored"),
            ("window_freeze", {"session_id": salt, "window_name": "bad name"}, "invalid window name"),
            ("window_thaw", {"window_name": "missing"}, "no window named"),
            ("window_delete", {"window_name": "missing"}, "no window named"),
        ]:
            err, text = call(url, name, args)
            assert err and want in text, (name, args, text)
        assert call(url, "window_list", {}) == before

        srv.stop()
        srv.start()                                  # same ports, same L2 directory, empty L1
        dst.register(c, iid_d, uniq)
        progress: list = []
        err, r = call(url, "window_thaw", {"window_name": "py-chat"}, progress)
        assert not err, r
        assert r["tokens_ready"] == 512 and r["tiers"]["l2"] == 2, r
        assert progress and progress[-1] == (2, 2), progress

        assert lib.lookup_hits(c, lib.mkkey(uniq, toks, 0, 512, "l1", worker_id=None, salt=salt)) == 2
        assert c.retrieve(lib.mkkey(uniq, toks, 0, 512, "l1", salt=salt), iid_d, [list(range(1, 33))],
                          lib.EVENT, 0)[1] is True
        assert lib.compare_blocks(src, range(1, 33), dst, range(1, 33)) == []

        dst.fill_sentinel()
        err, r = call(url, "window_clone", {"source_window": "py-chat", "new_window_name": "py-chat.b",
                                            "new_session_id": salt2})
        assert not err, r
        err, r = call(url, "window_thaw", {"window_name": "py-chat.b"})
        assert not err and r["session_id"] == salt2 and r["tokens_ready"] == 512, r
        assert lib.lookup_hits(c, lib.mkkey(uniq, toks, 0, 512, "l2", worker_id=None, salt=salt2)) == 2
        assert c.retrieve(lib.mkkey(uniq, toks, 0, 512, "l2", salt=salt2), iid_d, [list(range(1, 33))],
                          lib.EVENT, 0)[1] is True
        assert lib.compare_blocks(src, range(1, 33), dst, range(1, 33)) == []
        third = "third-" + uuid.uuid4().hex[:8]
        assert lib.lookup_hits(c, lib.mkkey(uniq, toks, 0, 512, "l3", worker_id=None, salt=third)) == 0

        err, r = call(url, "window_delete", {"window_name": "py-chat"})
        assert not err and r["records_shared"] == 2, r
        err, r = call(url, "health", {})
        assert not err and r["status"] == "ok" and r["windows"] == 1, r
    finally:
        c.close()
        srv.stop()
