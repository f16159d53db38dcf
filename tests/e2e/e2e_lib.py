"""Helpers of the vLLM end-to-end tests and the TTFT benchmark: free ports, `cwm serve` (or
LMCache's own server) as a subprocess with its stderr in a file, and one vLLM engine per process
(vllm_engine.py) with its log in a file."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
WORK = os.path.join(HERE, ".work")
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_dir(mode: str, server: str = "cwm") -> str:
    """Where one run of e2e_vllm.py keeps its logs and results."""
    name = mode if server == "cwm" else f"{server}-{mode}"
    isa = os.environ.get("CWM_E2E_ISA", "native")
    if isa != "native":
        name += f"-{isa}"
    return os.environ.get("CWM_E2E_OUT") or os.path.join(WORK, "runs", name)


def tail(path: str, n: int = 40, width: int = 400) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [ln.rstrip("\n")[:width] for ln in f if ln.strip()]
    except OSError as e:
        return f"({path}: {e})"
    return "\n".join(lines[-n:])


def cwm_bin() -> str:
    b = os.environ.get("CWM_BIN") or os.path.join(REPO, "target", "release", "cwm")
    if not os.access(b, os.X_OK):
        raise RuntimeError(f"cwm binary not found at {b}: run `cargo build --release` or set CWM_BIN")
    return b


def cwm_has_flag(flag: str) -> bool:
    out = subprocess.run([cwm_bin(), "serve", "--help"], capture_output=True, text=True).stdout
    return flag in out


class Server:
    """A KV server subprocess (cwm serve, or LMCache's own) listening on 127.0.0.1:port.

    stderr and stdout go to `log` (appended across restarts, each start marked)."""

    def __init__(self, argv_for_port, log: str, name: str, env=None):
        self.argv_for_port = argv_for_port       # port -> argv
        self.log = log
        self.name = name
        self.env = env
        self.port = None
        self.proc = None

    def start(self, port=None, ready_timeout: float = 60.0):
        self.port = port or self.port or free_port()
        argv = self.argv_for_port(self.port)
        with open(self.log, "a") as f:
            f.write(f"==== {time.strftime('%H:%M:%S')} starting: {' '.join(argv)}\n")
        logf = open(self.log, "a")
        self.proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=self.env,
                                     start_new_session=True)
        logf.close()
        deadline = time.time() + ready_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} at start:\n"
                                   f"{tail(self.log)}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} did not listen on port {self.port} within "
                           f"{ready_timeout:.0f} s:\n{tail(self.log)}")

    def stop(self, timeout: float = 20.0):
        """SIGTERM (SIGKILL after `timeout`); a cwm's kept L1 pool is removed after it."""
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        if self.name == "cwm serve":
            remove_cwm_pools(self.log)

    def signal(self, sig, timeout: float = 60.0):
        """Send `sig` to the server's process group and wait for it to exit; its exit status
        (None if it outlived `timeout` and was killed)."""
        p, self.proc = self.proc, None
        if p is None:
            return None
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            return None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def cwm_server(log: str, l1_gb: float = 2.0, l2_path=None, extra=(), binary=None) -> Server:
    def argv(port):
        a = [binary or cwm_bin(), "serve", "--host", "127.0.0.1", "--port", str(port),
             "--l1-size-gb", str(l1_gb)]
        if l2_path is not None:
            a += ["--l2-path", l2_path]
        return a + list(extra)
    return Server(argv, log, "cwm serve")


def lmcache_server(log: str, l1_gb: float = 2.0, extra=()) -> Server:
    """LMCache 0.5.6's own MP server from the same venv."""
    def argv(port):
        return [PY, "-m", "lmcache.v1.multiprocess.server", "--host", "127.0.0.1",
                "--port", str(port), "--l1-size-gb", str(l1_gb), "--eviction-policy", "LRU",
                *extra]
    env = dict(os.environ, LMCACHE_DISABLE_BANNER="1")
    return Server(argv, log, "lmcache server", env=env)


SIMD_PREFIXES = ("sse4", "avx", "fma", "f16c", "amx")
ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def cpu_info() -> dict:
    """The CPU model, its SIMD flags and the ISA caps set in the environment: vLLM's CPU kernels
    round a split prefill differently on different instruction sets, so every e2e log and
    benchmark figure says which one it ran on."""
    model, flags = "unknown", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "model name" and model == "unknown":
                    model = val.strip()
                elif key == "flags" and not flags:
                    flags = sorted(x for x in val.split() if x.startswith(SIMD_PREFIXES))
    except OSError as e:
        model = f"unknown ({e})"
    caps = {k: os.environ[k] for k in ISA_CAPS if k in os.environ}
    if os.environ.get("CWM_E2E_ISA", "native") != "native":
        caps["CWM_E2E_ISA"] = os.environ["CWM_E2E_ISA"]
    return {"model": model, "simd": " ".join(flags), "isa_caps": caps}


def cpu_line(info=None) -> str:
    i = info or cpu_info()
    caps = " ".join(f"{k}={v}" for k, v in i["isa_caps"].items()) or "none"
    return f"CPU: {i['model']}; SIMD: {i['simd']}; ISA caps: {caps}"


def engine_env_for(env: dict) -> dict:
    """An engine process's environment. CWM_E2E_ISA=avx2 runs the engines on the code paths of
    an AVX2-only CPU on a machine that has AVX-512: torch's kernels (ATEN_CPU_CAPABILITY),
    oneDNN's (ONEDNN_MAX_CPU_ISA) and vLLM's own (isa_cap/sitecustomize.py hides AVX-512 and AMX
    from torch.cpu.get_capabilities(), so vLLM loads its _C_AVX2 library)."""
    isa = env.get("CWM_E2E_ISA", "native")
    if isa == "avx2":
        env["ATEN_CPU_CAPABILITY"] = "avx2"
        env["ONEDNN_MAX_CPU_ISA"] = "AVX2"
        cap = os.path.join(HERE, "isa_cap")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (cap, env.get("PYTHONPATH")) if p)
    elif isa != "native":
        raise RuntimeError(f"CWM_E2E_ISA must be native or avx2, not {isa!r}")
    return env


