"""deploy/grafana/kvtide.json cannot drift from the code: every panel's PromQL, rendered, names
only series a live ``kvtide serve`` exports after traffic (with the labels it groups and filters
by), every ``kvtide:*`` metric the server exports is on the dashboard, and deploy/prometheus.yml
scrapes the path the server serves. The static checks (titles, units, descriptions, labels,
``$__rate_interval``, the PromQL tokenizer itself) run without a server."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests import dashboard_check as dc
from tests.integration.serve_process import ServeProcess, clean_env

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = json.loads((REPO / "deploy" / "grafana" / "kvtide.json").read_text())
PROMETHEUS = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
START_TIMEOUT_S = 300.0
# The dashboard's own variables, at values a running server has.
VARIABLES = {"datasource": "prometheus", "model": "smollm2-135m", "replica": "replica-0"}
# Label matchers select by the dashboard's variables only: never per request.
SELECTOR_LABELS = {"model", "replica"}


def _frontend_job() -> dict:
    (job,) = [j for j in PROMETHEUS["scrape_configs"] if j.get("static_configs")]
    return job


def _target_labels() -> frozenset[str]:
    """Labels Prometheus itself puts on the frontend's series."""
    static = _frontend_job()["static_configs"]
    return frozenset({"job", "instance", *(k for sc in static for k in sc.get("labels", {}))})


# -- without a server ------------------------------------------------------------------------------


def test_every_panel_says_what_it_shows():
    assert DASHBOARD["schemaVersion"] >= 39 and DASHBOARD["uid"] and DASHBOARD["title"]
    (ds,) = [v for v in DASHBOARD["templating"]["list"] if v["type"] == "datasource"]
    assert ds["query"] == "prometheus"
    panels = list(dc.panels(DASHBOARD))
    assert len({p["id"] for p in panels}) == len(panels), "panel ids repeat"
    for p in panels:
        where = f"panel {p.get('title')!r}"
        assert p.get("title"), where
        assert len(p.get("description", "").split()) >= 8, f"{where}: say what it shows and how to read it"
        assert p["fieldConfig"]["defaults"].get("unit"), f"{where} has no unit"
        assert p["targets"], f"{where} has no query"
        for t in [p, *p["targets"]]:
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where


def test_panels_tile_the_grid():
    cells: dict[tuple[int, int], str] = {}
    for p in DASHBOARD["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def test_queries_select_by_model_and_replica_and_rate_over_rate_interval():
    for where, expr, _ in dc.queries(DASHBOARD):
        ranges = re.findall(r"\[([^\]]*)\]", expr)
        assert all(r == "$__rate_interval" for r in ranges), f"{where}: ranges {ranges} in {expr}"
        q = dc.names(dc.render(expr, VARIABLES))
        assert {label for _, label in q.selector_labels} <= SELECTOR_LABELS, f"{where}: {expr}"
        assert all(s.startswith("kvtide:") for s in q.series), f"{where}: {expr}"
        if "model" not in {label for _, label in q.selector_labels}:
            assert where.startswith("variable 'model'"), f"{where} does not follow the model selector: {expr}"


def test_rendered_queries_parse_with_promtool(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    rules = [{"record": f"kvtide:dashboard_check_{i}", "expr": dc.render(expr, VARIABLES)}
             for i, (_, expr, _) in enumerate(dc.queries(DASHBOARD))]  # fmt: skip
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run = subprocess.run([promtool, "check", "rules", str(path)], check=False, capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr


def test_names_reads_promql():
    q = dc.names(
        'histogram_quantile(0.99, sum by (le) (rate(a:x_bucket{model=~"m|n", replica!="r"}[1m])))'
        ' / on (replica) group_left sum(b_total offset 5m) without (code) + max_over_time(c[5m:30s])'
        ' + {__name__="d", model="m"} + label_replace(e, "dst", "$1", "src", "(.*)") * 1e-3 > bool 0.5'
    )
    assert q.series == {"a:x_bucket", "b_total", "c", "d", "e"}
    assert q.selector_labels == {("a:x_bucket", "model"), ("a:x_bucket", "replica"), ("d", "model")}
    assert q.grouping_labels == {"le", "replica", "code"}
    assert dc.names("sum(rate(x_total[1m])) by (replica)") == dc.QueryNames(
        frozenset({"x_total"}), frozenset(), frozenset({"replica"}))
    assert dc.names("topk by (replica) (3, max without (le) (y))").series == {"y"}
    with pytest.raises(ValueError, match=r"\$nope"):
        dc.render("rate(x[$nope])", VARIABLES)


CANNED = """\
# TYPE kvtide:req counter
kvtide:req_total{code="a"} 1
kvtide:req_created{code="a"} 1.7e9
# TYPE kvtide:lat histogram
kvtide:lat_bucket{le="1.0"} 1
kvtide:lat_bucket{le="+Inf"} 1
kvtide:lat_sum 0.5
kvtide:lat_count 1
# TYPE kvtide:blocks_total gauge
kvtide:blocks_total{replica="r0"} 7
# TYPE kvtide:quiet counter
"""


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ('sum by (code) (rate(kvtide:req_total[1m])) + kvtide:blocks_total{replica="r0"}', None),
        ("sum by (le) (rate(kvtide:lat_bucket[1m])) / kvtide:lat_sum / kvtide:lat_count", None),
        ("rate(kvtide:req[1m])", r"kvtide:req is not exported; .* kvtide:req \(counter; stored as kvtide:req_total\)"),
        ("kvtide:blocks", "kvtide:blocks is not exported"),  # a gauge keeps its _total
        ("kvtide:lat_total", "kvtide:lat_total is not exported"),  # a histogram has no _total
        ("kvtide:req_created", "kvtide:req_created is not exported"),
        ("rate(kvtide:quiet_total[1m])", "exported but has no sample"),
        ('kvtide:req_total{replica="r0"}', "has no label 'replica'"),
        ("sum by (replica) (kvtide:lat_sum)", "grouping by 'replica'"),
        ('kvtide:lat_sum{model="m"}', None),  # a target label from prometheus.yml
    ],
)  # fmt: skip
def test_problems_follow_prometheus_naming(expr, problem):
    found = list(dc.problems(dc.names(expr), dc.families(CANNED), frozenset({"model"})))
    if problem is None:
        assert found == []
    else:
        assert len(found) == 1 and re.search(problem, found[0]), found


# -- against a live server -------------------------------------------------------------------------


def _traffic(base: str, model: str) -> None:
    """A completion, a streamed chat, and one request refused with 400."""
    with httpx.Client(base_url=base, timeout=60) as http:
        r = http.post("/completions", json={"model": model, "prompt": "The tide", "max_tokens": 4})
        assert r.status_code == 200, r.text
        chat = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}
        with http.stream("POST", "/chat/completions", json=chat) as s:
            assert s.status_code == 200 and "[DONE]" in s.read().decode()
        r = http.post("/completions", json={"model": model, "prompt": "x", "max_tokens": 100_000})
        assert r.status_code == 400, r.text


