"""Fleet simulator: replay a day of traffic against simulated replicas under autoscaling policies.

    .venv/bin/python bench/fleet_sim.py                   # the table of bench/README.md, ~10-20 min on 2 cores
    .venv/bin/python bench/fleet_sim.py --policies "reactive" --trace my_day.jsonl

Inputs: a day trace (bench/day_trace.py builds the shipped one; any trace
``kvtide.cluster.autoscaler.traces.read_arrivals`` reads works, times from local midnight),
an autoscale config (``--config``, the same YAML ``kvtide serve --autoscale`` takes), and the
engine cost model measured on this machine (bench/fleet_cost_model.py). Replicas follow the
cost model step by step (fleet_replica.py) with each profile's KV capacity from
``kvtide.workers.sizing``; the loop, routing and cold starts are in fleet_core.py; the
numbers and the plot in fleet_report.py.

Policies compared by default:

- ``static``: a fixed fleet of ``--static-profile`` all day, the smallest that attains the
  TTFT SLO in ``--attainment`` (99%) of the windows (found by bisection: "provisioning for
  the peak"), or ``--static-replicas N``;
- ``reactive`` alone on ``--static-profile``, bounded by the widest season;
- the config's own policy (``scheduled + reactive + predictive`` in the example).

Policies that forecast learn from ``--history-days`` earlier days first: days built by
day_trace.py with the next seeds (same seasons, other draws and bursts), fed to the policy as
the observations the live loop would have recorded (rate and mean lengths per interval).
The capacity of each profile (for ``predictive``) is the config's: ``kvtide profile`` computed
it from the same cost model on its season's requests (``--capacity-from-cost-model``
recomputes it on the whole trace's mix).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from kvtide.cluster.autoscaler.config import AutoscaleConfig, parse_config
from kvtide.cluster.autoscaler.cost_model import (
    EngineCostModel,
    mix_contexts,
    replica_capacity,
)
from kvtide.cluster.autoscaler.kv_capacity import kv_tokens_capacity
from kvtide.cluster.autoscaler.observation import Observation, Percentiles
from kvtide.cluster.autoscaler.reactive import ReactiveConfig
from kvtide.cluster.autoscaler.registry import make_policy
from kvtide.cluster.autoscaler.static import StaticConfig
from kvtide.cluster.autoscaler.traces import read_arrivals

import day_trace
from fleet_core import DAY_S, FleetSim, SimSettings
from fleet_report import plot, season_boundaries, summarize, table, write_windows

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def load_with_overrides(path: Path, overrides: list[str]) -> AutoscaleConfig:
    import yaml

    data = yaml.safe_load(path.read_text())
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected PATH=VALUE")
        node = data
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    return parse_config(data)


def with_capacities(config: AutoscaleConfig, cost: EngineCostModel, arrivals: list[tuple[float, int, int]]):
    """Each profile's capacity from the cost model on the whole trace's mix (token-weighted contexts)."""
    contexts = mix_contexts([a[1] for a in arrivals], [a[2] for a in arrivals])
    profiles = {
        name: dataclasses.replace(p, capacity=replica_capacity(
            cost, chunk_tokens=p.chunk_tokens, max_decode_rows=p.max_num_seqs, contexts=contexts,
            itl_slo_s=config.slo.itl_p90_s))
        for name, p in config.profiles.items()
    }
    return dataclasses.replace(config, profiles=profiles)


def warm_up(policy, config: AutoscaleConfig, days: list[list[tuple[float, int, int]]], start: datetime):
    """The policy's state after the observations of ``days`` (oldest first, ending the day before ``start``)."""
    state = policy.initial_state()
    for back, rows in zip(range(len(days), 0, -1), days, strict=True):
        day_start = start - timedelta(days=back)
        j = 0
        window: list[tuple[float, int, int]] = []
        t = config.control_interval_s
        while t <= DAY_S:
            while j < len(rows) and rows[j][0] <= t:
                window.append(rows[j])
                j += 1
            window = [r for r in window if r[0] > t - config.window_s]
            isl = Percentiles.of([r[1] for r in window])
            osl = Percentiles.of([r[2] for r in window])
            obs = Observation(time=day_start + timedelta(seconds=t), window_s=config.window_s,
                              request_rate=len(window) / config.window_s, queue_depth=0, kv_usage=0.0, ttft_s=None,
                              itl_s=None, isl=isl, osl=osl, replicas={}, cold_start_s=config.cold_start_s)
            state = policy.decide(obs, state).state
            t += config.control_interval_s
    return state


