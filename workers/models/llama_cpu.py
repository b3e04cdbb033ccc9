"""The Llama decoder stack for fp32 on CPUs in one lean loop: the same compiled kernels the
layer modules call, called directly, into buffers shared by every layer of a step.

Why: at decode's few rows a step's arithmetic is the weight read (~18 ms for SmolLM2-135M
here), but the module path adds ~7 ms of Python around ~240 small calls: module dispatch,
argument checks, views, allocations (bench/decode_step.py's "norm", "rope" and "other"
phases). This loop makes ~9 kernel calls a layer and nothing else: each projection's views
are taken once a step, and every layer writes into the same few buffers. Measured with
``bench/decode_step.py --compare-modules`` (alternating steps): 1.26x the modules' speed at
batch 1, 1.24x at 8, 1.10x at 32 (bench/README.md).

Numerics: bit for bit the module path. It calls the very kernels ``RMSNorm``,
``RopeStep.apply``, ``CpuAttentionBackend`` and ``Unquantized.apply`` choose for fp32 on the
CPU, on the same inputs, in the same order (tests/unit/test_llama_cpu.py compares the two).

When: ``LlamaForCausalLM.forward`` takes this path when ``CpuDecoderStack.build`` accepted
the model (fp32 weights on the CPU, one tensor-parallel rank, unquantized, no biases, the
kernels built) and the step fits (fp32 activations, the ``cpu`` attention backend, caches
without quantization scales); anything else runs the layer modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtide.kernels import cpu_attention, cpu_linear, cpu_ops
from kvtide.workers.attention import AttentionMetadata, CpuAttentionBackend, TorchAttentionBackend
from kvtide.workers.layers import fused
from kvtide.workers.quantization import Unquantized


@dataclass(frozen=True)
class _Layer:
    input_norm: torch.Tensor
    qkv: torch.Tensor
    """[out, in] contiguous, as the kernel streams it; ``qkv.t()`` is what MKL multiplies."""
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


class CpuDecoderStack:
    """``layers[i](hidden, residual, ...)`` for every layer of one stage, in one loop."""

    def __init__(self, layers: list[_Layer], model) -> None:
        a = model.args
        attn = model.layers[0].self_attn
        self.layers = layers
        self.eps = a.rms_norm_eps
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.scale = attn.scale
        self.cos, self.sin = model.rotary.cos, model.rotary.sin
        self.intermediate = layers[0].down.shape[1] if layers else 0

    @classmethod
    def build(cls, model) -> CpuDecoderStack | None:
        """The stack for ``model``'s layers (weights loaded or not: it keeps views), or None
        where the model is not one this loop runs bit for bit like the modules."""
        if not model.layers or model.dtype != torch.float32 or model.rotary.cos.device.type != "cpu":
            return None
        if not (cpu_ops.usable(model.rotary.cos) and cpu_linear.available() and cpu_attention.available()):
            return None
        layers = []
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            if any(
                type(m.method) is not Unquantized or m.bias is not None or m.tp.size != 1
                or m.weight_t.dtype != torch.float32 or m.weight_t.device.type != "cpu"
                or not m.weight_t.t().is_contiguous()
                for m in linears
            ):  # fmt: skip
                return None
            qkv, o, gate_up, down = (m.weight_t.t() for m in linears)
            layers.append(
                _Layer(layer.input_layernorm.weight, qkv, o, layer.post_attention_layernorm.weight, gate_up, down)
            )
        return cls(layers, model)

    @staticmethod
    def fits(hidden: torch.Tensor, kv_caches, backend: TorchAttentionBackend) -> bool:
        """Whether this step can take the loop: fp32 CPU activations, the ``cpu`` backend, and
        caches without quantization scales (an fp32 cache's rows are head_dim wide), and no
        Triton kernel claiming the tensors (as the modules ask first)."""
        k_cache = kv_caches[0][0]
        return (
            hidden.dtype == torch.float32
            and hidden.device.type == "cpu"
            and not fused.triton_usable(hidden)
            and isinstance(backend, CpuAttentionBackend)
            and k_cache.dtype == torch.float32
        )

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        backend: TorchAttentionBackend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Same contract as the loop over ``LlamaDecoderLayer`` in ``LlamaForCausalLM.forward``:
        (hidden, residual) in, (hidden, residual) out; ``residual`` is updated in place."""
        ops, attention = cpu_ops._module(), cpu_attention._module()
        n, h = hidden.shape
        nh, nkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q_size, kv_size = nh * d, nkv * d
        small = n <= cpu_linear.MAX_ROWS

        kernel = cpu_linear._module().linear

        def linear(out: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            # Unquantized.apply's choice: the kernel up to MAX_ROWS (1,024 on AVX2), else
            # MKL on the [in, out] view.
            if out is None:
                return x @ weight.t()
            kernel(out, x, weight)
            return out

        def buffer(*shape: int) -> torch.Tensor | None:  # a projection's output, for the kernel
            return torch.empty(*shape) if small else None

        def split(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return (
                qkv[:, :q_size].view(n, nh, d),
                qkv[:, q_size : q_size + kv_size].view(n, nkv, d),
                qkv[:, q_size + kv_size :].view(n, nkv, d),
            )

        x = hidden.contiguous()
        normed = torch.empty(n, h)
        qkv = buffer(n, q_size + 2 * kv_size)
        if qkv is not None:
            q, k, v = split(qkv)  # views into the buffer every layer's projection writes
        all_decode = meta.num_decode_tokens == n
        if all_decode:  # the decode kernel reads a contiguous query and writes a contiguous output
            attn_out = torch.empty(n, nh, d)
            attn_flat = attn_out.view(n, q_size)
            # One row's q is already contiguous in the qkv buffer (a batch-1 step skips 30 copies);
            # more rows are a whole qkv row apart, so each layer copies q into q_in.
            q_in = q if qkv is not None and q.is_contiguous() else torch.empty(n, nh, d)
            tables = meta.decode_block_tables.to(torch.int64).contiguous()
            seq_lens = meta.decode_seq_lens.to(torch.int64).contiguous()
            slots = meta.slot_mapping.to(torch.int64).contiguous()
        o_out, gate_up, down_out = buffer(n, h), buffer(n, 2 * self.intermediate), buffer(n, h)
        act = torch.empty(n, self.intermediate)
        pos = positions.to(torch.int64).contiguous()

        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches, strict=True):
            if residual is None:  # the first stage's first layer: the residual is its input
                ops.fused_add_rms_norm(normed, x, x, layer.input_norm, self.eps, False)
                residual = x
            else:
                ops.fused_add_rms_norm(normed, x, residual, layer.input_norm, self.eps, True)
            qkv_out = linear(qkv, normed, layer.qkv)
            if qkv is None:  # MKL's fresh output (a prefill-sized step, where views are cheap)
                q, k, v = split(qkv_out)
            ops.rotary_embedding(q, k, pos, self.cos, self.sin)
            if all_decode:
                ops.write_kv(k, v, k_cache, v_cache, slots)
                if q_in is not q:
                    q_in.copy_(q)
                attention.paged_decode_attention(attn_out, q_in, k_cache, v_cache, tables, seq_lens, self.scale, True)
            else:
                attn_flat = backend.forward(q, k, v, k_cache, v_cache, meta, self.scale).reshape(n, q_size)
            o = linear(o_out, attn_flat, layer.o)
            ops.fused_add_rms_norm(normed, o, residual, layer.post_norm, self.eps, True)
            gu = linear(gate_up, normed, layer.gate_up)
            ops.silu_and_mul(act, gu)
            x = linear(down_out, act, layer.down)
        return x, residual
