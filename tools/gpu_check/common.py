"""What the sections share: the run's context, the random SmolLM2-shaped model, and engines
built and driven through kvtide's public API only (``Engine.load``, ``LLM.generate``)."""

from __future__ import annotations

import gc
import importlib
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plan import Plan
from report import NotAvailable

SHAPES = {
    "smollm2": {
        "num_layers": 30, "num_heads": 9, "num_kv_heads": 3, "head_dim": 64, "intermediate_size": 1536,
        "vocab_size": 49152, "max_position": 8192, "tie_word_embeddings": True, "rope_theta": 100000.0,
    },
    "tiny": {
        "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "intermediate_size": 96,
        "vocab_size": 512, "max_position": 512, "tie_word_embeddings": True,
    },
}  # fmt: skip
"""Model shapes in tests/tiny.py's terms: SmolLM2-135M's (hidden 576 = 9 heads x 64), the
check's model; and a tiny one, to run the check itself on a CPU (``--device cpu --shape tiny``)."""
INIT = "scaled"
"""tests/tiny.py's ``scaled`` weights: its fixed stds make SmolLM2's shape chaotic (bf16 and fp32
transformers agree on 1% of next tokens), which no comparison of dtypes or kernels survives.
Written into config.json, so a work folder's checkpoint from the old init is rewritten."""

SEED = 1234


@dataclass
class Context:
    repo: Path
    work: Path
    plan: Plan
    dry_run: bool
    device: str = "cuda"
    shape: str = "smollm2"
    cap_s: float = float("inf")
    started: float = field(default_factory=time.monotonic)
    shared: dict[str, Any] = field(default_factory=dict)
    """Results one section leaves for another (teacher-forced tokens of each engine)."""

    @property
    def model_dir(self) -> Path:
        return self.work / f"{self.shape}-random"

    def time_left(self) -> float:
        return self.cap_s - (time.monotonic() - self.started)

    def prompts(self, vocab_size: int) -> list[list[int]]:
        """The greedy comparisons' prompts: random ids, fixed by ``SEED``."""
        rng = random.Random(SEED)
        return [[rng.randrange(3, vocab_size) for _ in range(self.plan.prompt_len)] for _ in range(self.plan.num_prompts)]

    def teacher_seqs(self, vocab_size: int) -> list[list[int]]:
        """Sequences of prompt_len + teacher_positions random ids; top-1 is compared after
        each prefix of length prompt_len .. len - 1."""
        rng = random.Random(SEED + 1)
        n = self.plan.prompt_len + self.plan.teacher_positions
        return [[rng.randrange(3, vocab_size) for _ in range(n)] for _ in range(self.plan.teacher_seqs)]


def hf_config(shape: str = "smollm2") -> dict[str, Any]:
    from tests.tiny import tiny_llama_config

    return tiny_llama_config(**SHAPES[shape], kvtide_init=INIT)


def write_model(path: Path, shape: str = "smollm2") -> tuple[Path, bool]:
    """The random checkpoint (for SmolLM2's shape: fp32 safetensors, ~540 MB) in ``path``; written
    once per work folder. Returns (path, whether it was written now)."""
    import json

    from tests.tiny import write_tiny_llama

    config = path / "config.json"
    if config.is_file() and (path / "model.safetensors").is_file() and json.loads(config.read_text()) == hf_config(shape):
        return path, False
    write_tiny_llama(path, seed=SEED, scaled=True, **SHAPES[shape], kvtide_init=INIT)
    return path, True


def need(dotted: str) -> Any:
    """``module.attr`` from kvtide, or ``NotAvailable`` naming what is missing."""
    module, _, attr = dotted.rpartition(".")
    try:
        found = importlib.import_module(module)
    except ImportError as exc:
        raise NotAvailable(f"{module} ({exc})") from exc
    if not hasattr(found, attr):
        raise NotAvailable(dotted)
    return getattr(found, attr)


def engine(ctx: Context, **options: Any):
    """``Engine.load`` of the random model on the context's device; ``options`` are flat
    ``EngineConfig`` options (dtype, attention_backend, kv_cache_dtype, ...)."""
    p = ctx.plan
    defaults = {
        "device": ctx.device, "block_size": p.block_size, "num_blocks": p.num_blocks,
        "max_num_seqs": p.max_num_seqs, "max_num_batched_tokens": p.max_num_batched_tokens,
    }  # fmt: skip
    return need("kvtide.workers.engine.Engine").load(str(ctx.model_dir), **{**defaults, **options})


def generate(eng, prompts: Sequence[Sequence[int]], params) -> list:
    """``LLM.generate`` over ``eng``: raises when a step fails."""
    return need("kvtide.workers.llm.LLM")(engine=eng).generate([list(p) for p in prompts], params)


def greedy(eng, prompts: Sequence[Sequence[int]], num_tokens: int) -> list[tuple[int, ...]]:
    params = need("kvtide.workers.sampling_params.SamplingParams")(temperature=0.0, max_tokens=num_tokens, ignore_eos=True)
    return [out.outputs[0].token_ids for out in generate(eng, prompts, params)]


CLOSE_K = 5
"""Two runs' next tokens are close when each one's top token is in the other's top ``CLOSE_K``
(vLLM's ``check_logprobs_close``): rounding may swap near-tied candidates, a bug moves the
token far down the other's list."""


def teacher_forced(eng, seqs: Sequence[Sequence[int]], start: int) -> list[tuple[int, float | None, frozenset]]:
    """The engine's greedy next token, its logprob and its top ``CLOSE_K`` ids after every prefix
    ``seq[:n]``, ``start <= n < len(seq)``, in (sequence, n) order: one 1-token request per prefix."""
    params = need("kvtide.workers.sampling_params.SamplingParams")(
        temperature=0.0, max_tokens=1, ignore_eos=True, logprobs=CLOSE_K
    )
    prompts = [seq[:n] for seq in seqs for n in range(start, len(seq))]
    found = []
    for out in generate(eng, prompts, params):
        c = out.outputs[0]
        lp = c.logprobs[0] if c.logprobs else None
        found.append((c.token_ids[0], lp.logprob if lp else None, frozenset(t for t, _ in lp.top_logprobs) if lp else frozenset()))
    return found


def top1_agreement(a: Sequence[tuple], b: Sequence[tuple]) -> float:
    if len(a) != len(b) or not a:
        raise ValueError(f"compared {len(a)} against {len(b)} positions")
    return sum(x[0] == y[0] for x, y in zip(a, b, strict=True)) / len(a)


def close_agreement(a: Sequence[tuple], b: Sequence[tuple]) -> float:
    """The share of positions where each side's top token is in the other's top ``CLOSE_K``."""
    if len(a) != len(b) or not a:
        raise ValueError(f"compared {len(a)} against {len(b)} positions")
    return sum(x[0] in y[2] and y[0] in x[2] for x, y in zip(a, b, strict=True)) / len(a)


def common_prefix(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> tuple[int, float]:
    """(identical sequences, mean fraction of each sequence before the first difference)."""
    identical, shares = 0, []
    for x, y in zip(a, b, strict=True):
        n = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
        identical += list(x) == list(y)
        shares.append(n / max(len(x), len(y), 1))
    return identical, sum(shares) / max(len(shares), 1)


def release() -> None:
    """Give back what dropped engines and models held on the GPU."""
    gc.collect()
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def need_cuda(ctx: Context, what: str) -> None:
    if ctx.device != "cuda":
        raise NotAvailable(f"{what} (needs CUDA; this run is on {ctx.device})")


def short(exc: BaseException, n: int = 300) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= n else text[: n - 3] + "..."
