"""Build the fleet simulator's day of traffic from the two Azure LLM inference hours.

    .venv/bin/python bench/day_trace.py                       # writes bench/data/day_trace.csv.gz (seed 0)
    .venv/bin/python bench/day_trace.py --seed 3 --out /tmp/day3.csv.gz

How the day is built (everything below is fixed by the seed; ``build_day`` is what the
simulator also calls for the earlier days its forecast learns from):

- **Two services**, each one hour of Azure's 2023-11-16 trace (../shared/traces/README.md;
  Patel et al., Splitwise, ISCA 2024): *code* (long prompts, short answers) and
  *conversation* (shorter prompts, longer answers). Each keeps its own mean request rate of
  that hour (code 8,819 requests in 57.3 min, conversation 19,366 in 58.4 min).
- **Seasons**: each service's rate is its hour's mean rate times a piecewise-linear curve of
  local time (``CODE_SHAPE``, ``CONV_SHAPE``, knots below): code-heavy working hours
  (09:00-17:00, code at 1x, conversation at 0.2x), conversation-heavy evenings (18:00-22:00,
  conversation at 1x, code at 0.1x), a quiet night (both at a few percent), and ramps between.
- **Bursts**: within each hour, minute m's rate is multiplied by the service's own
  minute-to-minute variation: the request count of minute (m + offset) of its trace hour over
  that hour's mean count, with one seeded offset per service and hour. Code bursts are
  violent (minutes at 0x and at 4.2x); conversation varies between 0.6x and 1.5x.
- **Arrivals**: a Poisson count per minute at that rate, uniform within the minute.
- **Lengths**: (ISL, OSL) pairs drawn together, uniformly with replacement, from the
  service's trace, then scaled by ``--length-scale`` (0.25; rounded up, at least 1 token).
  Why scaled: the simulator replays *this* engine, SmolLM2-135M on one CPU core per replica
  (bench/fleet_cost_model.py), where a 2,048-token prompt takes ~15 s to prefill; at a
  quarter of the real lengths the services keep their shapes (ISL/OSL ratio, spread) and a
  p90 code prompt (1,300 tokens) prefills in seconds, not a minute. SmolLM2's 8,192-token
  context holds every scaled request.
- **The day** is Thursday 2023-11-16 (the traces' date) in America/Los_Angeles;
  ``arrival_s`` counts seconds from local midnight.

Output: CSV (gzip) ``arrival_s,isl,osl,service`` (service ``code`` or ``conv``), the format
``kvtide.cluster.autoscaler.traces.read_arrivals`` reads.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvtide.cluster.autoscaler.traces import read_arrivals

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
DAY = "2023-11-16"
TIMEZONE = "America/Los_Angeles"
LENGTH_SCALE = 0.25

# (local hour, multiplier of the service's own mean rate); linear in between.
CODE_SHAPE = ((0, 0.04), (6, 0.04), (7, 0.15), (8, 0.6), (9, 1.0), (12, 1.0), (12.5, 0.75), (13.5, 1.0),
              (17, 0.9), (18, 0.3), (20, 0.1), (24, 0.04))
CONV_SHAPE = ((0, 0.08), (5, 0.03), (7, 0.06), (9, 0.2), (12, 0.2), (16, 0.2), (17, 0.4), (18, 0.8),
              (19, 1.0), (22, 1.0), (23, 0.5), (24, 0.08))


@dataclass(frozen=True)
class Service:
    name: str
    rate: float
    """Mean requests per second of its trace hour."""
    minute_factors: np.ndarray
    """Each full minute's request count over the mean count."""
    isl: np.ndarray
    osl: np.ndarray
    shape: tuple[tuple[float, float], ...]


