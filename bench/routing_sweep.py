"""How much can routing alone buy with N replicas? The 2-replica target against its ceiling.

Replays many shapes of ``routing_workload``'s shared-prefix chat workload (system prompts,
users per prompt, turns, replies, clients, KV blocks per replica) through
``routing_sim.simulate`` under round_robin and kv_aware, over several seeds, at each fleet size
(the workload scaled by N/2, as routing_sim.py scales it), and prints per fleet size the
kv_aware / round_robin hit-rate ratio: its median over all shapes and seeds, the best shape's
worst seed, and how many shapes reach x2 on every seed.

Why 2 replicas sit at a ceiling of about x2: under round_robin each replica sees every prefix
at 1/N of its rate; under kv_aware each replica sees 1/N of the prefixes at their full rate.
With LRU caches and independently reused prefixes (Che's approximation), a replica of C
blocks facing W equally hot blocks hits about C/W, so round_robin hits C/W and kv_aware
min(1, N*C/W): at most N times more.

    .venv/bin/python bench/routing_sweep.py --cost-model FILE    # FILE from routing_sim.py --save-cost-model
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

from kvtide.router import CostWeights
from routing_sim import CostModel, simulate
from routing_workload import Workload, WorkloadConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cost-model", required=True, help="JSON from routing_sim.py --save-cost-model")
    p.add_argument("--num-replicas", default="2,4", help="comma list of even fleet sizes")
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args()
    with open(args.cost_model) as f:
        cost = CostModel(**json.load(f))
    shapes = [
        dict(num_system_prompts=sp, num_users=sp * upp, num_turns=turns, output_tokens=osl, num_clients=clients,
             # the system prompts' KV is sp * 16 blocks (margin 0 holds half), and the longest
             # request (its whole chat) must fit with room to spare
             num_blocks=max(sp * 8 + margin, -(-(256 + turns * (24 + osl)) // 16) + 4))
        for sp, upp, turns, osl, clients, margin in itertools.product(
            (4, 6, 8), (3, 6), (2, 3, 5), (12, 32), (4, 8), (-4, 8, 24))
    ]  # fmt: skip
    print(f"cost model: {cost.source}; {len(shapes)} workload shapes x {args.seeds} seeds per fleet size")
    for n in (int(x) for x in args.num_replicas.split(",")):
        t = time.perf_counter()
        ratios: list[list[float]] = []
        for shape in shapes:
            shape = dict(shape)
            num_blocks = shape.pop("num_blocks")
            per_seed = []
            for seed in range(args.seeds):
                workload = Workload(WorkloadConfig(**shape, seed=seed).scaled(n // 2))
                rr, kv = (simulate(policy, workload, n, num_blocks, cost, 0.1, 1024, seed, 0.02, CostWeights())
                          for policy in ("round_robin", "kv_aware"))  # fmt: skip
                per_seed.append(kv.hit_rate / max(rr.hit_rate, 1e-9))
            ratios.append(per_seed)
        flat = [r for rs in ratios for r in rs]
        print(
            f"{n:3d} replicas: kv_aware / round_robin hit rate median x{statistics.median(flat):.2f}, "
            f"best shape's worst seed x{max(min(rs) for rs in ratios):.2f}, "
            f"shapes at x2 on every seed {sum(min(rs) >= 2 for rs in ratios)}/{len(ratios)}  "
            f"({time.perf_counter() - t:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
