"""Build a model from a Hugging Face-format directory, each shard reading only its slice.

With ``quantization`` other than "none", every linear layer switches to quantized storage
before any weight is read, and each checkpoint slice is quantized as it is copied in
(workers/quantization.py): peak memory is the quantized model plus one slice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kvtide.workers.models.llama import LlamaArgs, LlamaForCausalLM
from kvtide.workers.parallel import SINGLE, TensorParallel
from kvtide.workers.quantization import get_linear_method
from safetensors import safe_open


def read_hf_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"model directory {str(model_dir)!r} has no config.json")
    return json.loads(path.read_text())


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    tp: TensorParallel = SINGLE,
    layer_start: int = 0,
    layer_end: int | None = None,
    quantization: str = "none",
) -> LlamaForCausalLM:
    """Layers ``[layer_start, layer_end)`` of the model in ``model_dir``, this TP rank's slice,
    on ``device`` in ``dtype``.

    NOTE: the model is built on the meta device (shapes and dtypes, no storage), then given
    uninitialized storage directly on ``device`` in its final dtypes and filled slice by slice
    from the checkpoint: the full model never exists on one device, and no fp32 copy of a
    bf16/fp16 shard is ever made. Raises ``ValueError`` when a parameter got no weights."""
    args = LlamaArgs.from_hf_config(read_hf_config(model_dir))
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"model directory {str(model_dir)!r} has no *.safetensors files")
    with torch.device("meta"):
        model = LlamaForCausalLM(args, tp, dtype, layer_start, layer_end)
        if quantization != "none":
            method = get_linear_method(quantization, device)
            for module in model.modules():
                if hasattr(module, "set_method"):
                    module.set_method(method)
    model.materialize(device)
    loaded: dict[int, set[int]] = {}  # parameter id -> checkpoint shards copied into it
    expected: dict[int, int] = {}
    with torch.no_grad():
        for file in files:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    target = model.checkpoint_target(name)
                    if target is None:
                        continue
                    module, shard, is_bias = target
                    weight = f.get_slice(name)
                    if hasattr(module, "load"):
                        module.load(shard, weight, is_bias)
                    else:
                        module.weight.copy_(weight[:])
                    param = _param(module, is_bias)
                    loaded.setdefault(id(param), set()).add(shard)
                    expected[id(param)] = len(getattr(module, "full_sizes", (0,)))
    missing = [
        n for n, p in model.named_parameters()
        if id(p) not in loaded or len(loaded[id(p)]) != expected[id(p)]
    ]
    if missing:
        raise ValueError(f"checkpoint in {str(model_dir)!r} lacks weights for: {', '.join(missing[:8])}")
    return model.eval()


def _param(module: torch.nn.Module, is_bias: bool) -> torch.nn.Parameter:
    if is_bias:
        return module.bias
    return module.weight_t if hasattr(module, "weight_t") else module.weight
