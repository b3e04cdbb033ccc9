"""The fleet simulator's numbers: GPU-hours and cost, SLO attainment per window and overall,
queueing, dropped requests, misses at season changes; the table and the plot.

Definitions:

- **Windows**: the day in windows of ``window_s`` (300 s). A request belongs to the window
  it arrived in; a token to the window it was emitted in.
- **TTFT p90 of a window**: nearest-rank p90 over its requests, a request that never got a
  first token (refused, timed out, unfinished) counting as infinitely late. ITL p90:
  token-weighted p90 of the inter-token gaps (each token of a 16-row step is one sample).
- **Attainment**: the share of windows with requests whose p90 meets the SLO (TTFT, ITL,
  and both). The request-level line is the share of requests whose TTFT met the SLO.
- **Misses at season changes**: TTFT-missed windows that start within an hour of a season
  boundary of the config's schedule (either side).
- **Queueing**: arrival to admission by a replica (the gateway's queue included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvtide.cluster.autoscaler.config import AutoscaleConfig
from kvtide.cluster.autoscaler.observation import nearest_rank
from kvtide.cluster.autoscaler.window import weighted_percentiles

from fleet_core import DAY_S, SimResult


@dataclass(frozen=True)
class WindowStat:
    start_s: float
    num_requests: int
    ttft_p90_s: float
    itl_p90_s: float | None


@dataclass(frozen=True)
class Summary:
    policy: str
    gpu_hours: float
    usd: float
    ttft_attainment: float
    itl_attainment: float
    both_attainment: float
    request_ttft_share: float
    ttft_p90_s: float
    itl_p90_s: float
    queue_mean_s: float
    queue_p99_s: float
    max_queue: int
    dropped: int
    season_misses: int
    ttft_misses: int
    peak_replicas: int


def window_stats(result: SimResult, window_s: float) -> list[WindowStat]:
    n = math.ceil(DAY_S / window_s)
    ttfts: list[list[float]] = [[] for _ in range(n)]
    for r in result.requests:
        i = int(r.arrival_s // window_s)
        if i < n:
            ttfts[i].append(math.inf if math.isnan(r.first_token_s) else r.first_token_s - r.arrival_s)
    itls: list[list[tuple[float, float]]] = [[] for _ in range(n)]
    for t, gap, tokens in result.itl:
        i = int(t // window_s)
        if i < n:
            itls[i].append((gap, tokens))
    stats = []
    for i in range(n):
        itl = weighted_percentiles(itls[i])
        ttft = nearest_rank(sorted(ttfts[i]), 0.9) if ttfts[i] else 0.0
        stats.append(WindowStat(i * window_s, len(ttfts[i]), ttft, None if itl is None else itl.p90))
    return stats


def season_boundaries(config: AutoscaleConfig) -> list[float]:
    """Seconds after local midnight where a season of the schedule starts or ends."""
    if config.scheduled is None:
        return []
    times = {s.start_minute for s in config.scheduled.seasons} | {s.end_minute for s in config.scheduled.seasons}
    return sorted(60.0 * m for m in times if 0 < m < 24 * 60)


def summarize(result: SimResult, config: AutoscaleConfig, window_s: float, usd_per_hour: float,
              boundaries: list[float]) -> Summary:
    slo = config.slo
    stats = [w for w in window_stats(result, window_s) if w.num_requests]
    ttft_ok = [w.ttft_p90_s <= slo.ttft_p90_s for w in stats]
    itl_ok = [w.itl_p90_s is None or w.itl_p90_s <= slo.itl_p90_s for w in stats]
    near = [any(abs(w.start_s - b) < 3600 for b in boundaries) for w in stats]
    served = [r for r in result.requests if not math.isnan(r.first_token_s)]
    ttfts = sorted(r.first_token_s - r.arrival_s for r in served)
    waits = sorted(r.admitted_s - r.arrival_s for r in served)
    itl = weighted_percentiles([(gap, n) for _, gap, n in result.itl])
    gpu_hours = result.gpu_hours()
    dropped = result.refused + result.timed_out + result.unfinished
    return Summary(
        policy=result.policy, gpu_hours=gpu_hours, usd=gpu_hours * usd_per_hour,
        ttft_attainment=sum(ttft_ok) / len(stats), itl_attainment=sum(itl_ok) / len(stats),
        both_attainment=sum(a and b for a, b in zip(ttft_ok, itl_ok, strict=True)) / len(stats),
        request_ttft_share=sum(1 for t in ttfts if t <= slo.ttft_p90_s) / len(result.requests),
        ttft_p90_s=nearest_rank(ttfts, 0.9), itl_p90_s=itl.p90 if itl else 0.0,
        queue_mean_s=sum(waits) / len(waits), queue_p99_s=nearest_rank(waits, 0.99),
        max_queue=max(q for *_, q in result.timeline), dropped=dropped,
        season_misses=sum(1 for ok, n in zip(ttft_ok, near, strict=True) if n and not ok),
        ttft_misses=sum(1 for ok in ttft_ok if not ok),
        peak_replicas=max(sum(s.values()) for _, s, *_ in result.timeline),
    )


def table(summaries: list[Summary], window_s: float, usd_per_hour: float) -> str:
    head = ("| policy | GPU-hours | cost | TTFT-p90 SLO attained | ITL-p90 SLO attained | both | requests within "
            "TTFT SLO | TTFT p90 | ITL p90 | queue mean / p99 | max queue | dropped | TTFT misses (near season "
            "changes) | peak replicas |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in summaries:
        lines.append(
            f"| {s.policy} | {s.gpu_hours:.1f} | ${s.usd:.2f} | {s.ttft_attainment:.2%} | {s.itl_attainment:.2%} | "
            f"{s.both_attainment:.2%} | {s.request_ttft_share:.2%} | {s.ttft_p90_s:.2f} s | {s.itl_p90_s * 1e3:.0f} ms | "
            f"{s.queue_mean_s:.2f} / {s.queue_p99_s:.1f} s | {s.max_queue} | {s.dropped} | {s.ttft_misses} "
            f"({s.season_misses}) | {s.peak_replicas} |"
        )
    lines.append(f"\nwindows of {window_s:g} s; cost at ${usd_per_hour:g} per GPU-hour")
    return "\n".join(lines)


def write_windows(results: list[SimResult], path: str, window_s: float) -> None:
    """One CSV row per policy and window: its requests and its TTFT and ITL p90."""
    import csv

    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["policy", "window_start_s", "num_requests", "ttft_p90_s", "itl_p90_s"])
        for result in results:
            for w in window_stats(result, window_s):
                out.writerow([result.policy, f"{w.start_s:g}", w.num_requests, f"{w.ttft_p90_s:.3f}",
                              "" if w.itl_p90_s is None else f"{w.itl_p90_s:.4f}"])


def plot(results: list[SimResult], path: str, config: AutoscaleConfig, window_s: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(11, 2.6 * len(results)), sharex=True, sharey=True,
                             squeeze=False)
    for ax, result in zip(axes[:, 0], results, strict=True):
        hours = [t / 3600 for t, *_ in result.timeline]
        profiles = sorted({p for _, s, *_ in result.timeline for p in s})
        stacked = [[s.get(p, 0) for _, s, *_ in result.timeline] for p in profiles]
        ax.stackplot(hours, *stacked, labels=profiles, step="post", alpha=0.6)
        ax.set_ylabel("replicas")
        load = ax.twinx()
        load.plot(hours, [rate for *_, rate, _ in result.timeline], color="black", linewidth=0.5, label="req/s")
        load.set_ylabel("arrivals / s")
        misses = [w.start_s / 3600 for w in window_stats(result, window_s)
                  if w.num_requests and w.ttft_p90_s > config.slo.ttft_p90_s]
        ax.plot(misses, [0.3] * len(misses), "rv", markersize=4, label="TTFT-p90 miss")
        ax.set_title(f"{result.policy}: {result.gpu_hours():.1f} GPU-hours", fontsize=9, loc="left")
        ax.legend(loc="upper left", fontsize=7)
    axes[-1, 0].set_xlabel(f"hour of the day ({config.timezone})")
    axes[-1, 0].set_xlim(0, 24)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
