"""Fixtures of the cwm interop suite (see README.md).

`server`      the shared `cwm serve` (or mock) process of the session; restarted if a test kills it,
              and a test after which it is found dead fails with its log.
`new_server`  factory for a dedicated server process (restart / eviction tests), stopped at teardown.
`client`      a real lmcache client connected to `server` (closed at teardown).
`make_cache`  factory for POSIX-shm KV caches (unlinked at teardown).
`uniq`        a per-test unique prefix for model names, request ids and salts.
"""
import os
import re
import signal
import time

import pytest

import interop_lib as lib


def pytest_configure(config):
    config.addinivalue_line("markers", "mock_xfail(reason): expected to fail against the mock server only")
    config.addinivalue_line("markers", "cwm_gap(reason): a known, reported cwm gap: xfail against cwm "
                                       "unless CWM_INTEROP_STRICT=1")


def pytest_collection_modifyitems(config, items):
    strict = os.environ.get("CWM_INTEROP_STRICT", "") not in ("", "0")
    for item in items:
        m = item.get_closest_marker("mock_xfail")
        if m is not None and lib.TARGET == "mock":
            item.add_marker(pytest.mark.xfail(reason=m.args[0] if m.args else "mock limitation", strict=False))
        m = item.get_closest_marker("cwm_gap")
        if m is not None and lib.TARGET == "cwm" and not strict:
            item.add_marker(pytest.mark.xfail(reason="known cwm gap: " + (m.args[0] if m.args else ""),
                                              strict=False))


def pytest_report_header(config):
    if lib.TARGET == "mock":
        what = "mock server (tests/interop/mock_server.py)"
    else:
        try:
            what = lib.cwm_bin()
        except FileNotFoundError as e:
            what = f"(missing) {e}"
    return [f"cwm interop target: {lib.TARGET}: {what}", f"rpc timeout: {lib.RPC_TIMEOUT:g}s"]


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory):
    d = os.environ.get("CWM_INTEROP_LOG_DIR")
    if d:
        os.makedirs(d, exist_ok=True)
        return d
    return str(tmp_path_factory.mktemp("server-logs"))


def _attach(item, srv):
    servers = item.__dict__.setdefault("_cwm_servers", [])
    servers.append((srv, os.path.getsize(srv.log_path) if os.path.exists(srv.log_path) else 0))


@pytest.fixture(scope="session")
def _session_server(log_dir):
    srv = lib.ServerProcess(log_dir, name="session")
    srv.start()
    yield srv
    srv.stop()


def _thread_stacks() -> str:
    import io
    import sys
    import threading
    import traceback
    out = io.StringIO()
    names = {t.ident: t.name for t in threading.enumerate()}
    for ident, frame in sys._current_frames().items():  # noqa: SLF001
        out.write(f"--- thread {names.get(ident, ident)}\n")
        traceback.print_stack(frame, file=out)
    return out.getvalue()


@pytest.fixture
def server(_session_server, request):
    srv = _session_server
    if not srv.alive():                                  # a previous test crashed it
        srv.start()
    _attach(request.node, srv)
    yield srv
    if not srv.alive():
        code = srv.proc.returncode if srv.proc else None
        pytest.fail(f"the server process died during this test (exit code {code})", pytrace=False)
    # Health check, so that one wedged component does not fail every later test.
    if not lib.raw_probe(srv.url):
        if lib.TARGET == "mock":
            srv.proc.send_signal(signal.SIGUSR1)         # mock: faulthandler dumps its stack to the log
            time.sleep(0.5)
        srv.stop(signal.SIGKILL)
        srv.start()
        pytest.fail("the server stopped answering (a raw DEALER's get_chunk_size got no reply in 5 s); "
                    "it was killed and restarted for the next tests", pytrace=False)
    if not lib.client_loop_healthy(srv.url):
        stacks = _thread_stacks()
        lib.reset_client_loop()
        pytest.fail("the server answers a raw DEALER but a new lmcache client gets no reply: the client's "
                    "shared polling loop in this test process is wedged (reset for the next tests)\n" + stacks,
                    pytrace=False)


@pytest.fixture
def new_server(log_dir, request):
    made = []

    def make(**kw):
        srv = lib.ServerProcess(log_dir, name=re.sub(r"\W+", "_", request.node.name)[:40], **kw)
        made.append(srv)
        _attach(request.node, srv)
        return srv.start()

    yield make
    for srv in made:
        srv.stop()


@pytest.fixture
def client(server):
    c = lib.Client(server.url)
    yield c
    c.close()


@pytest.fixture
def make_cache(request):
    made = []
    base = re.sub(r"\W+", "", request.node.name)[:16]

    def make(tag="kv", layout="NHD", **kw):
        cache = lib.KVCache(f"{base}_{tag}", layout=layout, **kw)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        cache.close()


@pytest.fixture
def uniq(request):
    return "it-" + re.sub(r"\W+", "-", request.node.name)[:60] + "-" + lib.uuid.uuid4().hex[:8]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for srv, offset in item.__dict__.get("_cwm_servers", []):
            text = srv.log_text()
            part = text[offset:] if len(text) >= offset else text
            lines = part.splitlines()
            if len(lines) > 150:
                lines = ["..."] + lines[-150:]
            rep.sections.append((f"server log {srv.log_path} (during this test)", "\n".join(lines) or "(empty)"))
