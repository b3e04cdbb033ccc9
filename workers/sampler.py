"""Turn one step's logits into one token per sequence, following vLLM's sampling semantics.

Logprobs are taken from the raw model logits. The sampling distribution is built by
logit_bias -> min_tokens -> bad words -> repetition penalty -> presence/frequency penalties,
then greedy rows take the argmax and the others go through
temperature -> top_k -> top_p -> min_p -> a draw from the row's generator.

Everything runs on the logits' device (every tensor made here is made there, generators
included), and a batch's results reach the host in one transfer (``SampledBatch.to_host``): the
one sync of a step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvtide.workers.sampling_params import SamplingParams

TOP_P_CANDIDATES = 1024
"""Top-p looks for the nucleus among this many top logits before falling back to a full sort."""


@dataclass
class SamplingRow:
    """One row of logits = one sequence."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None
    """Per-request RNG (seeded when ``params.seed`` is set); None uses torch's default RNG."""
    stop_token_ids: frozenset[int]
    """EOS ids + ``params.stop_token_ids``; banned while fewer than ``params.min_tokens`` are output."""


@dataclass(frozen=True, slots=True)
class SampledToken:
    token_id: int
    logprob: float | None
    """Raw logprob of ``token_id``; set when ``params.logprobs`` is not None."""
    top_logprobs: tuple[tuple[int, float], ...]
    """The top ``params.logprobs`` (token_id, logprob) pairs, descending; () when not requested."""


@dataclass(frozen=True)
class SampledBatch:
    """A step's samples, still on the logits' device."""

    token_ids: torch.Tensor
    """Shape (num_rows,), int64."""
    wanted: tuple[int, ...]
    """Rows that asked for logprobs."""
    ks: tuple[int, ...]
    """Top logprobs each wanted row asked for."""
    logprobs: torch.Tensor | None = None
    """Shape (len(wanted),): the chosen tokens' raw logprobs."""
    top_ids: torch.Tensor | None = None
    """Shape (len(wanted), max(ks))."""
    top_values: torch.Tensor | None = None

    def to_host(self) -> list[SampledToken]:
        """One device-to-host transfer for the whole batch (ids are exact in float64)."""
        parts = [self.token_ids.double()]
        if self.logprobs is not None:
            parts.append(self.logprobs.double())
        if self.top_ids is not None:
            parts += [self.top_ids.double().flatten(), self.top_values.double().flatten()]
        flat = (torch.cat(parts) if len(parts) > 1 else parts[0]).tolist()
        n, w = len(self.token_ids), len(self.wanted)
        token_ids = [int(t) for t in flat[:n]]
        out = [SampledToken(t, None, ()) for t in token_ids]
        if not w:
            return out
        chosen = flat[n : n + w]
        max_k = max(self.ks)
        ids, values = flat[n + w : n + w + w * max_k], flat[n + w + w * max_k :]
        for j, i in enumerate(self.wanted):
            k = self.ks[j]
            top = tuple((int(ids[j * max_k + c]), values[j * max_k + c]) for c in range(k))
            out[i] = SampledToken(token_ids[i], chosen[j], top)
        return out


class Sampler:
    """Stateless; all per-request state (RNG, tokens so far) comes in the rows."""

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[SampledToken]:
        """logits: [num_seqs, vocab_size], one row per entry of ``rows``; never mutated."""
        return self.sample(logits, rows).to_host()

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SampledBatch:
        """The samples on the logits' device; nothing here reads device memory."""
        assert logits.dim() == 2 and logits.shape[0] == len(rows), (tuple(logits.shape), len(rows))
        processed = [i for i, row in enumerate(rows) if _needs_processing(row)]
        sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
        token_ids = logits.argmax(dim=-1)
        if processed or sampled:
            token_ids = self._sample(logits, rows, processed, sampled, token_ids)
        return _with_logprobs(logits, rows, token_ids)

    def _sample(
        self,
        logits: torch.Tensor,
        rows: Sequence[SamplingRow],
        processed: list[int],
        sampled: list[int],
        token_ids: torch.Tensor,
    ) -> torch.Tensor:
        # NOTE: `work` holds copies of the rows that change, so the caller's logits stay intact.
        device = logits.device
        work_rows = sorted(set(processed) | set(sampled))
        work = logits[_index(work_rows, device)].float()  # Shape: (len(work_rows), vocab_size)
        pos = {i: j for j, i in enumerate(work_rows)}
        for i in processed:
            _process_row(work[pos[i]], rows[i])
        greedy = [i for i in work_rows if rows[i].params.greedy]
        if greedy:
            token_ids[_index(greedy, device)] = work[_index([pos[i] for i in greedy], device)].argmax(dim=-1)
        if sampled:
            x = work[_index([pos[i] for i in sampled], device)] if len(sampled) < len(work_rows) else work
            params = [rows[i].params for i in sampled]
            _apply_temperature(x, params)
            x = _apply_top_k_top_p(x, params)
            _apply_min_p(x, params)
            token_ids[_index(sampled, device)] = _draw(x, [rows[i].generator for i in sampled])
        return token_ids


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    return _on(rows, torch.long, device)


