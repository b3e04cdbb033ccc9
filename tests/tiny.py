"""Tiny random Llama checkpoints written in Hugging Face format, for fast engine tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def tiny_llama_config(
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    num_layers: int = 2,
    vocab_size: int = 96,
    intermediate_size: int = 96,
    max_position: int = 512,
    **extra,
) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": num_heads * head_dim,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": max_position,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        **extra,
    }


def write_tiny_llama(path: Path, seed: int = 0, **config_overrides) -> Path:
    """Random weights (std chosen so greedy output is not degenerate) in HF layout."""
    c = tiny_llama_config(**config_overrides)
    g = torch.Generator().manual_seed(seed)
    h, i, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    nh, nkv, v = c["num_attention_heads"], c["num_key_value_heads"], c["vocab_size"]

    def rnd(*shape, std=0.08):
        return torch.randn(*shape, generator=g) * std

    w = {"model.embed_tokens.weight": rnd(v, h, std=1.0), "model.norm.weight": 1 + rnd(h, std=0.1)}
    if not c["tie_word_embeddings"]:
        w["lm_head.weight"] = rnd(v, h, std=0.3)
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        w[p + "self_attn.q_proj.weight"] = rnd(nh * d, h, std=0.3)
        w[p + "self_attn.k_proj.weight"] = rnd(nkv * d, h, std=0.3)
        w[p + "self_attn.v_proj.weight"] = rnd(nkv * d, h)
        w[p + "self_attn.o_proj.weight"] = rnd(h, nh * d)
        w[p + "mlp.gate_proj.weight"] = rnd(i, h)
        w[p + "mlp.up_proj.weight"] = rnd(i, h)
        w[p + "mlp.down_proj.weight"] = rnd(h, i)
        w[p + "input_layernorm.weight"] = 1 + rnd(h, std=0.1)
        w[p + "post_attention_layernorm.weight"] = 1 + rnd(h, std=0.1)
        if c.get("attention_bias"):
            w[p + "self_attn.q_proj.bias"] = rnd(nh * d)
            w[p + "self_attn.k_proj.bias"] = rnd(nkv * d)
            w[p + "self_attn.v_proj.bias"] = rnd(nkv * d)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(c))
    save_file({k: t.contiguous() for k, t in w.items()}, str(path / "model.safetensors"))
    return path
