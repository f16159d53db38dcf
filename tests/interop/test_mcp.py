"""Context windows through the official Python MCP SDK, over both transports (streamable HTTP at
`/mcp`, and `cwm mcp` launched as a stdio server), while the REAL lmcache client stores and
retrieves: store a conversation under salt S, window_freeze, restart `cwm serve` on the same L2
directory (L1 empty), window_thaw (with progress notifications), every chunk hits under S and
retrieves byte-exact; a clone thaws under S2 while a third salt sees nothing; the original is
deleted and the clone still thaws from disk; the clone is exported, imported into a fresh data
directory, and thawed there byte-exact; bad inputs are tool errors that change nothing."""
import asyncio
import subprocess
import sys
import urllib.request
import uuid

import pytest

import interop_lib as lib

pytestmark = pytest.mark.skipif(lib.TARGET == "mock", reason="MCP windows are cwm's own (no mock)")

from mcp import ClientSession, StdioServerParameters  # noqa: E402
from mcp.client.stdio import stdio_client  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

TRANSPORT = "http"   # set per test by the fixture below


async def _calls(url: str, calls: list[tuple[str, dict]], progress: list | None = None) -> list:
    """Run tool calls in one MCP session over TRANSPORT; each answer is (is_error, structured or
    text). Over stdio the client launches `cwm mcp --url URL`, as a desktop MCP client would."""
    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        if progress is not None:
            progress.append((done, total))

    if TRANSPORT == "stdio":
        connect = stdio_client(StdioServerParameters(command=lib.cwm_bin(), args=["mcp", "--url", url]))
    else:
        connect = streamable_http_client(url)
    out = []
    async with connect as streams:
        read, write = streams[0], streams[1]
        async with ClientSession(read, write) as session:
            await session.initialize()
            for name, args in calls:
                r = await session.call_tool(name, args, progress_callback=on_progress)
                text = "".join(getattr(c, "text", "") for c in r.content)
                out.append((r.is_error, text if r.is_error else r.structured_content))
    return out


def call(url: str, name: str, args: dict, progress: list | None = None):
    return asyncio.run(_calls(url, [(name, args)], progress))[0]


def windows_cli(*args: str) -> str:
    """`cwm windows ...` (offline, on a data directory no sidecar is serving)."""
    r = subprocess.run([lib.cwm_bin(), "windows", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"cwm windows {' '.join(args)} exited {r.returncode}: {r.stderr}"
    return r.stdout


@pytest.mark.parametrize("transport", ["http", "stdio"])
def test_freeze_restart_thaw_clone_over_mcp(transport, log_dir, make_cache, uniq, tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "TRANSPORT", transport)
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
        # Progress to 2 of 2 chunks, each value once (the order seen is the SDK's to keep).
        assert progress and max(progress) == (2, 2) and len(set(progress)) == len(progress), progress

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

        # The original is gone; the clone still thaws, from disk, byte-exact.
        cleared = urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{http}/cache/clear", method="POST"), timeout=30).read()
        assert b"ok" in cleared, cleared
        dst.fill_sentinel()
        err, r = call(url, "window_thaw", {"window_name": "py-chat.b"})
        assert not err and r["tokens_ready"] == 512 and r["tiers"]["l2"] == 2, r
        assert lib.lookup_hits(c, lib.mkkey(uniq, toks, 0, 512, "l4", worker_id=None, salt=salt2)) == 2
        assert c.retrieve(lib.mkkey(uniq, toks, 0, 512, "l4", salt=salt2), iid_d, [list(range(1, 33))],
                          lib.EVENT, 0)[1] is True
        assert lib.compare_blocks(src, range(1, 33), dst, range(1, 33)) == []
    finally:
        c.close()
        srv.stop()

    # Export the clone, import it into a fresh data directory, serve that, thaw: byte-exact.
    exported, fresh = tmp_path / "py-chat.b.cwmw", tmp_path / "fresh-l2"
    windows_cli("export", "py-chat.b", str(exported), "--l2-path", str(tmp_path / "l2"))
    windows_cli("import", str(exported), "--l2-path", str(fresh))
    assert "py-chat.b" in windows_cli("list", "--l2-path", str(fresh))
    monkeypatch.setenv("CWM_SERVER_ARGS", f"--http-port {http} --l2-path {fresh} --l2-size-gb 1")
    srv = lib.ServerProcess(log_dir, name="mcp-imported").start()
    c = lib.Client(srv.url)
    try:
        dst.fill_sentinel()
        iid_i = lib.new_iid()
        dst.register(c, iid_i, uniq)
        err, r = call(url, "window_thaw", {"window_name": "py-chat.b"})
        assert not err and r["session_id"] == salt2 and r["tokens_ready"] == 512, r
        assert lib.lookup_hits(c, lib.mkkey(uniq, toks, 0, 512, "l5", worker_id=None, salt=salt2)) == 2
        assert c.retrieve(lib.mkkey(uniq, toks, 0, 512, "l5", salt=salt2), iid_i, [list(range(1, 33))],
                          lib.EVENT, 0)[1] is True
        assert lib.compare_blocks(src, range(1, 33), dst, range(1, 33)) == []
    finally:
        c.close()
        srv.stop()
