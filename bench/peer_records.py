"""What bench/peers.py hands to each system's process and gets back: standard library only.

The peer processes run in other virtualenvs (vLLM's, llama.cpp's), where neither kvtide nor
torch of the main venv is importable, so this module imports nothing but the standard
library. Files are JSON:

- a job (``Job``): the system's engine settings and the workloads to run, each a list of
  token-id prompts with the exact number of tokens each must generate;
- a result (``Result``): per workload run, every request's token arrival times in seconds
  since the run's requests were submitted; the single-stream decode times.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Workload:
    name: str
    prompts: list[list[int]]
    """Token ids, so every system sees identical inputs (no tokenizer in between)."""
    osls: list[int]
    """Tokens each request generates: exactly this many (EOS ignored, greedy)."""

    @property
    def num_output_tokens(self) -> int:
        return sum(self.osls)


@dataclass(frozen=True)
class Job:
    model_dir: str
    """The Hugging Face directory both systems load (fp32)."""
    threads: int
    enable_prefix_caching: bool
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_cache_gib: int
    workloads: list[Workload]
    single_prompt: list[int] = field(default_factory=list)
    """Empty: no single-stream run."""
    single_new_tokens: int = 0
    single_reps: int = 0
    queue_order_s_per_token: float | None = None
    """kvtide's waiting-queue order (``SchedulerConfig``); None keeps the engine's default."""
    vllm_shortest_first: bool = False
    """vLLM's ``priority`` scheduling policy with each request's priority its prompt length:
    for requests that arrive together, the order kvtide's default queue gives them."""

    def dump(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> Job:
        raw = json.loads(Path(path).read_text())
        raw["workloads"] = [Workload(**w) for w in raw["workloads"]]
        return cls(**raw)


@dataclass(frozen=True)
class Run:
    workload: str
    token_times_s: list[list[float]]
    """Per request (workload order): seconds from submitting the run to each of its tokens."""
    num_cached_prompt_tokens: int
    """Prompt tokens the prefix cache served, summed over the run's requests."""
    num_preemptions: int | None = None
    """None where the system does not say."""


@dataclass(frozen=True)
class Result:
    system: str
    version: str
    runs: list[Run]
    single_token_times_s: list[list[float]] = field(default_factory=list)
    """Per single-stream rep: seconds from submission to each token (token 1 = prefill)."""
    floor: dict[str, float] = field(default_factory=dict)
    """Measured by the kvtide process only: weight_bytes, read_gbs."""
    notes: list[str] = field(default_factory=list)

    def dump(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> Result:
        raw = json.loads(Path(path).read_text())
        raw["runs"] = [Run(**r) for r in raw["runs"]]
        return cls(**raw)


@dataclass(frozen=True)
class Summary:
    """One run of one workload, as the table prints it."""

    wall_s: float
    output_tok_s: float
    requests_s: float
    ttft_mean_ms: float
    ttft_p90_ms: float
    itl_mean_ms: float
    itl_p90_ms: float


def p90(xs: Sequence[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(0.9 * len(s)))]


def summarize(run: Run, workload: Workload) -> Summary:
    """TTFT per request; ITL over every gap between consecutive tokens of all requests."""
    times = run.token_times_s
    got = [len(t) for t in times]
    if got != workload.osls:
        bad = next(i for i, (g, w) in enumerate(zip(got, workload.osls)) if g != w)
        raise ValueError(
            f"{workload.name}: request {bad} got {got[bad]} tokens, expected exactly {workload.osls[bad]}"
        )
    wall = max(t[-1] for t in times)
    ttft = [t[0] for t in times]
    itl = [b - a for t in times for a, b in zip(t, t[1:])]
    return Summary(
        wall_s=wall,
        output_tok_s=workload.num_output_tokens / wall,
        requests_s=len(times) / wall,
        ttft_mean_ms=1e3 * statistics.fmean(ttft),
        ttft_p90_ms=1e3 * p90(ttft),
        itl_mean_ms=1e3 * statistics.fmean(itl) if itl else float("nan"),
        itl_p90_ms=1e3 * p90(itl) if itl else float("nan"),
    )


def decode_rate(token_times_s: Sequence[float]) -> tuple[float, float]:
    """(tok/s, median step ms) of a single stream, prefill and first token excluded."""
    gaps = [b - a for a, b in zip(token_times_s, token_times_s[1:])]
    return len(gaps) / (token_times_s[-1] - token_times_s[0]), 1e3 * statistics.median(gaps)
