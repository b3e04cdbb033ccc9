"""The five standard plots of a bench run, as PNG files (matplotlib's object API on the Agg
canvas: no pyplot, no global state). Warm-up records and failed requests are left out.

A *series* is one (target, load point); with one target it is named by the load point alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kvtide.cluster.bench.records import RequestRecord
from kvtide.cluster.bench.stats import PointSummary, group, ttft_fit

PLOTS = {
    "isl_osl_hist": "ISL x OSL histogram",
    "ttft_vs_isl": "TTFT against ISL",
    "itl_vs_position": "Inter-token latency against output position",
    "e2e_by_pattern": "End-to-end latency by workload pattern",
    "throughput_vs_latency": "Throughput against latency",
}
"""File stem -> title, in report order."""

_DPI = 110


def _figure(width: float = 8.0, height: float = 5.0, ncols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    return fig, fig.subplots(1, ncols)


def _series(records: Sequence[RequestRecord]) -> dict[str, list[RequestRecord]]:
    groups = group([r for r in records if not r.warmup and r.ok])
    multi = len({t for t, _ in groups}) > 1
    return {(f"{t}, {p}" if multi else p): rs for (t, p), rs in groups.items()}


def _legend(ax, below: bool = False, **kwargs) -> None:
    """A legend if anything is labelled, else a note that nothing succeeded (so the plot still
    reads). ``below``: under the axes, outside them, so it never hides a point."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        ax.text(0.5, 0.5, "no successful requests to show", transform=ax.transAxes, ha="center", va="center")
    elif below:
        two = len(handles) > 4 and max(map(len, labels)) <= 60
        ax.figure.legend(handles, labels, loc="outside lower center", fontsize=8, ncols=2 if two else 1, **kwargs)
    else:
        ax.legend(fontsize=8, **kwargs)


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def plot_isl_osl(records: Sequence[RequestRecord], path: Path) -> None:
    """The first target's measured requests over all its load points (each point sends the
    same lengths, so a sweep of k points counts each length k times)."""
    ok = [r for r in records if not r.warmup and r.ok]
    target = ok[0].target if ok else ""
    ok = [r for r in ok if r.target == target]
    num_points = len({r.point for r in ok})
    fig, ax = _figure(8.0, 5.5)
    isl, osl = np.array([r.isl for r in ok]), np.array([r.osl for r in ok])
    if len(ok):
        from matplotlib.ticker import MaxNLocator

        counts, _, _ = np.histogram2d(isl, osl, bins=[_bins(isl), _bins(osl)])
        _, _, _, image = ax.hist2d(isl, osl, bins=[_bins(isl), _bins(osl)], cmin=1, cmap="viridis",
                                   vmin=1, vmax=max(2, counts.max()))  # fmt: skip
        fig.colorbar(image, ax=ax, label="requests in the cell", ticks=MaxNLocator(integer=True))
    else:
        _legend(ax)
    ax.set_xlabel("input length, ISL (tokens)")
    ax.set_ylabel("output length received, OSL (tokens)")
    ax.set_title(f"Request lengths: input vs output tokens\n{len(ok)} successful requests to {target}, "
                 f"{num_points} load point(s) sending the same lengths")  # fmt: skip
    ax.grid(alpha=0.3)
    fig.savefig(path)


def _bins(values: np.ndarray, most: int = 40) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1:
        return np.array([lo - 0.5, hi + 0.5])
    return np.linspace(lo, hi + 1, min(most, int(hi - lo) + 2))


def plot_ttft_vs_isl(records: Sequence[RequestRecord], path: Path) -> None:
    fig, ax = _figure(10.0, 6.0)
    series = _series(records)
    for color, (name, rs) in zip(_colors(len(series)), series.items(), strict=True):
        pts = [(r.isl, r.ttft_s * 1000) for r in rs if r.ttft_s is not None]
        if not pts:
            continue
        x, y = np.array(pts).T
        fit = ttft_fit(rs)
        label = f"{name}: no fit (one input length)"
        if fit is not None:
            label = f"{name}: {fit.ms_per_1k_tokens:.0f} ms per 1k tokens (+{fit.intercept_ms:.0f} ms, R² {fit.r2:.2f})"
        ax.scatter(x, y, s=12, alpha=0.6, color=color, label=label)
        if fit is not None:
            xs = np.linspace(x.min(), x.max(), 50)
            ax.plot(xs, fit.intercept_ms + fit.ms_per_1k_tokens * xs / 1000, color=color, lw=2)
    ax.set_xlabel("input length, ISL (tokens)")
    ax.set_ylabel("time to first token, TTFT (ms)")
    ax.set_title("Time to first token against input length\n(dots: requests; lines: least-squares fits, whose "
                 "slope is the prefill cost under that load)")  # fmt: skip
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    _legend(ax, below=True)
    fig.savefig(path)


