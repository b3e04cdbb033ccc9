"""One generation request as the engine tracks it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import NewType

from kvtide.proto.block_hash import BlockHash
from kvtide.workers.sampling_params import SamplingParams

RequestId = NewType("RequestId", str)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort", "error")


@dataclass(eq=False)
class Request:
    """A sequence the scheduler runs: prompt, the tokens generated so far, its KV blocks.

    With ``n > 1`` the engine forks one ``Request`` per choice after the prompt's prefill;
    the children share the prompt's blocks (``parent_id`` names the original request,
    ``index`` the choice).
    """

    request_id: RequestId
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    parent_id: RequestId | None = None
    index: int = 0

    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    """Tokens whose KV is in the cache (or will be once the current step ends)."""
    num_cached_prompt_tokens: int = 0
    """Prompt tokens served from the prefix cache at first schedule (for metrics)."""
    block_ids: list[int] = field(default_factory=list)
    """The block table: physical KV block ids, one per ``block_size`` tokens."""
    block_hashes: list[BlockHash] = field(default_factory=list)
    """Chained hashes of the full blocks of ``all_token_ids`` (maintained by the KV manager)."""
    num_preemptions: int = 0
    queue_key: float = 0.0
    """The waiting queue is ordered by this (the scheduler sets it; -inf once preempted)."""
    forked: bool = False
    """True once an n > 1 request has forked its n - 1 children."""
    in_flight: bool = False
    """Scheduled in a step that has not finished yet (pipeline micro-batches): it is neither
    scheduled again nor preempted until then."""

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def is_prefilling(self) -> bool:
        """True while the prompt (or, after preemption, prompt + outputs) is not all computed."""
        return self.num_computed_tokens < self.num_tokens - 1

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
