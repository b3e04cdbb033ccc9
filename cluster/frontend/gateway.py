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
from typing import Any

from kvtide.cluster.frontend.admission import Admission
from kvtide.cluster.frontend.errors import Code, ServingError, invalid
from kvtide.cluster.frontend.choices import Active, Choice, ReplicaLost, mapped
from kvtide.cluster.frontend.metrics import FrontendMetrics
from kvtide.cluster.frontend.prompts import PromptTokenizer
from kvtide.cluster.frontend.replicas import NoReplicaAvailable, ReplicaSet
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
        self._active: dict[str, Active] = {}
        self.healthy = True
        """False while no replica is fit to serve (the supervisor's verdict): /health says 503."""

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
            active = self._active[request.request_id] = Active(routed)
            try:
                async with contextlib.aclosing(self._choices(prepared, active)) as choices:
                    while True:
                        try:
                            delta = await self._within_deadline(anext(choices), prepared.arrival_s, "generating")
                        except StopAsyncIteration:
                            break
                        yield delta
            finally:
                self._active.pop(request.request_id, None)
                if not active.finished:
                    self.replicas.on_ended(active.routed.replica_id)  # else the router counts it forever
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

    async def _choices(self, prepared: PreparedRequest, active: Active):
        """The request's choices as the client sees them, from as many replicas as it takes: one
        that dies (or fails the step) mid-stream hands the request, prompt plus the tokens so
        far, to another (``max_migrations`` times at most) and the stream goes on."""
        request = prepared.request
        choices = [Choice(IncrementalDetokenizer.for_request(self.tokenizer, request.prompt_token_ids,
                                                              request.params)) for _ in range(request.params.n)]  # fmt: skip
        timer = self.metrics.request_timer(prepared.arrival_s)
        current, failed = request, set()
        for attempt in range(self.config.max_migrations + 1):
            try:
                async for out in self._attempt(current, active, choices, timer):
                    yield out
                break
            except ReplicaLost as lost:
                failed.add(active.routed.replica_id)
                current = self._migrate(request, choices, active, lost, failed, attempt)
                logger.warning("%s; moved request %s (%d tokens so far) to replica %s", lost, request.request_id,
                               choices[0].num_tokens, active.routed.replica_id)  # fmt: skip
        num_output = sum(c.num_tokens for c in choices)
        timer.finished(len(request.prompt_token_ids), num_output)
        self.metrics.finished(choices[-1].finish_reason or "")
        active.finished = True
        self.replicas.on_finished(active.routed.replica_id, len(request.prompt_token_ids), num_output)

    def _migrate(self, request, choices, active: Active, lost: ReplicaLost, failed: set, attempt: int):
        """The request to send next, to a replica ``active.routed`` now names; raises a retryable
        ServingError (UNAVAILABLE) when it cannot be moved."""
        active.outcome = "error"  # unless it moves and finishes
        if request.params.n > 1 or attempt >= self.config.max_migrations or active.abort_reason:
            why = "a request with n > 1 is not moved" if request.params.n > 1 else "it was moved too often"
            raise ServingError(Code.UNAVAILABLE, f"{lost}; {why}: retry it")
        self.replicas.on_ended(active.routed.replica_id)
        tokens = (*request.prompt_token_ids, *choices[0].token_ids)
        try:  # another replica; the same one if it is the only one and only failed the step
            active.routed = self.replicas.choose(tokens, request.params.max_tokens, exclude=failed)
        except NoReplicaAvailable:
            if lost.gone:
                raise ServingError(Code.UNAVAILABLE, f"{lost}; no other replica can take it: retry it") from None
            active.routed = self.replicas.choose(tokens, request.params.max_tokens)
        self.metrics.migrations.inc()
        return request.resumed(f"{request.request_id}-m{attempt + 1}", tuple(choices[0].token_ids))

    async def _attempt(self, request, active: Active, choices: list[Choice], timer):
        """One replica's stream of the request's unfinished choices."""
        routed = active.routed
        remaining = sum(not c.finished for c in choices)
        stream = active.stream = routed.handle.generate(request)
        async with contextlib.aclosing(stream), contextlib.aclosing(mapped(stream, routed, active, self.replicas)) as deltas:
            async for d in deltas:
                choice = choices[d.index]
                if choice.finished:
                    continue  # a step or two the replica ran past its stop string
                if d.finish_reason == "error":
                    raise ReplicaLost(f"replica {routed.replica_id} failed the step: {d.error}")
                out = choice.take(d)
                timer.tokens(len(out.token_ids))
                stopped_here = choice.finished and not d.finished  # its stop string, not the engine
                if choice.finished:
                    remaining -= 1
                    if stopped_here and remaining:
                        routed.handle.abort(request.request_id, d.index)  # the others go on
                usage = None
                if not remaining:
                    usage = Usage(len(request.prompt_token_ids), sum(c.num_tokens for c in choices), d.num_cached_tokens)
                yield ChoiceDelta(out.index, out.token_ids, out.text, out.logprobs, out.finish_reason,
                                  out.stop_reason, routed.replica_id, usage)  # fmt: skip
                if not remaining and stopped_here:
                    break  # closing the stream aborts what the replica still runs of it
        if remaining:
            if active.abort_reason:
                raise ServingError(Code.UNAVAILABLE, active.abort_reason)
            raise ReplicaLost(f"replica {routed.replica_id} ended the stream before every choice finished")

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
