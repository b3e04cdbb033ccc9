"""Prometheus metrics of a frontend, with the field's names (vLLM's, under ``kvtide:``).

Request latencies and token counts are observed here as requests stream; engine gauges and
counters (KV usage, running / waiting, preemptions, prefix-cache hits) come from each
replica's latest ``ReplicaLoad`` as the router has it, at scrape time, labelled by replica. Every metric lives in
the frontend's own ``CollectorRegistry``: two frontends in one process never collide.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


_REPLICA_METRICS = (
    # (ReplicaLoad field, metric family, name, help)
    ("kv_cache_usage", GaugeMetricFamily, "kvtide:kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent."),
    ("num_running", GaugeMetricFamily, "kvtide:num_requests_running", "Requests in the engine's batch."),
    ("num_waiting", GaugeMetricFamily, "kvtide:num_requests_waiting", "Requests in the engine's queue."),
    ("num_pending_prefill_tokens", GaugeMetricFamily, "kvtide:num_prefill_tokens_pending",
     "Prompt tokens the replica's requests must still prefill (the router's queue signal)."),
    ("num_preemptions", CounterMetricFamily, "kvtide:num_preemptions", "Requests preempted for KV blocks."),
    ("prefix_cache_hit_tokens", CounterMetricFamily, "kvtide:prefix_cache_hits", "Prompt tokens found cached."),
    ("prefix_cache_queried_tokens", CounterMetricFamily, "kvtide:prefix_cache_queries", "Prompt tokens looked up."),
    ("num_total_blocks", GaugeMetricFamily, "kvtide:kv_cache_blocks_total", "KV blocks of the replica's cache."),
    ("num_free_blocks", GaugeMetricFamily, "kvtide:kv_cache_blocks_free",
     "KV blocks a request could take now (cached-but-unused ones included)."),
    ("num_restarts", CounterMetricFamily, "kvtide:replica_restarts", "Times the replica restarted its shards."),
)  # fmt: skip
_REGISTRATION_METRICS = (
    # (ReplicaRegistration field, name, help)
    ("weight_bytes", "kvtide:replica_weight_bytes", "Weights over all the replica's shards."),
    ("kv_cache_bytes", "kvtide:replica_kv_cache_bytes", "KV cache over all the replica's shards."),
)


class _ReplicaCollector(Collector):
    """Engine metrics from each replica's latest load (``ReplicaSet.routing_status``), at scrape
    time."""

    def __init__(self, replicas, health) -> None:
        self._replicas, self._health = replicas, health

    def collect(self):
        status = self._replicas.routing_status()
        replicas = status.replicas if status is not None else ()
        for attr, family_type, name, help_text in _REPLICA_METRICS:
            family = family_type(name, help_text, labels=["replica"])
            for r in replicas:
                family.add_metric([r.replica_id], float(getattr(r.load, attr)))
            yield family
        exact = GaugeMetricFamily(
            "kvtide:router_exact_mode",
            "1 while the router follows the replica's KV events (exact), 0 while it approximates "
            "from its own routing decisions.",
            labels=["replica"],
        )
        for r in replicas:
            exact.add_metric([r.replica_id], float(r.exact))
        yield exact
        yield from self._registrations([r.replica_id for r in replicas])

    def _registrations(self, replica_ids: list[str]):
        state = self._replicas.state
        regs = [state.router.registration(rid) for rid in replica_ids] if state is not None else []
        for attr, name, help_text in _REGISTRATION_METRICS:
            family = GaugeMetricFamily(name, help_text, labels=["replica"])
            for reg in regs:
                family.add_metric([reg.replica_id], float(getattr(reg, attr)))
            yield family
        info = GaugeMetricFamily("kvtide:replica_info", "1 per replica: where its shards run.",
                                 labels=["replica", "device", "dtype", "tp", "pp"])  # fmt: skip
        for reg in regs:
            info.add_metric([reg.replica_id, reg.device, reg.dtype, str(reg.tp), str(reg.pp)], 1.0)
        yield info
        up = GaugeMetricFamily("kvtide:replica_up", "1 while the replica is routed to; 0 while it is lost, "
                               "being made anew, or unfit to serve. state: the supervisor's last verdict "
                               "(serving, restarting, waiting_for_resources, dead, broken).",
                               labels=["replica", "state"])  # fmt: skip
        health = self._health()
        for rid in replica_ids:
            up.add_metric([rid, health[rid].state.value if rid in health else "serving"], 1.0)
        for rid in sorted(state.lost | state.unhealthy | set(health)) if state is not None else ():
            if rid not in replica_ids:
                up.add_metric([rid, health[rid].state.value if rid in health else "lost"], 0.0)
        yield up


class RequestTimer:
    """TTFT, inter-token latency and end-to-end latency of one request."""

    def __init__(self, metrics: FrontendMetrics, arrival_s: float) -> None:
        self._m = metrics
        self._arrival_s = arrival_s
        self._last_s: float | None = None

    def tokens(self, num_tokens: int) -> None:
        if not num_tokens:
            return
        now = time.perf_counter()
        if self._last_s is None:
            self._m.ttft.observe(now - self._arrival_s)
        else:
            self._m.itl.observe(now - self._last_s)
        self._last_s = now

    def finished(self, num_prompt_tokens: int, num_output_tokens: int) -> None:
        self._m.e2e.observe(time.perf_counter() - self._arrival_s)
        self._m.prompt_tokens.observe(num_prompt_tokens)
        self._m.generation_tokens.observe(num_output_tokens)


class FrontendMetrics:
    def __init__(self, replicas) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "kvtide:time_to_first_token_seconds", "Time to first token.", buckets=_LATENCY_BUCKETS_S, registry=r
        )
        self.itl = Histogram(
            "kvtide:inter_token_latency_seconds", "Time between tokens of a stream.",
            buckets=_LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "kvtide:e2e_request_latency_seconds", "Arrival to last token.", buckets=_LATENCY_BUCKETS_S, registry=r
        )
        self.prompt_tokens = Histogram(
            "kvtide:request_prompt_tokens", "Prompt tokens per request.", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.generation_tokens = Histogram(
            "kvtide:request_generation_tokens", "Generated tokens per request.", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.requests = Counter(
            "kvtide:request_success", "Finished requests by finish reason.", ["finished_reason"], registry=r
        )
        self.errors = Counter(
            "kvtide:request_errors", "Requests answered with an error (refused, or failed mid-stream), by code.",
            ["code"], registry=r,
        )  # fmt: skip
        self.migrations = Counter(
            "kvtide:request_migrations", "Requests moved to another replica when theirs died or failed its step.",
            registry=r,
        )  # fmt: skip
        self.queue_time = Histogram(
            "kvtide:request_queue_time_seconds", "Arrival (tokenization included) to admission at the frontend.",
            buckets=_LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.replica_health = dict
        """() -> {replica id: ReplicaHealth}: the supervisor's view, where one runs."""
        r.register(_ReplicaCollector(replicas, lambda: self.replica_health()))

    def request_timer(self, arrival_s: float) -> RequestTimer:
        return RequestTimer(self, arrival_s)

    def finished(self, finish_reason: str) -> None:
        self.requests.labels(finish_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
