//! cwm: a KV-cache sidecar for vLLM.
