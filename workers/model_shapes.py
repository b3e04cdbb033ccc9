"""Published configs of a few models, for sizing without their files (``kvtide size``).

Each entry is the Hugging Face ``config.json`` of the model, reduced to the keys sizing and
``LlamaArgs.from_hf_config`` read, with the numbers as published on the model's hub page.
``NUM_PARAMS`` holds each model's published parameter count; a unit test checks that the
shape's own count (workers/sizing.py) reproduces it, so a typo in a config shows up there.
"""

from __future__ import annotations

from typing import Any

KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    # HuggingFaceTB/SmolLM2-135M(-Instruct): the model kvtide serves on CPU.
    "smollm2-135m": {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-05,
        "tie_word_embeddings": True,
        "eos_token_id": 2,
    },
    # meta-llama/Meta-Llama-3-8B
    "llama-3-8b": {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-05,
        "tie_word_embeddings": False,
        "eos_token_id": 128001,
    },
    # meta-llama/Meta-Llama-3-70B
    "llama-3-70b": {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-05,
        "tie_word_embeddings": False,
        "eos_token_id": 128001,
    },
    # Qwen/Qwen2-7B (q/k/v carry biases; LlamaArgs infers that from the architecture)
    "qwen2-7b": {
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "max_position_embeddings": 131072,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-06,
        "tie_word_embeddings": False,
        "eos_token_id": 151643,
    },
}

NUM_PARAMS: dict[str, int] = {
    "smollm2-135m": 134_515_008,
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "qwen2-7b": 7_615_616_512,
}
"""Published parameter counts (safetensors metadata on each model's hub page)."""
