"""The shared-prefix chat workload of ``bench/routing.py`` and ``bench/routing_sim.py``.

Several long system prompts, each shared by many users; every user has a multi-turn chat that
resends its whole history (system prompt, earlier messages and the model's replies) with each
new message. Token ids are random (seeded) so nothing depends on a tokenizer; replies are
whatever the model (or the simulator) produced, which the next turn resends.

Each system prompt has the same number of users, in a seeded random order, so the chats in
flight at any moment want different prefixes and no client keeps one prefix: a router that
ignores caches spreads every system prompt over every replica. (With user i on prompt i mod
S and clients in lockstep, round-robin sent each client to one replica forever and got the
partition for free.)
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from kvtide.proto.block_hash import hash_full_blocks


@dataclass(frozen=True)
class WorkloadConfig:
    num_system_prompts: int = 6
    system_prompt_tokens: int = 256
    num_users: int = 18
    num_turns: int = 3
    user_tokens: int = 24
    """Tokens of each new user message."""
    output_tokens: int = 12
    """Tokens of every reply (EOS is banned until then)."""
    num_clients: int = 4
    """Chats in flight at once (closed loop: a client runs one user's turns, then the next user)."""
    seed: int = 0
    token_lo: int = 1000
    token_hi: int = 40000

    def scaled(self, factor: int) -> WorkloadConfig:
        """The same shape for ``factor`` times as many replicas: prompts, users and clients."""
        return WorkloadConfig(
            self.num_system_prompts * factor, self.system_prompt_tokens, self.num_users * factor,
            self.num_turns, self.user_tokens, self.output_tokens, self.num_clients * factor,
            self.seed, self.token_lo, self.token_hi,
        )


class Workload:
    def __init__(self, cfg: WorkloadConfig) -> None:
        self.cfg = cfg
        rng = random.Random(cfg.seed)

        def tokens(n: int) -> list[int]:
            return [rng.randrange(cfg.token_lo, cfg.token_hi) for _ in range(n)]

        self.system_prompts = [tokens(cfg.system_prompt_tokens) for _ in range(cfg.num_system_prompts)]
        self.messages = [[tokens(cfg.user_tokens) for _ in range(cfg.num_turns)] for _ in range(cfg.num_users)]
        self._system_of = [u % cfg.num_system_prompts for u in range(cfg.num_users)]
        rng.shuffle(self._system_of)

    def system_of(self, user: int) -> int:
        return self._system_of[user]

    def prompt(self, user: int, turn: int, replies: Sequence[Sequence[int]]) -> list[int]:
        """Turn ``turn``'s prompt: system prompt, then each earlier message and its reply, then
        the new message. ``replies`` holds the replies of turns ``0..turn-1``."""
        assert len(replies) == turn, (len(replies), turn)
        out = list(self.system_prompts[self.system_of(user)])
        for t in range(turn):
            out += self.messages[user][t]
            out += replies[t]
        return out + self.messages[user][turn]

    def fake_reply(self, user: int, turn: int) -> list[int]:
        """A deterministic stand-in reply for the simulator."""
        rng = random.Random(hash((self.cfg.seed, user, turn)) & 0xFFFFFFFF)
        return [rng.randrange(self.cfg.token_lo, self.cfg.token_hi) for _ in range(self.cfg.output_tokens)]


@dataclass(frozen=True)
class PrefixStats:
    num_prompt_tokens: int
    num_shared_tokens: int
    """Prompt tokens in full blocks that an earlier request (prompt or reply) already produced:
    the hit rate of an infinite cache in one place."""
    num_distinct_blocks: int
    """Distinct KV blocks the whole workload writes (prompts and replies)."""

    @property
    def shared_share(self) -> float:
        return self.num_shared_tokens / max(1, self.num_prompt_tokens)


def prefix_stats(requests: Iterable[tuple[Sequence[int], Sequence[int]]], block_size: int) -> PrefixStats:
    """Over (prompt, reply) pairs in arrival order."""
    seen: set[bytes] = set()
    num_prompt = num_shared = 0
    for prompt, reply in requests:
        hashes = hash_full_blocks(prompt, block_size)
        reusable = hashes[: (len(prompt) - 1) // block_size]
        hits = 0
        for h in reusable:
            if h not in seen:
                break
            hits += 1
        num_prompt += len(prompt)
        num_shared += hits * block_size
        seen.update(hash_full_blocks(list(prompt) + list(reply), block_size))
    return PrefixStats(num_prompt, num_shared, len(seen))


def percentile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    return s[min(len(s) - 1, int(q * len(s)))]


@dataclass
class RunStats:
    """What one policy's run measured, real (routing.py) or simulated (routing_sim.py)."""

    policy: str
    ttfts_s: list[float] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    num_requests: int = 0
    wall_s: float = 0.0
    requests: list[tuple[list[int], list[int]]] = field(default_factory=list)
    """(prompt, output) token ids of every request, for ``prefix_stats``."""

    @property
    def hit_rate(self) -> float:
        return self.num_cached_tokens / max(1, self.num_prompt_tokens)


def print_comparison(runs: Sequence[RunStats]) -> None:
    """kv_aware against round_robin, when both ran: hit rate, mean TTFT and throughput ratios."""
    by = {r.policy: r for r in runs}
    if "kv_aware" in by and "round_robin" in by:
        kv, rr = by["kv_aware"], by["round_robin"]
        print(
            f"kv_aware vs round_robin: hit rate x{kv.hit_rate / max(rr.hit_rate, 1e-9):.2f}, "
            f"mean TTFT x{statistics.fmean(kv.ttfts_s) / statistics.fmean(rr.ttfts_s):.2f}, "
            f"throughput x{kv.num_output_tokens / kv.wall_s / (rr.num_output_tokens / rr.wall_s):.2f}"
        )


def add_workload_args(p) -> None:
    """``--num-system-prompts`` etc., defaults from ``WorkloadConfig``."""
    d = WorkloadConfig()
    for name in ("num_system_prompts", "system_prompt_tokens", "num_users", "num_turns", "user_tokens",
                 "output_tokens", "num_clients"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))


def workload_config(args) -> WorkloadConfig:
    return WorkloadConfig(
        args.num_system_prompts, args.system_prompt_tokens, args.num_users, args.num_turns,
        args.user_tokens, args.output_tokens, args.num_clients, args.seed,
    )
