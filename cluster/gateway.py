"""The serving core both APIs share: validate, tokenize, admit, route, stream, detokenize.

gRPC (``frontend.py``) and OpenAI HTTP (``http_api.py``) are thin translations of this one
path, so both reject the same inputs with the same messages, count the same metrics and
cancel the same way. Errors are ``ServingError``s carrying a protocol-neutral code that each
API maps to its own (gRPC status, HTTP status).

Cancellation: every request streams from its replica through a Ray streaming call. When the
consumer goes away (gRPC client cancel or deadline, HTTP disconnect, drain timeout) the
generator is closed, which cancels the Ray call and sends the replica an explicit abort, so
the engine frees the request's blocks before its next step. A request still waiting for
admission holds nothing on any replica and simply never runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from jinja2 import TemplateError

from kvtide.cluster.metrics import FrontendMetrics
from kvtide.cluster.replica_set import NoReplicaAvailable, ReplicaSet, RoutedReplica
from kvtide.workers.detokenizer import IncrementalDetokenizer
from kvtide.workers.outputs import CompletionDelta
from kvtide.workers.sampler import SampledToken
from kvtide.workers.sampling_params import SamplingParams
from kvtide.workers.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class Code(enum.Enum):
    """Protocol-neutral error kinds; each API maps them to its own codes."""

    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    UNAUTHENTICATED = "unauthenticated"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    INTERNAL = "internal"


_DRAINING = "the server is draining for shutdown; retry on another server"


class ServingError(Exception):
    def __init__(self, code: Code, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s

    def with_message(self, message: str) -> ServingError:
        """The same error told differently (e.g. naming the field as the client sent it)."""
        return ServingError(self.code, message, self.retry_after_s)


@dataclass(frozen=True)
class ModelSpec:
    """What the frontend must know of the served model to validate a request up front."""

    name: str
    max_model_len: int
    vocab_size: int
    max_num_seqs: int


@dataclass(frozen=True)
class FrontendConfig:
    max_in_flight: int = 256
    """Requests streaming from replicas at once; more wait for admission."""
    max_queued: int = 256
    """Requests waiting for admission; more are refused with RESOURCE_EXHAUSTED / 429."""
    retry_after_s: float = 1.0
    """The retry hint sent with an admission refusal."""
    api_keys: tuple[str, ...] = ()
    """Accepted bearer tokens; empty disables auth."""
    max_message_bytes: int = 4 * 2**20
    """Largest request body (gRPC message or HTTP body)."""
    max_prompts_per_request: int = 64
    """Prompts in one batched ``/v1/completions`` request (each is its own request inside)."""
    request_timeout_s: float | None = None
    """The server's deadline for every request, admission wait included (None: none). gRPC
    clients bring their own deadline as well, and the earlier one wins; over HTTP this is the
    only one the server knows. Past it: DEADLINE_EXCEEDED / 504, aborted on its replica."""

    def __post_init__(self) -> None:
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0 (or None for no limit), got {self.request_timeout_s}")


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request, tokenized at the frontend: only token ids travel to a replica."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    arrival_s: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class ChoiceDelta:
    """New tokens and text of one choice, as the client sees them."""

    index: int
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[SampledToken, ...]
    finish_reason: str | None
    stop_reason: str | int | None
    replica_id: str
    usage: Usage | None = None
    """Set on the last delta of the request (every choice finished)."""


class Gateway:
    def __init__(
        self,
        spec: ModelSpec,
        tokenizer: Tokenizer,
        replicas: ReplicaSet,
        config: FrontendConfig | None = None,
        metrics: FrontendMetrics | None = None,
    ) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self.replicas = replicas
        self.config = config or FrontendConfig()
        self.metrics = metrics or FrontendMetrics(replicas)
        self._slots = asyncio.Semaphore(self.config.max_in_flight)
        self.num_queued = 0
        self.num_in_flight = 0
        self.draining = False
        self._active: dict[str, _Active] = {}

    # -- validation and tokenization (pure) ---------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model and model != self.spec.name:
            raise ServingError(
                Code.NOT_FOUND,
                f"The model {model!r} does not exist; this server serves {self.spec.name!r}",
            )

    def render_chat(self, messages: Sequence[Mapping[str, Any]]) -> str:
        if not messages:
            raise ServingError(Code.INVALID_ARGUMENT, "messages must contain at least 1 message, got 0")
        for i, m in enumerate(messages):
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ServingError(
                    Code.INVALID_ARGUMENT, f"messages[{i}] must have a string role and content, got {m!r}"
                )
        try:
            return self.tokenizer.apply_chat_template([dict(m) for m in messages])
        except (TemplateError, ValueError) as exc:
            raise ServingError(Code.INVALID_ARGUMENT, f"the chat template rejected the messages: {exc}") from exc

    def prepare(
        self,
        prompt: str | Sequence[int],
        params: Mapping[str, Any],
        request_id: str | None = None,
    ) -> PreparedRequest:
        """Tokenize and validate; ``params`` are SamplingParams fields, ``max_tokens`` None (or
        absent) meaning the rest of the context. Raises ServingError(INVALID_ARGUMENT)."""
        arrival_s = time.perf_counter()
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not token_ids:
            raise ServingError(Code.INVALID_ARGUMENT, "prompt must contain at least 1 token, got 0")
        vocab = self.spec.vocab_size
        for i, t in enumerate(token_ids):
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise ServingError(
                    Code.INVALID_ARGUMENT, f"prompt token {i} is {t!r}; token ids must be integers in [0, {vocab})"
                )
        max_len, num_prompt = self.spec.max_model_len, len(token_ids)
        if num_prompt >= max_len:
            raise ServingError(
                Code.INVALID_ARGUMENT,
                f"This model's maximum context length is {max_len} tokens and your prompt has "
                f"{num_prompt} tokens; it leaves no room for output",
            )
        kwargs = dict(params)
        if kwargs.get("max_tokens") is None:
            kwargs["max_tokens"] = max_len - num_prompt
        try:
            sampling = SamplingParams(**kwargs)
            sampling.check_vocab(vocab)
        except ValueError as exc:
            raise ServingError(Code.INVALID_ARGUMENT, str(exc)) from exc
        if num_prompt + sampling.max_tokens > max_len:
            raise ServingError(
                Code.INVALID_ARGUMENT,
                f"max_tokens is too large: {sampling.max_tokens}. This model's maximum context length "
                f"is {max_len} tokens and your request has {num_prompt} input tokens",
            )
        if sampling.n > self.spec.max_num_seqs:
            raise ServingError(
                Code.INVALID_ARGUMENT,
                f"n is too large: {sampling.n}. A replica runs at most {self.spec.max_num_seqs} sequences at once",
            )
        rid = f"{request_id or 'req'}-{uuid.uuid4().hex[:16]}"
        return PreparedRequest(rid, tuple(token_ids), sampling, arrival_s)

    # -- admission -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _admitted(self, arrival_s: float) -> AsyncIterator[None]:
        if self.draining:
            raise ServingError(Code.UNAVAILABLE, _DRAINING)
        if self._slots.locked() and self.num_queued >= self.config.max_queued:
            raise ServingError(
                Code.RESOURCE_EXHAUSTED,
                f"the admission queue is full: {self.num_queued} requests waiting (max_queued="
                f"{self.config.max_queued}); retry after {self.config.retry_after_s:g} s",
                retry_after_s=self.config.retry_after_s,
            )
        self.num_queued += 1
        try:
            # cancelled or timed out here: the request never reached a replica
            await self._within_deadline(self._slots.acquire(), arrival_s, "waiting for admission")
        finally:
            self.num_queued -= 1
        if self.draining:  # drain began while it waited: a slot freed by drain's aborts
            self._slots.release()
            raise ServingError(Code.UNAVAILABLE, _DRAINING)
        self.num_in_flight += 1
        try:
            yield
        finally:
            self.num_in_flight -= 1
            self._slots.release()

    # -- the stream ------------------------------------------------------------------------

    async def generate(self, request: PreparedRequest) -> AsyncIterator[ChoiceDelta]:
        """Stream one request's choices; raises ServingError. Closing the iterator early (or
        cancelling its consumer) aborts the request on its replica."""
        async with self._admitted(request.arrival_s):
            try:
                routed = self.replicas.choose(request.prompt_token_ids, request.params.max_tokens)
            except NoReplicaAvailable as exc:
                raise ServingError(Code.UNAVAILABLE, f"no replica can serve the request: {exc}") from exc
            active = _Active(routed)
            self._active[request.request_id] = active
            try:
                async with contextlib.aclosing(self._choices(request, routed, active)) as choices:
                    while True:
                        try:
                            delta = await self._within_deadline(anext(choices), request.arrival_s, "generating")
                        except StopAsyncIteration:
                            break
                        yield delta
            finally:
                self._active.pop(request.request_id, None)
                if not active.finished:
                    self.replicas.on_ended(routed.replica_id)  # else the router counts it forever
                    self.metrics.finished(active.outcome)

    async def _within_deadline(self, awaitable, arrival_s: float, doing: str):
        """``awaitable``'s result, unless the server's request timeout passes first: then it is
        cancelled (a stream's cancellation aborts the request on its replica) and the request
        fails with DEADLINE_EXCEEDED."""
        timeout_s = self.config.request_timeout_s
        if timeout_s is None:
            return await awaitable
        try:
            return await asyncio.wait_for(awaitable, max(0.0, arrival_s + timeout_s - time.perf_counter()))
        except TimeoutError:
            raise ServingError(
                Code.DEADLINE_EXCEEDED,
                f"the request passed the server's request timeout of {timeout_s:g} s while {doing} "
                f"(request_timeout_s={timeout_s:g})",
            ) from None

    async def _choices(self, request: PreparedRequest, routed: RoutedReplica, active: _Active):
        p = request.params
        detoks = [
            IncrementalDetokenizer(
                self.tokenizer,
                request.prompt_token_ids,
                skip_special_tokens=p.skip_special_tokens,
                stop=p.stop,
                include_stop_str_in_output=p.include_stop_str_in_output,
            )
            for _ in range(p.n)
        ]
        num_output = [0] * p.n
        remaining, cached = p.n, 0
        timer = self.metrics.request_timer(request.arrival_s)
        async with contextlib.aclosing(self._replica_deltas(request, routed, active)) as deltas:
            async for d in deltas:
                if d.finish_reason == "error":
                    active.outcome = "error"
                    raise ServingError(Code.INTERNAL, f"replica {routed.replica_id} failed: {d.error}")
                text = _text(detoks[d.index], d)
                num_output[d.index] += len(d.token_ids)
                cached = d.num_cached_tokens
                timer.tokens(len(d.token_ids))
                usage = None
                if d.finished:
                    remaining -= 1
                    if not remaining:
                        usage = Usage(len(request.prompt_token_ids), sum(num_output), cached)
                yield ChoiceDelta(
                    d.index, d.token_ids, text, d.logprobs, d.finish_reason, d.stop_reason,
                    routed.replica_id, usage,
                )  # fmt: skip
        if remaining:
            raise ServingError(
                Code.UNAVAILABLE if active.abort_reason else Code.INTERNAL,
                active.abort_reason or f"replica {routed.replica_id} ended the stream before every choice finished",
            )
        timer.finished(len(request.prompt_token_ids), sum(num_output))
        self.metrics.finished(d.finish_reason or "")
        active.finished = True
        self.replicas.on_finished(routed.replica_id, len(request.prompt_token_ids), sum(num_output))

    async def _replica_deltas(
        self, request: PreparedRequest, routed: RoutedReplica, active: _Active
    ) -> AsyncIterator[CompletionDelta]:
        actor = routed.actor
        stream = actor.generate.options(num_returns="streaming").remote(
            list(request.prompt_token_ids), request.params, request.request_id
        )
        active.stream = stream
        done = False
        try:
            async for ref in stream:
                yield await ref
            done = True
        except ValueError as exc:  # the replica's own validation (a RayTaskError that is a ValueError)
            done, active.outcome = True, "error"
            raise ServingError(Code.INVALID_ARGUMENT, _cause(exc)) from exc
        except ray.exceptions.ActorUnavailableError as exc:
            # Ray: unreachable for now (e.g. a network blip), may come back, and the call may
            # or may not have run. Not dead: keep routing to it, and abort in case it did run.
            active.outcome = "error"
            raise ServingError(Code.UNAVAILABLE, f"replica {routed.replica_id} is unavailable: {_cause(exc)}") from exc
        except ray.exceptions.RayActorError as exc:  # the actor died
            done, active.outcome = True, "error"
            self.replicas.replica_failed(routed.replica_id)
            raise ServingError(Code.UNAVAILABLE, f"replica {routed.replica_id} is unavailable: {_cause(exc)}") from exc
        except ray.exceptions.TaskCancelledError as exc:
            raise ServingError(Code.UNAVAILABLE, active.abort_reason or "the request was cancelled") from exc
        except ray.exceptions.RayTaskError as exc:
            done, active.outcome = True, "error"
            raise ServingError(Code.INTERNAL, f"replica {routed.replica_id} failed: {_cause(exc)}") from exc
        finally:
            if not done:
                # NOTE: both: cancelling ends the Ray call; the explicit abort frees the blocks
                # before the engine's next step even if the actor's generator is slow to close.
                ray.cancel(stream)
                actor.abort.remote(request.request_id)

    # -- drain -----------------------------------------------------------------------------

    async def drain(self, timeout_s: float) -> int:
        """Refuse new requests, let in-flight ones finish for up to ``timeout_s``, then abort
        the rest with a clear reason. Returns how many were aborted."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self._active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = list(self._active.values())
        reason = f"the server is shutting down: the request did not finish within the {timeout_s:g} s drain timeout"
        for active in left:
            active.abort_reason = reason
            if active.stream is not None:
                ray.cancel(active.stream)
        return len(left)


def api_key_ok(presented: str | None, api_keys: Sequence[str]) -> bool:
    """Whether ``presented`` ("Bearer <key>") carries one of ``api_keys``; constant time per key.
    No keys configured means auth is off."""
    if not api_keys:
        return True
    if not presented or not presented.startswith("Bearer "):
        return False
    token = presented[len("Bearer ") :].encode()
    # NOTE: compare against every key (no early exit), so timing says nothing about which matched.
    return sum(hmac.compare_digest(token, k.encode()) for k in api_keys) > 0


@dataclass
class _Active:
    routed: RoutedReplica
    stream: Any = None
    """The Ray ObjectRefGenerator, once the call is made."""
    abort_reason: str | None = None
    finished: bool = False
    """Every choice finished and the router was told (``on_finished``)."""
    outcome: str = "abort"
    """The finish reason counted if it does not finish: "abort" (cancelled, timed out,
    drained) unless the replica failed it ("error")."""


def _text(detok: IncrementalDetokenizer, delta: CompletionDelta) -> str:
    """The frontend's own incremental detokenization; the engine's stop string has already
    ended the request, and the same stop strings cut the text at the same place here."""
    if detok.stop_string is not None:
        return ""
    text = detok.push(delta.token_ids).text
    if delta.finished and detok.stop_string is None:
        text += detok.flush()
    return text


def _cause(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    return str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
