"""One shard of a replica: one tensor-parallel rank of one pipeline stage.

A shard holds its slice of the weights and of the KV cache, mirrors the step's block tables
from the step deltas (``BatchState``) and runs its layers on the step's flat batch. Pipeline
stages hand hidden states and residuals to the next stage with point-to-point send/recv (same
tensor-parallel rank); the last stage computes logits, and its TP rank 0 samples them on its
own device (``SamplingState`` + ``Sampler``): only token ids leave the shard.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kvtide.kernels import cpu_build
from kvtide.kernels.kv_quant import allocate_kv_cache
from kvtide.workers import host_memory
from kvtide.workers.attention import get_attention_backend
from kvtide.workers.models.llama import LlamaArgs, LlamaForCausalLM
from kvtide.workers.sampler import Sampler
from kvtide.workers.sampling_state import SamplingState
from kvtide.workers.step_inputs import BatchState, StepDelta, StepInputs, StepOutput, pack_batch


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
class ShardMemory:
    """One shard's device memory, measured before its KV cache is allocated (zeros on a CPU)."""

    total_bytes: int
    weight_bytes: int
    reserve_bytes: int
    """Peak of one full step beyond the weights, plus memory torch does not manage."""


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
        num_blocks: int | None,
        block_size: int,
        links: PipelineLinks = PipelineLinks(),
        kv_dtype: torch.dtype | None = None,
        attention_backend: str = "torch",
        samples: bool = True,
        eos_token_ids: frozenset[int] = frozenset(),
    ) -> None:
        """``num_blocks`` None defers the KV cache to ``allocate_kv_cache`` (after
        ``measure_reserve_bytes`` on a GPU); ``samples``: this shard samples (the last stage's
        TP rank 0); ``eos_token_ids`` end generation (banned while a request's ``min_tokens`` is
        not reached)."""
        self.model = model
        self.links = links
        # NOTE: the activations' dtype, not a parameter's: quantized weights are int8/fp8.
        self.device, self.dtype = next(model.parameters()).device, model.dtype
        if self.device.type == "cpu":
            host_memory.keep_step_buffers()  # a step's activations reuse the last step's pages
        if self.device.type == "cpu" and self.dtype == torch.float32:
            # NOTE: before the shard reports ready: a step never waits on a compiler.
            cpu_build.prepare()
        self.backend = get_attention_backend(attention_backend)
        self.block_size = block_size
        # An int8/fp8 cache holds each row's scale inside its block (kernels/kv_quant.py).
        self.kv_dtype = kv_dtype or self.dtype
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        if num_blocks is not None:
            self.allocate_kv_cache(num_blocks)
        self.batch = BatchState(block_size, self.device)
        self.samples = samples and links.next_rank is None
        self.sampling = SamplingState(self.device, eos_token_ids) if self.samples else None
        self.sampler = Sampler()

    def allocate_kv_cache(self, num_blocks: int) -> int:
        """Allocate this shard's KV cache (its KV heads of its layers); returns its bytes."""
        attn = self.model.layers[0].self_attn
        shape = (num_blocks, attn.num_kv_heads, self.block_size, attn.head_dim)
        self.kv_caches = [
            (allocate_kv_cache(*shape, self.kv_dtype, self.device), allocate_kv_cache(*shape, self.kv_dtype, self.device))
            for _ in self.model.layers
        ]
        return sum(t.numel() * t.element_size() for pair in self.kv_caches for t in pair)

    @torch.inference_mode()
    def measure_memory(self, num_tokens: int, num_seqs: int) -> ShardMemory:
        """What this shard's device holds beside its KV cache: weights, and the peak of one step
        at ``num_tokens`` tokens (``max_num_batched_tokens``) plus memory torch does not manage
        (the CUDA context, NCCL), measured by a dummy step of this shard's layers alone (no
        pipeline send/recv). Call before ``allocate_kv_cache``. On the CPU there is nothing to
        measure: the cache has a byte budget."""
        if self.device.type != "cuda":
            return ShardMemory(0, 0, 0)
        dev = self.device
        torch.cuda.synchronize(dev)
        weights = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        blocks = -(-num_tokens // self.block_size) + -(-num_tokens // self.model.args.max_position)
        scratch = self.allocate_kv_cache(blocks)  # where the dummy step writes its K and V
        self._dummy_step(num_tokens, num_seqs)
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - weights - scratch
        self.kv_caches = []
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        not_torch = max(0, (total - free) - torch.cuda.memory_reserved(dev))
        return ShardMemory(total, weights, peak + not_torch)

    @torch.inference_mode()
    def warm_up(self, num_tokens: int, num_seqs: int) -> None:
        """One dummy step of ``num_tokens`` prompt tokens (``max_num_batched_tokens``) through this
        shard's layers, and the logits of ``num_seqs`` rows on the last stage, so that the first
        requests do not pay for what a process does once: faulting in a full step's activations
        (which later steps reuse, ``host_memory``), the kernels' first calls, the threads'
        start. On the Zen 4 host the first 1,024-token step of the peers' mixed workload took
        100-170 ms longer than the same step later (bench/README.md, "A warm-up step at start");
        vLLM runs a dummy step of its token budget at start for the same reason. Every TP rank
        runs the same step (call it on all of them). The K and V go to the cache's first blocks,
        which no request owns yet; a request writes every slot it reads."""
        if not self.kv_caches:
            raise RuntimeError("warm_up needs the KV cache: call allocate_kv_cache first")
        self._dummy_step(num_tokens, num_seqs)

    def _dummy_step(self, num_tokens: int, num_seqs: int) -> None:
        """``num_tokens`` prompt tokens (at most what the cache holds), as prompts of at most the
        model's positions, through this shard's layers into the cache's first blocks, then the
        logits of ``num_seqs`` rows on the last stage. No send/recv: a later stage runs on zeros."""
        dev, bs = self.device, self.block_size
        num_tokens = max(1, min(num_tokens, self.kv_caches[0][0].shape[0] * bs))
        longest = self.model.args.max_position // bs * bs or self.model.args.max_position
        # Block-aligned prompts (only the last may end inside a block), so they fit in the
        # ceil(num_tokens / bs) blocks the cap above leaves.
        prompts, first_block = [], 0
        for start in range(0, num_tokens, longest):
            n = min(longest, num_tokens - start)
            blocks = -(-n // bs)
            prompts.append(([0] * n, 0, list(range(first_block, first_block + blocks)), True))
            first_block += blocks
        inputs = pack_batch(prompts, (), bs, dev)
        tokens = inputs.input_ids.shape[0]
        hidden = residual = None
        if self.links.prev_rank is not None:
            hidden = torch.zeros(tokens, self.model.args.hidden_size, dtype=self.dtype, device=dev)
            residual = torch.zeros_like(hidden)
        hidden, _ = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta, self.backend,
                               hidden, residual)  # fmt: skip
        if self.links.next_rank is None:  # the logits of a full batch of sequences
            self.model.compute_logits(hidden[-1:].expand(num_seqs, -1).contiguous())

    pipeline_wait_s = 0.0
    """Seconds spent in send/recv to neighbouring stages (waiting for a peer included): a
    stage's busy time is its step time minus this."""

    @torch.inference_mode()
    def execute(self, delta: StepDelta) -> StepOutput | torch.Tensor | None:
        """Run one step: the sampling shard answers a ``StepOutput`` (one host transfer), or the
        logits [num_sampled_seqs, vocab] on the CPU when ``delta.return_logits``; every other
        shard None."""
        inputs = self.batch.apply(delta)
        rows = self.sampling.apply(delta) if self.sampling is not None else None
        logits = self.forward(inputs)
        if not self.samples:
            return None
        if delta.return_logits:
            return logits.float().cpu()
        repeats = [1 + len(c.forks) for c in delta.chunks if c.sample]
        if any(r > 1 for r in repeats):  # a forking request's children sample from its row
            rows_of = [i for i, r in enumerate(repeats) for _ in range(r)]
            logits = logits[torch.tensor(rows_of, dtype=torch.long, device=logits.device)]
        return StepOutput(tuple(self.sampler.sample(logits, rows).to_host()))

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