def plot_itl_vs_position(records: Sequence[RequestRecord], path: Path, min_requests: int = 3) -> None:
    """Gap i (x = i + 2) is between output tokens i + 1 and i + 2; positions reached by fewer
    than ``min_requests`` requests are not drawn (a band of one request says nothing)."""
    fig, ax = _figure(10.0, 6.0)
    series = _series(records)
    for color, (name, rs) in zip(_colors(len(series)), series.items(), strict=True):
        longest = max((len(r.itl_s) for r in rs), default=0)
        xs, p10, p50, p90 = [], [], [], []
        for i in range(longest):
            gaps = [r.itl_s[i] * 1000 for r in rs if len(r.itl_s) > i]
            if len(gaps) < min_requests:
                break
            xs.append(i + 2)
            lo, mid, hi = np.percentile(gaps, (10, 50, 90))
            p10.append(lo), p50.append(mid), p90.append(hi)
        if xs:
            ax.plot(xs, p50, color=color, lw=1.5, label=name)
            ax.fill_between(xs, p10, p90, color=color, alpha=0.2)
    ax.set_xlabel("output token position (the gap before this token)")
    ax.set_ylabel("inter-token latency (ms)")
    ax.set_title("Inter-token latency against output position\n(line: median, band: 10th to 90th percentile, over "
                 f"the requests that reached the position; at least {min_requests})")  # fmt: skip
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    _legend(ax, below=True)
    fig.savefig(path)


def plot_e2e_by_pattern(records: Sequence[RequestRecord], path: Path) -> None:
    series = _series(records)
    patterns = list(dict.fromkeys(r.pattern for rs in series.values() for r in rs))
    fig, ax = _figure(min(14.0, max(7.0, 1.2 * len(patterns) * max(1, len(series)) ** 0.5 + 3)), 5.0)
    width = 0.8 / max(1, len(series))
    handles = []
    for k, (color, (name, rs)) in enumerate(zip(_colors(len(series)), series.items(), strict=True)):
        data = [[r.e2e_s for r in rs if r.pattern == p] for p in patterns]
        positions = [i - 0.4 + width * (k + 0.5) for i in range(len(patterns))]
        keep = [(d, x) for d, x in zip(data, positions, strict=True) if d]
        if not keep:
            continue
        boxes = ax.boxplot([d for d, _ in keep], positions=[x for _, x in keep], widths=width * 0.85,
                           patch_artist=True, showfliers=True, manage_ticks=False)  # fmt: skip
        for box in boxes["boxes"]:
            box.set(facecolor=color, alpha=0.55)
        for median in boxes["medians"]:
            median.set(color="black")
        handles.append((boxes["boxes"][0], name))
    counts = [sum(r.pattern == p for rs in series.values() for r in rs) for p in patterns]
    ax.set_xticks(range(len(patterns)), [f"{p}\n(n={n})" for p, n in zip(patterns, counts, strict=True)])
    ax.set_xlabel("workload pattern (n: requests over all series)")
    ax.set_ylabel("end-to-end latency (s)")
    ax.set_title("End-to-end latency by workload pattern\n(box: 25th-75th percentile, line: median, whiskers: "
                 "1.5 IQR, dots: outliers)")  # fmt: skip
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    if handles:
        ax.legend([h for h, _ in handles], [n for _, n in handles], fontsize=8, title="series", loc="upper left")
    else:
        _legend(ax)
    fig.savefig(path)


def plot_throughput_vs_latency(summaries: Sequence[PointSummary], path: Path) -> None:
    fig, (left, right) = _figure(11.0, 4.8, ncols=2)
    targets = list(dict.fromkeys(s.target for s in summaries))
    for color, target in zip(_colors(len(targets)), targets, strict=True):
        pts = sorted((s for s in summaries if s.target == target), key=lambda s: s.output_tokens_per_s)
        x = [s.output_tokens_per_s for s in pts]
        for ax, key in ((left, "ttft_ms"), (right, "itl_ms")):
            for pct, style, marker in (("p50", "-", "o"), ("p90", "--", "s")):
                y = [getattr(getattr(s, key), pct) if getattr(s, key) else np.nan for s in pts]
                ax.plot(x, y, style, marker=marker, color=color, label=f"{target} {pct}")
            for s, xi in zip(pts, x, strict=True):
                d = getattr(s, key)
                if d is not None:
                    ax.annotate(s.point.replace("concurrency", "c").replace("rate", "r"), (xi, d.p90),
                                textcoords="offset points", xytext=(4, 4), fontsize=7)  # fmt: skip
    for ax, what in ((left, "time to first token, TTFT (ms)"), (right, "inter-token latency, ITL (ms)")):
        ax.set_xlabel("output throughput (tokens/s, all requests together)")
        ax.set_ylabel(what)
        ax.set_ylim(bottom=0)
        ax.set_xlim(0, 1.12 * (max((s.output_tokens_per_s for s in summaries), default=0.0) or 1.0))  # label room
        ax.grid(alpha=0.3)
        _legend(ax, title="solid: median, dashed: p90")
    left.set_title("TTFT against throughput")
    right.set_title("ITL against throughput")
    fig.suptitle("Throughput against latency across the sweep (one marker per load point: c = concurrency, "
                 "r = request rate /s)")  # fmt: skip
    fig.savefig(path)


def write_plots(records: Sequence[RequestRecord], summaries: Sequence[PointSummary], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / f"{name}.png" for name in PLOTS}
    plot_isl_osl(records, paths["isl_osl_hist"])
    plot_ttft_vs_isl(records, paths["ttft_vs_isl"])
    plot_itl_vs_position(records, paths["itl_vs_position"])
    plot_e2e_by_pattern(records, paths["e2e_by_pattern"])
    plot_throughput_vs_latency(summaries, paths["throughput_vs_latency"])
    return paths
