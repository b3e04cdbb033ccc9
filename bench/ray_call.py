"""What one engine-to-shard step call costs in Ray, with the step's delta put in the object
store first (``ray.put``) or passed by value (inlined in the call).

Run:  .venv/bin/python bench/ray_call.py [--calls 200] [--reps 9]

A local Ray instance on 127.0.0.1 and one actor whose ``execute`` returns 119 bytes (a batch-1
step's sampled token ids); the delta is ~1 KB of lists, the size of a decode step's. The two
ways alternate rep by rep; each rep is the mean of ``--calls`` round trips.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before ray: bind loopback

import ray  # noqa: E402


@ray.remote(num_cpus=0)
class Shard:
    def execute(self, delta) -> bytes:
        return b"x" * 119


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--reps", type=int, default=9)
    args = p.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        shard = Shard.remote()
        delta = {"input_ids": list(range(64)), "block_tables": [list(range(20)) for _ in range(8)]}
        ways = {
            "ray.put": lambda: ray.get(shard.execute.remote(ray.put(delta)), timeout=30),
            "by value": lambda: ray.get(shard.execute.remote(delta), timeout=30),
        }
        for call in ways.values():  # warm both paths
            for _ in range(50):
                call()
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.reps):
            for name, call in ways.items():
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    call()
                times[name].append((time.perf_counter() - t0) / args.calls)
        print(f"load average {os.getloadavg()[0]:.2f}; ms per round trip, median of {args.reps} reps x {args.calls} calls")
        for name, t in times.items():
            print(f"  {name:9s} {1e3 * statistics.median(t):.2f}  (reps: {', '.join(f'{1e3 * x:.2f}' for x in t)})")
        ratios = [a / b for a, b in zip(times["ray.put"], times["by value"], strict=True)]
        print(f"  ray.put / by value: median {statistics.median(ratios):.2f}x over interleaved pairs")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