class EngineFailed(RuntimeError):
    pass


class EngineRun:
    """vllm_engine.py running `plan` in its own process (its own session), started by
    start_engine; wait() collects its result."""

    def __init__(self, plan: dict, out_dir: str, name: str):
        self.plan, self.name = plan, name
        self.res_path = os.path.join(out_dir, f"{name}.result.json")
        self.log_path = os.path.join(out_dir, f"{name}.log")
        plan_path = os.path.join(out_dir, f"{name}.plan.json")
        with open(plan_path, "w") as f:
            json.dump(plan, f)
        if os.path.exists(self.res_path):
            os.remove(self.res_path)
        env = engine_env_for(dict(os.environ, LMCACHE_DISABLE_BANNER="1", PYTHONUNBUFFERED="1"))
        self.t0 = time.time()
        with open(self.log_path, "w") as logf:
            self.proc = subprocess.Popen(
                [PY, os.path.join(HERE, "vllm_engine.py"), plan_path, self.res_path],
                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float) -> dict:
        """Wait for the engine to exit (killed after `timeout`); its result. Raises EngineFailed
        (with the log tail) if it did not finish; the partial result is in the exception's
        .result."""
        p = self.proc
        try:
            rc = p.wait(max(1.0, timeout - (time.time() - self.t0)))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc = f"killed after {timeout:.0f} s"
        # vLLM's engine-core and worker processes are in the engine's session; make sure none
        # is left holding a core or the shared-memory KV cache.
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        remove_dead_kv_shm(self.t0)
        result = {}
        if os.path.exists(self.res_path):
            with open(self.res_path) as f:
                result = json.load(f)
        result["wall_s"] = time.time() - self.t0
        result["log"] = self.log_path
        if rc != 0 or not result.get("done"):
            e = EngineFailed(f"engine {self.name!r} did not finish (exit {rc}, "
                             f"{len(result.get('steps', []))} of {len(self.plan['steps'])} steps "
                             f"done); log {self.log_path}; last lines:\n"
                             f"{interesting_tail(self.log_path)}")
            e.result = result
            raise e
        return result


def start_engine(plan: dict, out_dir: str, name: str) -> EngineRun:
    return EngineRun(plan, out_dir, name)


def run_engine(plan: dict, out_dir: str, name: str, timeout: float = 480.0) -> dict:
    """Run vllm_engine.py with `plan` in its own process; return its result (whatever steps were
    done). Raises EngineFailed (with the log tail) if it did not finish; the partial result is in
    the exception's .result."""
    return start_engine(plan, out_dir, name).wait(timeout)


def remove_cwm_pools(log_path: str) -> None:
    """Remove the L1 pools a stopped cwm named in its start lines: a cwm stopped (or killed) with
    an engine-driven engine still registered keeps its pool in /dev/shm for the next cwm to adopt
    (docs/ENGINE_DRIVEN.md), which a test run must not leave behind."""
    try:
        with open(log_path, errors="replace") as f:
            text = f.read()
    except OSError:
        return
    for name in set(re.findall(r'l1_pool=(?:Some\()?"?([A-Za-z0-9_.-]+)', text)):
        try:
            os.unlink(os.path.join("/dev/shm", name))
        except OSError:
            pass


def remove_dead_kv_shm(since: float) -> None:
    """A vLLM worker killed before its clean exit leaves its 1 GiB KV cache in /dev/shm
    (lmcache_kv_<pid>_<n>). Remove those made since `since` whose process is gone."""
    d = "/dev/shm"
    try:
        names = os.listdir(d)
    except OSError:
        return
    for n in names:
        parts = n.split("_")
        if len(parts) != 4 or parts[:2] != ["lmcache", "kv"] or not parts[2].isdigit():
            continue
        path = os.path.join(d, n)
        try:
            if os.stat(path).st_mtime < since - 1 or os.path.exists(f"/proc/{parts[2]}"):
                continue
            os.unlink(path)
        except OSError:
            pass


def interesting_tail(log_path: str, n: int = 30) -> str:
    """The end of a vLLM log, without the progress bars and banner noise."""
    try:
        with open(log_path, errors="replace") as f:
            lines = [ln.rstrip("\n")[:400] for ln in f]
    except OSError as e:
        return str(e)
    keep = [ln for ln in lines if ln.strip() and "it/s]" not in ln and "Completed |" not in ln]
    return "\n".join(keep[-n:])


def metrics(http_port: int) -> dict:
    """cwm's /metrics as {name: value summed over its labels, and name{labels}: value}; {} when
    cwm does not answer."""
    import urllib.request
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5).read()
    except OSError:
        return {}
    out = {}
    for line in text.decode().splitlines():
        if not line or line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        name = sample.split("{", 1)[0]
        try:
            v = float(value)
        except ValueError:
            continue
        out[name] = out.get(name, 0.0) + v
        if sample != name:
            out[sample] = v
    return out