def load_service(name: str, path: Path, shape: tuple[tuple[float, float], ...]) -> Service:
    arrivals = read_arrivals(path)
    t = np.array([a.arrival_s for a in arrivals])
    full_minutes = int(t[-1] // 60)  # the last, partial minute is left out
    counts = np.bincount((t[t < full_minutes * 60] // 60).astype(int), minlength=full_minutes)
    return Service(
        name=name, rate=len(arrivals) / t[-1], minute_factors=counts / counts.mean(),
        isl=np.array([a.isl for a in arrivals]), osl=np.array([a.osl for a in arrivals]), shape=shape,
    )


def load_services(traces: Path = TRACES) -> list[Service]:
    return [load_service("code", traces / "azure2023_code.csv", CODE_SHAPE),
            load_service("conv", traces / "azure2023_conv.csv", CONV_SHAPE)]


def shape_at(shape: tuple[tuple[float, float], ...], hours: np.ndarray) -> np.ndarray:
    knots, values = zip(*shape, strict=True)
    return np.interp(hours, knots, values)


def minute_rates(service: Service, rng: np.random.Generator) -> np.ndarray:
    """Requests per second of each of the day's 1,440 minutes."""
    minutes = np.arange(24 * 60)
    seasonal = service.rate * shape_at(service.shape, (minutes + 0.5) / 60)
    offsets = rng.integers(0, len(service.minute_factors), size=24)
    bursts = service.minute_factors[(offsets[minutes // 60] + minutes % 60) % len(service.minute_factors)]
    return seasonal * bursts


def build_day(services: list[Service], seed: int, length_scale: float = LENGTH_SCALE) -> list[tuple[float, int, int, str]]:
    """(arrival_s, isl, osl, service) of one day, sorted by arrival."""
    rng = np.random.default_rng(seed)
    rows: list[tuple[float, int, int, str]] = []
    for service in services:
        rates = minute_rates(service, rng)
        counts = rng.poisson(rates * 60)
        n = int(counts.sum())
        starts = np.repeat(np.arange(len(counts)) * 60.0, counts)
        times = starts + rng.uniform(0, 60, size=n)
        pick = rng.integers(0, len(service.isl), size=n)
        isl = np.maximum(1, np.ceil(service.isl[pick] * length_scale)).astype(int)
        osl = np.maximum(1, np.ceil(service.osl[pick] * length_scale)).astype(int)
        rows += zip(np.round(times, 3).tolist(), isl.tolist(), osl.tolist(), [service.name] * n, strict=True)
    rows.sort()
    return rows


def write_day(rows: list[tuple[float, int, int, str]], out: Path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["arrival_s", "isl", "osl", "service"])
    writer.writerows((f"{t:.3f}", i, o, s) for t, i, o, s in rows)
    # mtime=0: the same seed writes the same bytes.
    with open(out, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as gz:
        gz.write(buffer.getvalue().encode())


def summary(rows: list[tuple[float, int, int, str]]) -> str:
    lines = [f"{len(rows)} requests"]
    for name in sorted({r[3] for r in rows}):
        mine = [r for r in rows if r[3] == name]
        isl = np.array([r[1] for r in mine])
        osl = np.array([r[2] for r in mine])
        lines.append(f"  {name}: {len(mine)} requests, ISL mean {isl.mean():.0f} p99 {np.percentile(isl, 99):.0f}, "
                     f"OSL mean {osl.mean():.0f} p99 {np.percentile(osl, 99):.0f}")
    hours = np.bincount([int(r[0] // 3600) for r in rows], minlength=24)
    lines.append("  requests per hour: " + " ".join(str(h) for h in hours))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--length-scale", type=float, default=LENGTH_SCALE)
    p.add_argument("--traces", type=Path, default=TRACES)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data" / "day_trace.csv.gz")
    args = p.parse_args()
    if not (math.isfinite(args.length_scale) and args.length_scale > 0):
        raise SystemExit(f"--length-scale: {args.length_scale} must be > 0")
    rows = build_day(load_services(args.traces), args.seed, args.length_scale)
    write_day(rows, args.out)
    print(summary(rows))
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
