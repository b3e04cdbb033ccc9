"""The serving core both APIs share: check, tokenize, admit, route, stream, detokenize.

gRPC (``grpc_api.py``) and OpenAI HTTP (``http_api.py``) are thin translations of this one
path, so both reject the same inputs with the same messages, count the same metrics and cancel
the same way. It talks to replicas through typed handles (``handles.py``) and imports no Ray.

One owner for each piece of a request's work: ``check_request`` (workers) is the one check,
run here once; the replica's engine emits token ids only, and the text of each choice is made
here, once, by its ``IncrementalDetokenizer``, which also finds stop strings: a choice that hits
one ends here and is aborted on its replica, which frees its blocks before its next step.

Cancellation: when the consumer goes away (gRPC client cancel or deadline, HTTP disconnect,
drain timeout) the replica stream is closed, which cancels the call and aborts the request on
its replica. A request still waiting for admission holds nothing on any replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvtide.cluster.frontend.admission import Admission
from kvtide.cluster.frontend.errors import Code, ServingError, invalid
from kvtide.cluster.frontend.handles import (
    ReplicaFailed,
    ReplicaGone,
    ReplicaRejected,
    ReplicaStream,
    ReplicaUnreachable,
    StreamCancelled,
)
from kvtide.cluster.frontend.metrics import FrontendMetrics
from kvtide.cluster.frontend.prompts import PromptTokenizer
from kvtide.cluster.frontend.replicas import NoReplicaAvailable, ReplicaSet, RoutedReplica
from kvtide.cluster.frontend.requests import ChoiceDelta, FrontendConfig, PreparedRequest, Usage
from kvtide.workers import IncrementalDetokenizer, RequestLimits, SamplingParams, Tokenizer, check_request

logger = logging.getLogger(__name__)


class Gateway:
    def __init__(
        self,
        model_name: str,
        limits: RequestLimits,
        tokenizer: Tokenizer,
        replicas: ReplicaSet,
        config: FrontendConfig | None = None,
        metrics: FrontendMetrics | None = None,
    ) -> None:
        self.model_name = model_name
        self.limits = limits
        self.tokenizer = tokenizer
        self.replicas = replicas
        self.config = config or FrontendConfig()
        self.metrics = metrics or FrontendMetrics(replicas)
        self.prompts = PromptTokenizer(tokenizer, limits.max_model_len, self.config.tokenizer_threads)
        self.admission = Admission(self.config)
        self._active: dict[str, _Active] = {}

    @property
    def draining(self) -> bool:
        return self.admission.draining

    # -- checks and tokenization ---------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model and model != self.model_name:
            raise ServingError(
                Code.NOT_FOUND, f"The model {model!r} does not exist; this server serves {self.model_name!r}"
            )

    def render_chat(self, messages: Sequence[Mapping[str, Any]]) -> str:
        return self.prompts.render_chat(messages)

    async def prepare(
        self, prompt: str | Sequence[int], params: Mapping[str, Any], request_id: str | None = None,
        chat: bool = False,
    ) -> PreparedRequest:
        """Tokenize (off the event loop) and check, once; ``params`` are ``SamplingParams``
        fields, ``max_tokens`` None (or absent) meaning the rest of the context; ``chat``: the
        prompt is what ``render_chat`` returned (``PromptTokenizer.encode_chat``). Raises
        ServingError(INVALID_ARGUMENT) naming the field."""
        arrival_s = time.perf_counter()
        if isinstance(prompt, str):
            encode = self.prompts.encode_chat if chat else self.prompts.encode
            token_ids = await encode("prompt", prompt)
        else:
            token_ids = list(prompt)
        max_len = self.limits.max_model_len
        if isinstance(prompt, str) and len(token_ids) >= max_len:  # encode stopped counting there
            raise invalid(
                f"This model's maximum context length is {max_len} tokens and your prompt has at least "
                f"{len(token_ids)} tokens; it leaves no room for output"
            )
        kwargs = dict(params)
        if kwargs.get("max_tokens") is None:
            kwargs["max_tokens"] = max(1, max_len - len(token_ids))
        rid = f"{request_id or 'req'}-{uuid.uuid4().hex[:16]}"
        try:
            request = check_request(rid, token_ids, SamplingParams(**kwargs), self.limits)
        except ValueError as exc:
            raise invalid(str(exc)) from exc
        return PreparedRequest(request, arrival_s)

    # -- the stream ------------------------------------------------------------------------

    async def generate(self, prepared: PreparedRequest) -> AsyncIterator[ChoiceDelta]:
        """Stream one request's choices; raises ServingError. Closing the iterator early (or
        cancelling its consumer) aborts the request on its replica."""
        request = prepared.request
        async with self.admission.admitted(prepared.arrival_s, self._within_deadline):
            self.metrics.queue_time.observe(time.perf_counter() - prepared.arrival_s)
            try:
                routed = self.replicas.choose(request.prompt_token_ids, request.params.max_tokens)
            except NoReplicaAvailable as exc:
                raise ServingError(Code.UNAVAILABLE, f"no replica can serve the request: {exc}") from exc
            active = self._active[request.request_id] = _Active(routed)
            try:
                async with contextlib.aclosing(self._choices(prepared, routed, active)) as choices:
                    while True:
                        try:
                            delta = await self._within_deadline(anext(choices), prepared.arrival_s, "generating")
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

    async def _choices(self, prepared: PreparedRequest, routed: RoutedReplica, active: _Active):
        request = prepared.request
        choices = [_Choice(IncrementalDetokenizer.for_request(self.tokenizer, request.prompt_token_ids,
                                                              request.params)) for _ in range(request.params.n)]  # fmt: skip
        remaining, cached = len(choices), 0
        timer = self.metrics.request_timer(prepared.arrival_s)
        stream = active.stream = routed.handle.generate(request)
        async with contextlib.aclosing(stream), contextlib.aclosing(_mapped(stream, routed, active, self.replicas)) as deltas:
            async for d in deltas:
                choice = choices[d.index]
                if choice.finished:
                    continue  # a step or two the replica ran past its stop string
                if d.finish_reason == "error":
                    active.outcome = "error"
                    raise ServingError(Code.INTERNAL, f"replica {routed.replica_id} failed: {d.error}")
                out = choice.take(d)
                cached = d.num_cached_tokens
                timer.tokens(len(out.token_ids))
                stopped_here = choice.finished and not d.finished  # its stop string, not the engine
                if choice.finished:
                    remaining -= 1
                    if stopped_here and remaining:
                        routed.handle.abort(request.request_id, d.index)  # the others go on
                usage = None
                if not remaining:
                    usage = Usage(len(request.prompt_token_ids), sum(c.num_tokens for c in choices), cached)
                yield ChoiceDelta(out.index, out.token_ids, out.text, out.logprobs, out.finish_reason,
                                  out.stop_reason, routed.replica_id, usage)  # fmt: skip
                if not remaining and stopped_here:
                    break  # closing the stream aborts what the replica still runs of it
        if remaining:
            raise ServingError(
                Code.UNAVAILABLE if active.abort_reason else Code.INTERNAL,
                active.abort_reason or f"replica {routed.replica_id} ended the stream before every choice finished",
            )
        num_output = sum(c.num_tokens for c in choices)
        timer.finished(len(request.prompt_token_ids), num_output)
        self.metrics.finished(out.finish_reason or "")
        active.finished = True
        self.replicas.on_finished(routed.replica_id, len(request.prompt_token_ids), num_output)

    # -- drain -----------------------------------------------------------------------------

    async def drain(self, timeout_s: float) -> int:
        """Refuse new requests, let in-flight ones finish for up to ``timeout_s``, then abort
        the rest with a clear reason. Returns how many were aborted."""
        self.admission.draining = True
        deadline = time.monotonic() + timeout_s
        while self._active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = list(self._active.values())
        reason = f"the server is shutting down: the request did not finish within the {timeout_s:g} s drain timeout"
        for active in left:
            active.abort_reason = reason
            if active.stream is not None:
                active.stream.cancel()
        return len(left)

    def close(self) -> None:
        self.prompts.close()


@dataclass
class _Active:
    routed: RoutedReplica
    stream: ReplicaStream | None = None
    abort_reason: str | None = None
    finished: bool = False
    """Every choice finished and the router was told (``on_finished``)."""
    outcome: str = "abort"
    """The finish reason counted if it does not finish: "abort" (cancelled, timed out,
    drained) unless the replica failed it ("error")."""


@dataclass
class _Choice:
    """One choice's text and tokens, as the client sees them."""

    detok: IncrementalDetokenizer
    num_tokens: int = 0
    finished: bool = False

    def take(self, d) -> ChoiceDelta:
        pushed_before = self.detok.num_tokens_pushed
        released = self.detok.push(d.token_ids, final=d.finished)
        ids, finish, stop = d.token_ids, d.finish_reason, d.stop_reason
        if released.stop_string is not None:  # the stop string ends it here, whatever the engine said
            ids = ids[: self.detok.num_tokens_to_stop - pushed_before]
            finish, stop = "stop", released.stop_string
        self.num_tokens += len(ids)
        self.finished = finish is not None
        return ChoiceDelta(d.index, tuple(ids), released.text, d.logprobs[: len(ids)], finish, stop, "")


async def _mapped(stream: ReplicaStream, routed: RoutedReplica, active: _Active, replicas: ReplicaSet):
    """The replica's deltas, its errors as ServingErrors."""
    rid = routed.replica_id
    try:
        async for d in stream:
            yield d
    except ReplicaRejected as exc:
        active.outcome = "error"
        raise invalid(str(exc)) from exc
    except ReplicaUnreachable as exc:
        active.outcome = "error"  # not dead: keep routing to it
        raise ServingError(Code.UNAVAILABLE, str(exc)) from exc
    except ReplicaGone as exc:
        active.outcome = "error"
        replicas.replica_failed(rid)
        raise ServingError(Code.UNAVAILABLE, str(exc)) from exc
    except StreamCancelled as exc:
        raise ServingError(Code.UNAVAILABLE, active.abort_reason or str(exc)) from exc
    except ReplicaFailed as exc:
        active.outcome = "error"
        raise ServingError(Code.INTERNAL, str(exc)) from exc

