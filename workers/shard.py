"""One shard of a replica: one tensor-parallel rank of one pipeline stage.

A shard holds its slice of the weights and of the KV cache and runs its layers on the
step's flat batch. Pipeline stages hand hidden states and residuals to the next stage with
point-to-point send/recv (same tensor-parallel rank); the last stage computes logits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kvtide.kernels import cpu_build
from kvtide.kernels.kv_quant import allocate_kv_cache
from kvtide.workers.attention import get_attention_backend
from kvtide.workers.models.llama import LlamaArgs, LlamaForCausalLM
from kvtide.workers.step_inputs import StepInputs


def stage_layers(args: LlamaArgs, pp_size: int) -> list[tuple[int, int]]:
    """Contiguous layer slices, one per stage, balanced by weight bytes read per decode step.

    Decode is bound by reading weights, so each stage's cost is its layers' parameters, plus
    the LM head's on the last stage (for SmolLM2 the head alone weighs as much as ~8 layers).
    Layers are assigned greedily so each stage's cost is as close as possible to the mean.
    """
    if not 1 <= pp_size <= args.num_layers:
        raise ValueError(
            f"pipeline-parallel size must be in [1, {args.num_layers}] (the model's layer count), "
            f"got {pp_size}"
        )
    h, i = args.hidden_size, args.intermediate_size
    layer = h * (args.num_heads + 2 * args.num_kv_heads) * args.head_dim + args.num_heads * args.head_dim * h + 3 * h * i
    head = args.vocab_size * h / layer  # in layers
    total = args.num_layers + head
    bounds, start = [], 0
    for stage in range(pp_size):
        remaining_stages = pp_size - stage
        if remaining_stages == 1:
            end = args.num_layers
        else:
            target = total * (stage + 1) / pp_size
            end = max(start + 1, min(round(target), args.num_layers - (remaining_stages - 1)))
        bounds.append((start, end))
        start = end
    return bounds


@dataclass(frozen=True)
class PipelineLinks:
    """Global ranks of this shard's peers in the previous and next stage (same TP rank)."""

    prev_rank: int | None = None
    next_rank: int | None = None


class ShardRunner:
    """Runs one shard's layers for a step. KV cache per layer (kernels/attention_ref.py layout):
    [num_blocks, num_kv_heads_per_rank, block_size, head_dim]."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        num_blocks: int,
        block_size: int,
        links: PipelineLinks = PipelineLinks(),
        kv_dtype: torch.dtype | None = None,
        attention_backend: str = "torch",
    ) -> None:
        self.model = model
        self.links = links
        # NOTE: the activations' dtype, not a parameter's: quantized weights are int8/fp8.
        self.device, self.dtype = next(model.parameters()).device, model.dtype
        if self.device.type == "cpu" and self.dtype == torch.float32:
            # NOTE: before the shard reports ready: a step never waits on a compiler.
            cpu_build.prepare()
        self.backend = get_attention_backend(attention_backend)
        attn = model.layers[0].self_attn
        shape = (num_blocks, attn.num_kv_heads, block_size, attn.head_dim)
        # An int8/fp8 cache holds each row's scale inside its block (kernels/kv_quant.py).
        kv_dtype = kv_dtype or self.dtype
        self.kv_caches = [
            (allocate_kv_cache(*shape, kv_dtype, self.device), allocate_kv_cache(*shape, kv_dtype, self.device))
            for _ in model.layers
        ]

    pipeline_wait_s = 0.0
    """Seconds spent in send/recv to neighbouring stages (waiting for a peer included): a
    stage's busy time is its step time minus this."""

    @torch.inference_mode()
    def forward(self, inputs: StepInputs) -> torch.Tensor | None:
        """Returns logits [num_sampled_seqs, vocab] on the last stage, None elsewhere."""
        for src, dst in inputs.block_copies:
            for k_cache, v_cache in self.kv_caches:
                k_cache[dst].copy_(k_cache[src])
                v_cache[dst].copy_(v_cache[src])
        hidden = residual = None
        if self.links.prev_rank is not None:
            shape = (inputs.input_ids.shape[0], self.model.args.hidden_size)
            hidden = torch.empty(shape, dtype=self.dtype, device=self.device)
            residual = torch.empty_like(hidden)
            t0 = time.perf_counter()
            dist.recv(hidden, self.links.prev_rank)
            dist.recv(residual, self.links.prev_rank)
            self.pipeline_wait_s += time.perf_counter() - t0
        hidden, residual = self.model(
            inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta, self.backend, hidden, residual
        )
        if self.links.next_rank is not None:
            t0 = time.perf_counter()
            dist.send(hidden.contiguous(), self.links.next_rank)
            dist.send(residual.contiguous(), self.links.next_rank)
            self.pipeline_wait_s += time.perf_counter() - t0
            return None
        return self.model.compute_logits(hidden[inputs.logits_indices])
