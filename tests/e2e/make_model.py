#!/usr/bin/env python3
"""Write a small Llama (config.json + model.safetensors, seeded random weights) into a directory.

Nothing can be downloaded from a model hub on the test machines, so the end-to-end tests and the
TTFT benchmark use a model written here. The weights are random but of a sensible scale
(Kaiming-like, with somewhat sharper attention) so that the output depends on the whole KV cache:
changing token 0 of a long prompt visibly moves the next-token logprobs, which makes "the same
output after a cache hit" a real check. No tokenizer: engines run with skip_tokenizer_init=True
and prompts as token ids.

    python make_model.py DIR                 # the tiny test model (2 layers, hidden 256)
    python make_model.py DIR --preset bench  # the TTFT benchmark model (4 layers, hidden 512)

Idempotent: a directory whose config.json and stamp already match is left alone.
"""
import argparse
import json
import os
import sys

PRESETS = {
    # ~2.8M non-embedding parameters; 2 KiB of KV per token (bf16).
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 vocab_size=8192, max_position_embeddings=4096),
    # Prefill of 4k tokens takes seconds on 2 AVX2 cores; 8 KiB of KV per token (bf16).
    "bench": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4, head_dim=128,
                  vocab_size=8192, max_position_embeddings=8192),
}
FORMAT = 1   # bump when the weight recipe changes


def config_for(p: dict) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "initializer_range": 0.02,
        **p,
    }


def write_model(out_dir: str, preset: str = "tiny", seed: int = 1234) -> str:
    import torch
    from safetensors.torch import save_file

    p = PRESETS[preset]
    cfg = config_for(p)
    stamp = json.dumps({"cfg": cfg, "seed": seed, "format": FORMAT}, sort_keys=True)
    os.makedirs(out_dir, exist_ok=True)
    stamp_path = os.path.join(out_dir, ".cwm-model-stamp")
    weights = os.path.join(out_dir, "model.safetensors")
    if (os.path.exists(stamp_path) and os.path.exists(weights)
            and open(stamp_path).read() == stamp):
        return out_dir

    g = torch.Generator().manual_seed(seed)
    H, I, L = p["hidden_size"], p["intermediate_size"], p["num_hidden_layers"]
    NH, NKV, D, V = (p["num_attention_heads"], p["num_key_value_heads"], p["head_dim"],
                     p["vocab_size"])

    def lin(out_f: int, in_f: int, gain: float = 1.0) -> "torch.Tensor":
        w = torch.randn(out_f, in_f, generator=g) * (gain / in_f ** 0.5)
        return w.to(torch.bfloat16).contiguous()

    t = {"model.embed_tokens.weight":
         torch.randn(V, H, generator=g).to(torch.bfloat16).contiguous()}
    for i in range(L):
        pre = f"model.layers.{i}."
        # q and k a bit larger than 1/sqrt(fan_in): attention scores of a few units, so each
        # position attends to a mix of tokens rather than a near-uniform average.
        t[pre + "self_attn.q_proj.weight"] = lin(NH * D, H, 2.0)
        t[pre + "self_attn.k_proj.weight"] = lin(NKV * D, H, 2.0)
        t[pre + "self_attn.v_proj.weight"] = lin(NKV * D, H)
        t[pre + "self_attn.o_proj.weight"] = lin(H, NH * D)
        t[pre + "mlp.gate_proj.weight"] = lin(I, H)
        t[pre + "mlp.up_proj.weight"] = lin(I, H)
        t[pre + "mlp.down_proj.weight"] = lin(H, I)
        t[pre + "input_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
        t[pre + "post_attention_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
    t["model.norm.weight"] = torch.ones(H, dtype=torch.bfloat16)
    # Logits of a few units: a peaked but not degenerate next-token distribution.
    t["lm_head.weight"] = lin(V, H, 4.0)

    tmp = weights + ".tmp"
    save_file(t, tmp, metadata={"format": "pt"})
    os.replace(tmp, weights)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2}, f)
    with open(stamp_path, "w") as f:
        f.write(stamp)
    return out_dir


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args()
    print(write_model(a.out_dir, a.preset, a.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