def _on(values: list, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """Host values as a tensor on ``device``. On CUDA they go through pinned memory in a copy that
    does not wait: a pageable host-to-device copy syncs with the GPU, several times a step."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def _needs_processing(row: SamplingRow) -> bool:
    p = row.params
    return bool(
        p.logit_bias
        or p.bad_words_token_ids
        or p.repetition_penalty != 1.0
        or p.presence_penalty != 0.0
        or p.frequency_penalty != 0.0
        or (row.stop_token_ids and len(row.output_token_ids) < p.min_tokens)
    )


def _process_row(x: torch.Tensor, row: SamplingRow) -> None:
    """Apply the logits processors to one row in place. x: [vocab_size]"""
    p, output, device = row.params, row.output_token_ids, x.device
    if p.logit_bias:
        x[_index(list(p.logit_bias), device)] += _on(list(p.logit_bias.values()), x.dtype, device)
    if row.stop_token_ids and len(output) < p.min_tokens:
        x[_index(list(row.stop_token_ids), device)] = -math.inf
    if p.bad_words_token_ids:
        banned = [words[-1] for words in p.bad_words_token_ids if _ends_with(output, words[:-1])]
        if banned:
            x[_index(banned, device)] = -math.inf
    # NOTE: repeated ids in a non-accumulating index_put all write the same value, so a token
    # repeated in the prompt or output is penalised once; only index_add_ counts occurrences.
    if p.repetition_penalty != 1.0:
        seen = _index([*row.prompt_token_ids, *output], device)
        values = x[seen]
        x[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
    if output and p.presence_penalty != 0.0:
        x[_index(list(output), device)] -= p.presence_penalty
    if output and p.frequency_penalty != 0.0:
        ids = _index(list(output), device)
        x.index_add_(0, ids, torch.full(ids.shape, -p.frequency_penalty, dtype=x.dtype, device=device))


def _ends_with(output: Sequence[int], prefix: tuple[int, ...]) -> bool:
    n = len(prefix)
    return n == 0 or (len(output) >= n and tuple(output[len(output) - n :]) == prefix)


def _apply_temperature(x: torch.Tensor, params: list[SamplingParams]) -> None:
    if any(p.temperature != 1.0 for p in params):
        x.div_(_on([p.temperature for p in params], x.dtype, x.device).unsqueeze(1))


def _apply_top_k_top_p(x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask tokens outside the top-k, then outside the nucleus. x: [num_seqs, vocab_size]

    Ties with the k-th largest logit are kept (as in vLLM), and likewise ties with the last token
    of the nucleus: the smallest prefix of the sorted, top-k-renormalised distribution whose mass
    reaches top_p. Its first token is always kept.
    """
    vocab_size, device = x.shape[1], x.device
    ks = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
    top_ps = [p.top_p for p in params]
    use_top_p = any(p < 1.0 for p in top_ps)
    if not use_top_p and min(ks) == vocab_size:
        return x
    if device.type != "cpu" and use_top_p:
        # On an accelerator a full sort is cheap, and exact without reading anything back; the
        # candidate search below needs to know (on the host) which rows overflow it.
        x = _top_k_only(x, ks)
        p = _on(top_ps, x.dtype, device).unsqueeze(1)
        return _top_p_sorted(x, p)
    # Sorting the whole vocabulary is slow on a CPU: look for the nucleus among the top candidates
    # first, and sort only the rows whose nucleus reaches past them.
    num_candidates = max(k for k in ks if k < vocab_size) if min(ks) < vocab_size else 1
    if use_top_p:
        num_candidates = max(num_candidates, min(TOP_P_CANDIDATES, vocab_size))
    top = x.topk(num_candidates, dim=-1).values  # Shape: (num_seqs, num_candidates), descending
    k = _on(ks, torch.long, device).unsqueeze(1)
    has_top_k = k <= num_candidates
    kth = torch.where(has_top_k, top.gather(1, (k - 1).clamp(max=num_candidates - 1)), -math.inf)
    if not use_top_p:
        return x.masked_fill_(x < kth, -math.inf)

    top.masked_fill_(top < kth, -math.inf)
    # A top-k row's whole distribution is among the candidates; other rows normalise over the vocabulary.
    log_total = torch.where(has_top_k, top.logsumexp(dim=-1, keepdim=True), x.logsumexp(dim=-1, keepdim=True))
    probs = (top - log_total).exp_()
    cum = probs.cumsum(dim=-1)
    p = _on(top_ps, x.dtype, device).unsqueeze(1)
    num_kept = ((cum - probs) < p).sum(dim=-1, keepdim=True)
    threshold = torch.where(p < 1.0, torch.maximum(top.gather(1, num_kept - 1), kth), kth)
    overflow = (p < 1.0) & ~has_top_k & (cum[:, -1:] < p) & (num_candidates < vocab_size)
    x.masked_fill_(x < threshold.masked_fill_(overflow, -math.inf), -math.inf)
    overflow_rows = overflow.squeeze(1).nonzero().squeeze(1)
    if len(overflow_rows):
        x[overflow_rows] = _top_p_sorted(x[overflow_rows], p[overflow_rows])
    return x


def _top_k_only(x: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """Mask tokens below each row's k-th largest logit (ties kept). x: [num_seqs, vocab_size]"""
    if min(ks) == x.shape[1]:
        return x
    top = x.topk(max(k for k in ks if k < x.shape[1]), dim=-1).values
    k = _on(ks, torch.long, x.device).unsqueeze(1)
    kth = torch.where(k <= top.shape[1], top.gather(1, (k - 1).clamp(max=top.shape[1] - 1)), -math.inf)
    return x.masked_fill_(x < kth, -math.inf)


def _top_p_sorted(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Exact top-p by a full sort. x: [num_seqs, vocab_size], p: [num_seqs, 1]"""
    sorted_x, order = x.sort(dim=-1, descending=True)
    probs = sorted_x.softmax(dim=-1)
    sorted_x.masked_fill_(probs.cumsum(dim=-1) - probs >= p, -math.inf)
    return torch.empty_like(x).scatter_(1, order, sorted_x)


def _apply_min_p(x: torch.Tensor, params: list[SamplingParams]) -> None:
    """Mask tokens whose probability is below min_p times the top token's."""
    if any(p.min_p > 0.0 for p in params):
        log_min_p = _on([p.min_p for p in params], x.dtype, x.device).log().unsqueeze(1)
        x.masked_fill_(x < x.amax(dim=-1, keepdim=True) + log_min_p, -math.inf)


def _draw(x: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row from softmax(x), by inverse CDF. x: [num_seqs, vocab_size], consumed.

    NOTE: each row draws exactly one uniform from its own generator (or torch's default one), so
    a seeded row's tokens do not depend on the other rows in the batch. One uniform per row
    instead of one per token (torch.multinomial's exponential race) is what keeps this cheap.
    """
    cdf = x.sub_(x.amax(dim=-1, keepdim=True)).exp_().cumsum_(dim=-1)
    if all(g is None for g in generators):
        u = torch.rand(len(generators), 1, device=x.device)
    else:
        u = torch.cat([torch.rand(1, 1, generator=g, device=x.device) for g in generators])
    # u in (0, 1], and the first index whose cdf reaches u * total never has zero probability.
    target = (1.0 - u).mul_(cdf[:, -1:])
    return torch.searchsorted(cdf, target).squeeze(1).clamp_(max=x.shape[1] - 1)


def _with_logprobs(logits: torch.Tensor, rows: Sequence[SamplingRow], token_ids: torch.Tensor) -> SampledBatch:
    wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    if not wanted:
        return SampledBatch(token_ids, (), ())
    index = _index(wanted, logits.device)
    raw = logits[index].float().log_softmax(dim=-1)  # Shape: (len(wanted), vocab_size)
    chosen = raw.gather(1, token_ids[index].unsqueeze(1)).squeeze(1)
    ks = tuple(rows[i].params.logprobs for i in wanted)
    if not max(ks):
        return SampledBatch(token_ids, tuple(wanted), ks, chosen)
    top = raw.topk(max(ks), dim=-1)
    return SampledBatch(token_ids, tuple(wanted), ks, chosen, top.indices, top.values)
