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


def write_tiny_llama(path: Path, seed: int = 0, scaled: bool = False, **config_overrides) -> Path:
    """Random weights (std chosen so greedy output is not degenerate) in HF layout.

    ``scaled``: every projection's std is 1 / sqrt(fan_in) and the embeddings' 0.5, for deep and
    wide shapes. The fixed stds below suit a few layers of width 64; at SmolLM2's shape (30
    layers, width 576) they make attention a hard argmax and the model chaotic: bf16 and fp32
    transformers then agree on 1% of next tokens, so no dtype or kernel can be compared on it.
    Scaled, they agree on 96% (4 x 32 positions) and the top token is the input token 6% of
    the time (with tied embeddings a too-large embedding makes the model copy its input).
    """
    c = tiny_llama_config(**config_overrides)
    g = torch.Generator().manual_seed(seed)
    h, i, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    nh, nkv, v = c["num_attention_heads"], c["num_key_value_heads"], c["vocab_size"]

    def rnd(*shape, std=0.08):
        return torch.randn(*shape, generator=g) * (shape[-1] ** -0.5 if scaled and len(shape) == 2 else std)

    w = {"model.embed_tokens.weight": rnd(v, h, std=1.0) * (0.5 * h**0.5 if scaled else 1.0),
         "model.norm.weight": 1 + rnd(h, std=0.1)}  # fmt: skip
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