def run_policy(spec: str, config: AutoscaleConfig, settings: SimSettings, arrivals, history, name: str):
    config = dataclasses.replace(config, policy=spec)
    policy = make_policy(spec, config)
    parts = set(config.policy_names)
    state = warm_up(policy, config, history, settings.start) if parts & {"predictive", "scale_to_zero"} else None
    t = time.perf_counter()
    result = FleetSim(config, policy, settings, state).run(arrivals, name)
    return result, config, time.perf_counter() - t


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", type=Path, default=HERE / "data" / "day_trace.csv.gz")
    p.add_argument("--seed", type=int, default=0, help="the shipped day's seed (earlier days use the next seeds)")
    p.add_argument("--config", type=Path, default=ROOT / "cluster" / "autoscaler" / "example_autoscale.yaml")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                   help="override a config value (YAML), e.g. --set predictive.target_utilization=0.8")
    p.add_argument("--cost-model", type=Path, default=HERE / "data" / "fleet_cost_model.json")
    p.add_argument("--model", default="smollm2-135m", help="for the KV capacity of each profile")
    p.add_argument("--capacity-from-cost-model", action="store_true", help="recompute every profile's capacity "
                   "from --cost-model on the whole trace's mix instead of the config's (its season's mix)")
    p.add_argument("--date", default=day_trace.DAY, help="local date of the trace's day (YYYY-MM-DD)")
    p.add_argument("--policies", default="static,reactive,config", help="comma list: static, reactive, config "
                   "(the config's policy) or any policy spec such as 'scheduled + reactive'")
    p.add_argument("--static-profile", default="general", help="profile of the static and reactive-alone fleets")
    p.add_argument("--static-replicas", default="auto", help="N, or auto: the smallest meeting --attainment")
    p.add_argument("--attainment", type=float, default=0.99)
    p.add_argument("--static-max", type=int, default=256, help="give up the static search past this many replicas")
    p.add_argument("--history-days", type=int, default=3)
    p.add_argument("--window-s", type=float, default=300.0, help="SLO windows")
    p.add_argument("--usd-per-hour", type=float, default=1.0, help="price of a GPU-hour (a device-hour)")
    p.add_argument("--windows-csv", default="", help="also write every policy's per-window TTFT/ITL p90 here")
    p.add_argument("--plot", default=str(HERE / "data" / "fleet_sim_day.png"), help="PNG to write ('' for none)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    from kvtide.workers import read_hf_config, resolve_model

    config = load_with_overrides(args.config, args.set)
    cost = EngineCostModel.from_dict(json.loads(args.cost_model.read_text()))
    arrivals = [(a.arrival_s, a.isl, a.osl) for a in read_arrivals(args.trace)]
    if args.capacity_from_cost_model:
        config = with_capacities(config, cost, arrivals)
    model = read_hf_config(resolve_model(args.model))
    kv = {name: kv_tokens_capacity(model, p) for name, p in config.profiles.items()}
    start = datetime.fromisoformat(args.date).replace(tzinfo=ZoneInfo(config.timezone))
    settings = SimSettings(start=start, cost=cost, kv_tokens=kv)
    services = day_trace.load_services()
    history = [[r[:3] for r in day_trace.build_day(services, args.seed + k)] for k in range(args.history_days, 0, -1)]
    print(f"trace {args.trace}: {len(arrivals)} requests; cost model: {cost.source}")
    for name, p in config.profiles.items():
        print(f"  {p.describe()}; KV {kv[name]} tokens; capacity {p.capacity}")
    boundaries = season_boundaries(config)
    summaries, results = [], []
    general = config.profiles[args.static_profile]
    widest = max((s.max_replicas for s in config.scheduled.seasons), default=64) if config.scheduled else 64
    for item in args.policies.split(","):
        item = item.strip()
        if item == "static":
            result, used = static_run(config, settings, arrivals, args, boundaries)
        elif item == "reactive":
            reactive = dataclasses.replace(config.reactive or ReactiveConfig(), profile=general.name, min_replicas=1,
                                           max_replicas=widest)
            result, used, _ = run_policy("reactive", dataclasses.replace(config, reactive=reactive), settings,
                                         arrivals, history, "reactive")
        else:
            spec = config.policy if item == "config" else item
            result, used, _ = run_policy(spec, config, settings, arrivals, history, spec)
        summaries.append(summarize(result, used, args.window_s, args.usd_per_hour, boundaries))
        results.append(result)
        print(f"{result.policy}: {summaries[-1].gpu_hours:.1f} GPU-hours, TTFT attainment "
              f"{summaries[-1].ttft_attainment:.2%}", flush=True)
    print()
    print(table(summaries, args.window_s, args.usd_per_hour))
    if args.windows_csv:
        write_windows(results, args.windows_csv, args.window_s)
        print(f"windows: {args.windows_csv}")
    if args.plot:
        plot(results, args.plot, config, args.window_s)
        print(f"plot: {args.plot}")


def static_run(config, settings, arrivals, args, boundaries):
    def run(n: int):
        static = StaticConfig(profile=args.static_profile, replicas=n)
        result, used, seconds = run_policy("static", dataclasses.replace(config, static=static), settings, arrivals,
                                           [], f"static x{n}")
        s = summarize(result, used, args.window_s, args.usd_per_hour, boundaries)
        print(f"  static x{n}: TTFT attainment {s.ttft_attainment:.2%} (simulated in {seconds:.0f} s)", flush=True)
        return result, used, s.ttft_attainment

    if args.static_replicas != "auto":
        result, used, _ = run(int(args.static_replicas))
        return result, used
    lo, hi = 0, 1
    found = run(hi)
    while found[2] < args.attainment:
        if hi >= args.static_max:
            result, used, _ = found
            result.policy = f"static x{hi} (misses {args.attainment:.0%} even so)"
            return result, used
        lo, hi = hi, min(args.static_max, hi * 2)
        found = run(hi)
    while hi - lo > 1:  # the smallest n in (lo, hi] that attains
        mid = (lo + hi) // 2
        trial = run(mid)
        if trial[2] >= args.attainment:
            hi, found = mid, trial
        else:
            lo = mid
    result, used, _ = found
    result.policy = f"static x{hi} (smallest attaining {args.attainment:.0%})"
    return result, used


if __name__ == "__main__":
    main()
