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

import pytest

import interop_lib as lib


def pytest_configure(config):
    config.addinivalue_line("markers", "mock_xfail(reason): expected to fail against the mock server only")


def pytest_collection_modifyitems(config, items):
    if lib.TARGET != "mock":
        return
    for item in items:
        m = item.get_closest_marker("mock_xfail")
        if m is not None:
            item.add_marker(pytest.mark.xfail(reason=m.args[0] if m.args else "mock limitation", strict=False))


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
