"""The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2) in plain torch.

Reads like single-device code: tensor parallelism lives inside the layer classes, and a
pipeline stage is the slice ``layers[start:end]`` chosen by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvtide.kernels import cpu_ops
from kvtide.kernels.norm_rope_ref import silu_and_mul_ref
from kvtide.workers import huge_pages
from kvtide.workers.attention import AttentionMetadata, TorchAttentionBackend
from kvtide.workers.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from kvtide.workers.layers.linear import ColumnParallelLinear, RowParallelLinear
from kvtide.workers.layers.norm import RMSNorm
from kvtide.workers.layers.rotary import RopeStep, RotaryEmbedding
from kvtide.workers.models.llama_cpu import CpuDecoderStack
from kvtide.workers.parallel import SINGLE, TensorParallel
from torch import nn


@dataclass(frozen=True)
class LlamaArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position: int
    tie_word_embeddings: bool
    attention_bias: bool

    @classmethod
    def from_hf_config(cls, c: dict[str, Any]) -> LlamaArgs:
        arch = (c.get("architectures") or ["LlamaForCausalLM"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        num_heads = c["num_attention_heads"]
        return cls(
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=c.get("num_key_value_heads") or num_heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // num_heads,
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=c.get("rope_theta", 10000.0),
            rope_scaling=c.get("rope_scaling"),
            max_position=c.get("max_position_embeddings", 2048),
            tie_word_embeddings=c.get("tie_word_embeddings", False),
            # Qwen2 has q/k/v biases without saying so in its config.
            attention_bias=c.get("attention_bias", arch == "Qwen2ForCausalLM"),
        )


SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class LlamaAttention(nn.Module):
    def __init__(self, a: LlamaArgs, tp: TensorParallel, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_heads = tp.shard(a.num_heads, "num_attention_heads")
        self.num_kv_heads = tp.shard(a.num_kv_heads, "num_key_value_heads")
        self.head_dim = a.head_dim
        self.scale = a.head_dim**-0.5
        self.qkv_proj = ColumnParallelLinear(
            a.hidden_size,
            [a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.num_kv_heads * a.head_dim],
            bias=a.attention_bias,
            tp=tp,
            dtype=dtype,
        )
        self.o_proj = RowParallelLinear(a.num_heads * a.head_dim, a.hidden_size, tp=tp, dtype=dtype)

    def forward(
        self,
        x: torch.Tensor,
        rope: RopeStep,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        backend: TorchAttentionBackend,
    ) -> torch.Tensor:
        n = x.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        q, k = rope.apply(q, k)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        out = backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.o_proj(out.reshape(n, q_size))


class LlamaMLP(nn.Module):
    def __init__(self, a: LlamaArgs, tp: TensorParallel, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(
            a.hidden_size, [a.intermediate_size, a.intermediate_size], tp=tp, dtype=dtype
        )
        self.down_proj = RowParallelLinear(a.intermediate_size, a.hidden_size, tp=tp, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if cpu_ops.usable(gate_up):  # one pass, bit for bit the twin
            return self.down_proj(cpu_ops.silu_and_mul(gate_up))
        return self.down_proj(silu_and_mul_ref(gate_up))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, a: LlamaArgs, tp: TensorParallel, dtype: torch.dtype) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(a, tp, dtype)
        self.mlp = LlamaMLP(a, tp, dtype)
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps, dtype)

    def forward(self, x, residual, rope, kv_cache, meta, backend):
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, rope, kv_cache, meta, backend)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    """Layers ``[layer_start, layer_end)`` of the model: the whole model by default, or one
    pipeline stage (embedding on the first stage, final norm and LM head on the last)."""

    def __init__(
        self,
        a: LlamaArgs,
        tp: TensorParallel = SINGLE,
        dtype: torch.dtype = torch.float32,
        layer_start: int = 0,
        layer_end: int | None = None,
    ) -> None:
        super().__init__()
        self.args = a
        self.dtype = dtype
        """Activations' dtype; with quantized weights it is not the weights' dtype."""
        self.layer_start = layer_start
        self.layer_end = a.num_layers if layer_end is None else layer_end
        self.is_first = layer_start == 0
        self.is_last = self.layer_end == a.num_layers
        self.rotary = RotaryEmbedding(a.head_dim, a.max_position, a.rope_theta, a.rope_scaling, dtype)
        self.embed_tokens = (
            VocabParallelEmbedding(a.vocab_size, a.hidden_size, tp, dtype) if self.is_first else None
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(a, tp, dtype) for _ in range(self.layer_start, self.layer_end)
        )
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps, dtype) if self.is_last else None
        if self.is_last:
            self.lm_head = ParallelLMHead(a.vocab_size, a.hidden_size, tp, dtype)
            if a.tie_word_embeddings and self.embed_tokens is not None:
                self.lm_head.weight = self.embed_tokens.weight

    @property
    def ties_head(self) -> bool:
        """The LM head shares the embedding's weight (a tied model whose one stage holds both)."""
        return self.is_last and self.embed_tokens is not None and self.lm_head.weight is self.embed_tokens.weight

    def materialize(self, device: torch.device | str) -> None:
        """Give a model built on the meta device uninitialized storage on ``device``, in the
        dtypes it was built with, and compute its rotary tables there. Every parameter is then
        filled from the checkpoint (the loader checks it).

        NOTE: ``to_empty`` replaces each module's parameters on its own, which would give a tied
        head a second embedding-sized tensor; the head is detached first and re-tied after. On
        a CPU the storage then moves into one mapping on huge pages (``huge_pages``)."""
        tied = self.ties_head
        if tied:
            self.lm_head.weight = None
        self.to_empty(device=device)
        if tied:
            self.lm_head.weight = self.embed_tokens.weight
        if torch.device(device).type == "cpu":
            self._weights_mapping = huge_pages.place_parameters(self)
        self.rotary.compute_tables()

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        backend: TorchAttentionBackend,
        hidden: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """input_ids, positions: [num_tokens]. Returns (hidden, residual); on the last stage
        ``hidden`` is final-normed and ``residual`` is None."""
        if self.embed_tokens is not None:
            hidden = self.embed_tokens(input_ids)
        stack = self._cpu_stack()
        if stack is not None and stack.fits(hidden, kv_caches, backend):
            hidden, residual = stack.forward(hidden, residual, positions, kv_caches, meta, backend)
        else:
            rope = self.rotary.for_step(positions, hidden.dtype)
            for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
                hidden, residual = layer(hidden, residual, rope, kv_cache, meta, backend)
        if self.norm is None:
            return hidden, residual
        hidden, _ = self.norm(hidden, residual)
        return hidden, None

    use_cpu_stack = True
    """Run the layers through ``llama_cpu.CpuDecoderStack`` where it applies (False: always the
    modules; the tests and benches compare the two)."""

    def _cpu_stack(self) -> CpuDecoderStack | None:
        """The lean CPU loop over this model's layers, built on first use and again whenever the
        weights were given new storage (``materialize``, a move), or None where it does not apply."""
        if not self.use_cpu_stack or not self.layers:
            return None
        key = self.layers[0].self_attn.qkv_proj.weight_t.data_ptr()
        if getattr(self, "_stack_key", None) != key:
            self._stack, self._stack_key = CpuDecoderStack.build(self), key
        return self._stack

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [num_seqs, hidden] -> [num_seqs, vocab_size] float32."""
        return self.lm_head.compute_logits(hidden)

    # -- weights ---------------------------------------------------------------------------

    _STACKED = {  # checkpoint name piece -> (module name piece, shard index)
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def checkpoint_target(self, name: str) -> tuple[nn.Module, int, bool] | None:
        """Map a Hugging Face checkpoint tensor name to (module, shard, is_bias), or None when
        this stage does not hold it."""
        parts = name.split(".")
        if parts[0] == "model":
            parts = parts[1:]
        is_bias = parts[-1] == "bias"
        if parts[0] == "embed_tokens":
            mods = [m for m in (self.embed_tokens,) if m is not None]
            if self.is_last and self.args.tie_word_embeddings and self.embed_tokens is None:
                mods = [self.lm_head]
            return (mods[0], 0, False) if mods else None
        if parts[0] == "lm_head":
            return (self.lm_head, 0, False) if self.is_last else None
        if parts[0] == "norm":
            return (self.norm, 0, False) if self.norm is not None else None
        if parts[0] != "layers":
            return None
        index = int(parts[1]) - self.layer_start
        if not 0 <= index < len(self.layers):
            return None
        module: nn.Module = self.layers[index]
        shard = 0
        for piece in parts[2:-1]:
            piece, shard = self._STACKED.get(piece, (piece, shard))
            module = getattr(module, piece)
        return module, shard, is_bias
