"""pytest glue of the vLLM end-to-end tests: the cwm log on failure, the counters at the end."""
import json
import os

import pytest

import e2e_lib as E


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    log = os.environ.get("CWM_E2E_CURRENT_CWM_LOG")
    if rep.failed and log and not getattr(item.session, "_cwm_log_shown", False):
        item.session._cwm_log_shown = True
        rep.sections.append(("cwm serve log (tail)", E.tail(log, 40)))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not any("e2e_vllm" in str(a) for a in config.args):
        return                                   # not the vLLM story (e.g. lmcache_bench.py)
    mode = os.environ.get("CWM_E2E_MODE", "lmcache_driven")
    server = os.environ.get("CWM_E2E_SERVER", "cwm")
    out = E.run_dir(mode, server)
    path = os.path.join(out, "story.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        s = json.load(f)
    tr = terminalreporter
    tr.section(f"vLLM counters per request (server {server}, mode {mode}; logs in {out})")
    if "cpu" in s:
        tr.write_line(E.cpu_line(s["cpu"]))
    tr.write_line(f"{'engine':6} {'request':9} {'external_hits':>13} {'ext_queries':>11} "
                  f"{'own_hits':>8} {'num_cached':>10} {'wall_s':>7}  first tokens")
    for name, res in s["engines"].items():
        if res.get("engine_start_s") is not None:
            cpu = res.get("cpu", {})
            tr.write_line(f"{name:6} (engine start {res['engine_start_s']:.1f} s, "
                          f"process {res.get('wall_s', 0):.1f} s; torch ISA "
                          f"{cpu.get('torch_capability', '?')}, vLLM kernels "
                          f"{' '.join(cpu.get('vllm_kernels', [])) or '?'})")
        for st in res.get("steps", []):
            if st.get("op") != "generate":
                continue
            d = st["delta"]
            tr.write_line(f"{name:6} {st['name']:9} {d['vllm:external_prefix_cache_hits']:>13} "
                          f"{d['vllm:external_prefix_cache_queries']:>11} "
                          f"{d['vllm:prefix_cache_hits']:>8} {st['num_cached_tokens']:>10} "
                          f"{st['wall_s']:>7.2f}  {st['tokens'][:4]}")
    for k, v in s.get("errors", {}).items():
        tr.write_line(f"error [{k}]: {v.splitlines()[0]}")