# The autoscaler's panels need its metrics: a fixed fleet of one replica, sized as the flags say.
AUTOSCALE = """
policy: static
control_interval_s: 1
window_s: 5
slo: {ttft_p90_s: 5.0, itl_p90_s: 1.0}
profiles:
  fixed: {max_model_len: 512, max_num_seqs: 64, max_num_batched_tokens: 1024, kv_cache_gib: 0.05}
static: {profile: fixed, replicas: 1}
"""


@pytest.fixture(scope="module")
def scrape(tmp_path_factory) -> Iterator[dict[str, dc.Family]]:
    """``kvtide serve`` after traffic, scraped at the path prometheus.yml's frontend job names."""
    kvtide = Path(sys.executable).with_name("kvtide")
    autoscale = tmp_path_factory.mktemp("dashboard") / "autoscale.yaml"
    autoscale.write_text(AUTOSCALE)
    cmd = [str(kvtide), "serve", "--model", VARIABLES["model"], "--grpc-port", "0", "--http-port", "0",
           "--kv-cache-gib", "0.05", "--max-model-len", "512", "--drain-timeout-s", "5",
           "--autoscale", str(autoscale)]  # fmt: skip
    server = ServeProcess.start(cmd, clean_env(), START_TIMEOUT_S)
    try:
        _traffic(server.http_base, VARIABLES["model"])
        job = _frontend_job()
        url = f"{job.get('scheme', 'http')}://127.0.0.1:{server.http_port}{job.get('metrics_path', '/metrics')}"
        reply = httpx.get(url, timeout=30)
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain"), reply.text[:200]
        yield dc.families(reply.text)
        assert server.terminate() == 0, server.tail()
    finally:
        server.kill()


@pytest.mark.slow
def test_every_dashboard_query_finds_its_series_in_a_live_scrape(scrape):
    labels = _target_labels()
    found = []
    for where, expr, needs in dc.queries(DASHBOARD):
        q = dc.names(dc.render(expr, VARIABLES))
        found += [f"{where}: {p}" for p in dc.problems(q, scrape, labels, needs)]
    assert not found, "\n".join(found)

    # The check is live: a copy of the dashboard with a metric the server lacks, a counter
    # without its _total, and a histogram's _bucket under a gauge's name, fails it.
    bad = copy.deepcopy(DASHBOARD)
    panel = next(dc.panels(bad))
    panel["targets"] += [
        {"refId": "X", "expr": 'rate(kvtide:no_such_metric_total{model=~"$model"}[$__rate_interval])'},
        {"refId": "Y", "expr": 'rate(kvtide:request_success{model=~"$model"}[$__rate_interval])'},
        {"refId": "Z", "expr": 'rate(kvtide:kv_cache_usage_perc_bucket{model=~"$model"}[$__rate_interval])'},
    ]
    caught = [p for where, expr, _ in dc.queries(bad) if where.endswith(("X", "Y", "Z"))
              for p in dc.problems(dc.names(dc.render(expr, VARIABLES)), scrape, labels)]  # fmt: skip
    assert len(caught) == 3 and all("is not exported" in p for p in caught), caught


@pytest.mark.slow
def test_every_exported_metric_is_on_the_dashboard(scrape):
    index = dc.series_index(scrape)
    shown = {index[s].name for _, expr, _ in dc.queries(DASHBOARD)
             for s in dc.names(dc.render(expr, VARIABLES)).series if s in index}  # fmt: skip
    exported = {name for name in scrape if name.startswith("kvtide:")}
    assert exported - shown == set(), "exported by kvtide serve but on no panel of deploy/grafana/kvtide.json"
