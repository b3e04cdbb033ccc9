"""Block hash -> the replicas that hold it: exact entries from KV events, guesses with expiry.

Exact entries mirror each replica's prefix cache as its ``BlocksStored`` / ``BlocksRemoved`` /
``AllBlocksCleared`` events describe it. Approximate entries are the router's own record
of where it sent a prompt ("that replica has probably cached these blocks by now"); they
expire after a TTL and are capped at the replica's number of KV blocks, oldest dropped
first, because the replica's LRU cache cannot hold more either.

NOTE: every operation on a replica's exact entries is idempotent (storing a held hash or
removing an absent one changes nothing). A resync relies on it: the snapshot may already
contain the effect of events that are replayed after it.

Not thread-safe; the router owns it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Iterable, Sequence

from kvtide.proto.block_hash import BlockHash


class PrefixIndex:
    def __init__(self) -> None:
        self._exact: dict[BlockHash, set[str]] = {}
        self._approx: dict[BlockHash, dict[str, float]] = {}
        """hash -> replica -> expiry time."""
        self._replica_exact: dict[str, set[BlockHash]] = {}
        self._replica_approx: dict[str, OrderedDict[BlockHash, float]] = {}
        """Per replica, in expiry order (every entry has the same TTL)."""
        self._approx_capacity: dict[str, int] = {}

    # ---- replicas ----------------------------------------------------------------------

    def add_replica(self, replica_id: str, num_blocks: int) -> None:
        """Start tracking a replica with an empty cache; ``num_blocks`` caps its guesses."""
        if replica_id in self._replica_exact:
            raise ValueError(f"replica {replica_id!r} is already in the prefix index")
        self._replica_exact[replica_id] = set()
        self._replica_approx[replica_id] = OrderedDict()
        self._approx_capacity[replica_id] = num_blocks

    def remove_replica(self, replica_id: str) -> None:
        self.clear(replica_id)
        self.clear_approximate(replica_id)
        del self._replica_exact[replica_id]
        del self._replica_approx[replica_id]
        del self._approx_capacity[replica_id]

    def num_exact(self, replica_id: str) -> int:
        return len(self._replica_exact[replica_id])

    def num_approximate(self, replica_id: str, now: float) -> int:
        return sum(1 for expiry in self._replica_approx[replica_id].values() if expiry > now)

    # ---- exact entries -----------------------------------------------------------------

    def store(self, replica_id: str, hashes: Iterable[BlockHash]) -> None:
        held = self._replica_exact[replica_id]
        for h in hashes:
            held.add(h)
            self._exact.setdefault(h, set()).add(replica_id)

    def remove(self, replica_id: str, hashes: Iterable[BlockHash]) -> None:
        held = self._replica_exact[replica_id]
        for h in hashes:
            held.discard(h)
            holders = self._exact.get(h)
            if holders is not None:
                holders.discard(replica_id)
                if not holders:
                    del self._exact[h]

    def clear(self, replica_id: str) -> None:
        self.remove(replica_id, list(self._replica_exact[replica_id]))

    def replace(self, replica_id: str, hashes: Iterable[BlockHash]) -> None:
        """Make the replica's exact entries exactly ``hashes`` (a resync)."""
        self.clear(replica_id)
        self.store(replica_id, hashes)

    # ---- approximate entries -----------------------------------------------------------

    def record(self, replica_id: str, hashes: Sequence[BlockHash], expires_at: float, now: float) -> None:
        """Guess that the replica holds ``hashes`` until ``expires_at``."""
        mine = self._replica_approx[replica_id]
        for h in hashes:
            mine[h] = expires_at
            mine.move_to_end(h)
            self._approx.setdefault(h, {})[replica_id] = expires_at
        capacity = self._approx_capacity[replica_id]
        while mine:
            h, expiry = next(iter(mine.items()))
            if expiry > now and len(mine) <= capacity:
                break
            self._drop_approx(replica_id, h)

    def clear_approximate(self, replica_id: str) -> None:
        for h in list(self._replica_approx[replica_id]):
            self._drop_approx(replica_id, h)

    def _drop_approx(self, replica_id: str, h: BlockHash) -> None:
        del self._replica_approx[replica_id][h]
        holders = self._approx[h]
        del holders[replica_id]
        if not holders:
            del self._approx[h]

    # ---- matching ----------------------------------------------------------------------

    def match(
        self,
        hashes: Sequence[BlockHash],
        replicas: Collection[str],
        approximate: Collection[str],
        now: float,
    ) -> dict[str, int]:
        """Per replica, how many leading ``hashes`` it holds.

        A replica in ``approximate`` also counts its unexpired guesses; the others count
        exact entries only. Stops as soon as no replica matches the next block, so a miss
        on the first block costs one lookup.
        """
        counts = dict.fromkeys(replicas, 0)
        active = set(counts)
        for i, h in enumerate(hashes):
            exact = self._exact.get(h, ())
            guessed = self._approx.get(h, {})
            active = {
                r for r in active
                if r in exact or (r in approximate and guessed.get(r, now) > now)
            }
            if not active:
                break
            for r in active:
                counts[r] = i + 1
        return counts
