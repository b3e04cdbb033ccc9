"""What a Grafana dashboard asks of Prometheus, and whether a ``/metrics`` scrape has it.

Pure helpers for ``tests/integration/test_dashboard.py``: render a panel's PromQL (Grafana
variables resolved), pull out the series and label names it references with a small PromQL
tokenizer, and check them against the exposition text of a live scrape.

Naming, as Prometheus ingests the text format: a counter ``x`` is stored as ``x_total``; a
histogram ``x`` as ``x_bucket`` (with ``le``), ``x_sum`` and ``x_count``; a summary as ``x``,
``x_sum``, ``x_count``; a gauge as ``x`` itself, even when ``x`` ends in ``_total``. So a
reference is resolved forward, from each exported family to the series it exposes, never by
stripping suffixes off the reference.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

# Grafana's global variables, at values a dashboard with a 1 h range and 15 s scrapes gets.
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "30s", "__interval_ms": "30000", "__range": "1h",
                    "__range_s": "3600", "__range_ms": "3600000"}  # fmt: skip

_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")
_TOKEN = re.compile(
    r"""(?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
      |(?P<duration>(?:\d+(?:ms|[smhdwy]))+\b)
      |(?P<number>0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
      |(?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
      |(?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=@{}()\[\],])
      |(?P<space>\s+)""",
    re.VERBOSE,
)
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
# Aggregations may be followed by ``by (...)`` rather than ``(``: PromQL reserves their names.
_AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
                 "topk", "quantile", "limitk", "limit_ratio"}  # fmt: skip
_KEYWORDS = {"bool", "and", "or", "unless", "offset", "inf", "nan", "start", "end"} | _GROUPING | _AGGREGATIONS
_MATCH_OPS = {"=", "!=", "=~", "!~"}


@dataclass(frozen=True)
class QueryNames:
    """The names one PromQL expression references."""

    series: frozenset[str]
    """Series (metric) names, as stored: ``x_bucket``, ``x_total``, a gauge's own name."""
    selector_labels: frozenset[tuple[str, str]]
    """``(series, label)`` for every label matcher; series ``""`` for a matcher with no name."""
    grouping_labels: frozenset[str]
    """Labels in ``by``/``without``/``on``/``ignoring``/``group_left``/``group_right`` lists."""


def render(expr: str, values: Mapping[str, str]) -> str:
    """``expr`` with every ``$var``, ``${var}``, ``${var:fmt}`` and ``[[var]]`` replaced by its
    value in ``values`` or ``GRAFANA_BUILTINS``; raises ``ValueError`` naming an unknown one."""

    def value(match: re.Match) -> str:
        name = next(g for g in match.groups() if g)
        if name in values:
            return values[name]
        if name in GRAFANA_BUILTINS:
            return GRAFANA_BUILTINS[name]
        raise ValueError(f"unknown Grafana variable ${name} in {expr!r}; known: {sorted({*values, *GRAFANA_BUILTINS})}")

    return _VARIABLE.sub(value, expr)


def _tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None:
            raise ValueError(f"cannot tokenize PromQL at offset {pos}: {expr[pos:pos + 20]!r} in {expr!r}")
        if match.lastgroup != "space":
            out.append((match.lastgroup, match.group()))
        pos = match.end()
    return out


def _closing(tokens: list[tuple[str, str]], i: int, open_: str, close: str) -> int:
    """Index of the token that closes the ``open_`` at ``tokens[i]``."""
    depth = 0
    for j in range(i, len(tokens)):
        depth += (tokens[j][1] == open_) - (tokens[j][1] == close)
        if depth == 0:
            return j
    raise ValueError(f"unbalanced {open_!r} in {' '.join(t for _, t in tokens)!r}")


def names(expr: str) -> QueryNames:
    """The series and labels a rendered PromQL expression references (no Grafana variables left)."""
    tokens = _tokens(expr)
    series: set[str] = set()
    selector_labels: set[tuple[str, str]] = set()
    grouping: set[str] = set()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        nxt = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if text == "[":  # a range or subquery: durations only
            i = _closing(tokens, i, "[", "]") + 1
            continue
        if text == "{":  # a selector with no name before it
            i = _matchers(tokens, i, "", series, selector_labels)
            continue
        if kind != "ident":
            i += 1
            continue
        if text.lower() in _GROUPING:
            if nxt == "(":
                end = _closing(tokens, i + 1, "(", ")")
                grouping.update(t for k, t in tokens[i + 2:end] if k == "ident")
                i = end + 1
            else:
                i += 1
            continue
        if nxt == "(" or text.lower() in _KEYWORDS:  # a function or aggregation, or a keyword
            i += 1
            continue
        series.add(text)
        i = _matchers(tokens, i + 1, text, series, selector_labels) if nxt == "{" else i + 1
    return QueryNames(frozenset(series), frozenset(selector_labels), frozenset(grouping))


def _matchers(tokens, i: int, name: str, series: set[str], selector_labels: set[tuple[str, str]]) -> int:
    """Reads the ``{...}`` at ``tokens[i]``; returns the index after it."""
    end = _closing(tokens, i, "{", "}")
    body = tokens[i + 1:end]
    for j in range(len(body) - 2):
        (kind, label), (_, op), (_, value) = body[j], body[j + 1], body[j + 2]
        if kind == "ident" and op in _MATCH_OPS:
            if label == "__name__" and op == "=":
                name = value[1:-1]
                series.add(name)
            else:
                selector_labels.add((name, label))
    return end + 1


# -- the exposition side ---------------------------------------------------------------------------

_SERIES_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                    "gaugehistogram": ("_bucket", "_gsum", "_gcount"), "summary": ("", "_sum", "_count")}  # fmt: skip


@dataclass(frozen=True)
class Family:
    """One exported metric family, as the text parser reads it."""

    name: str
    type: str
    sampled: Mapping[str, frozenset[str]]
    """Series that have at least one sample, each with the label names its samples carry."""

    @property
    def series(self) -> tuple[str, ...]:
        """The series names Prometheus stores for this family."""
        return tuple(self.name + s for s in _SERIES_SUFFIXES.get(self.type, ("",)))


def families(exposition: str) -> dict[str, Family]:
    """The families of a ``/metrics`` text, by name, leaving out the ``x_created`` gauges that
    stand beside counters and histograms (their creation times)."""
    parsed = list(text_string_to_metric_families(exposition))
    names_ = {f.name for f in parsed}
    out = {}
    for f in parsed:
        if f.name.endswith("_created") and f.name[: -len("_created")] in names_:
            continue
        labels: dict[str, set[str]] = {}
        for s in f.samples:
            labels.setdefault(s.name, set()).update(s.labels)
        out[f.name] = Family(f.name, f.type, {k: frozenset(v) for k, v in labels.items()})
    return out


def series_index(fams: Mapping[str, Family]) -> dict[str, Family]:
    """Series name -> the family that exposes it."""
    return {series: f for f in fams.values() for series in f.series}


def problems(
    query: QueryNames, fams: Mapping[str, Family], target_labels: frozenset[str], needs: frozenset[str] = frozenset()
) -> Iterator[str]:
    """What in ``query`` a scrape with ``fams`` (plus Prometheus's ``target_labels``) lacks;
    ``needs``: labels that some series of the query must carry (a ``label_values`` variable's)."""
    index = series_index(fams)
    known_labels: set[str] = set(target_labels)
    for s in sorted(query.series):
        family = index.get(s)
        if family is None:
            hint = [f"{f.name} ({f.type}; stored as {', '.join(f.series)})" for f in fams.values()
                    if s.startswith(f.name) or f.name.startswith(s)]  # fmt: skip
            yield f"{s} is not exported" + (f"; did you mean {' or '.join(hint)}?" if hint else "")
        elif s not in family.sampled:
            yield f"{s} ({family.type} {family.name}) is exported but has no sample"
        else:
            known_labels |= family.sampled[s]
    for s, label in sorted(query.selector_labels):
        family = index.get(s)
        if family is not None and s in family.sampled and label not in family.sampled[s] | target_labels:
            yield f"{s}{{{label}=...}}: {s} has no label {label!r} (it has {sorted(family.sampled[s])})"
    for label in sorted(query.grouping_labels - known_labels):
        yield f"grouping by {label!r}, which none of {sorted(query.series)} carries"
    for label in sorted(needs - known_labels):
        yield f"reading label {label!r}, which none of {sorted(query.series)} carries"


# -- the dashboard side ----------------------------------------------------------------------------


def panels(dashboard: Mapping) -> Iterator[Mapping]:
    """Every panel, those inside rows included; rows themselves are left out."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<expr>.*),\s*)?(?P<label>\w+)\s*\)\s*$", re.DOTALL)


def queries(dashboard: Mapping) -> Iterator[tuple[str, str, frozenset[str]]]:
    """``(where, PromQL, labels it must find)`` for every panel target and query variable; a
    ``label_values(expr, label)`` variable is its ``expr`` (``{}`` when absent) needing ``label``."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield f"panel {panel.get('title')!r} target {target.get('refId')}", target["expr"], frozenset()
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = _LABEL_VALUES.match(query)
        if match is None:
            raise ValueError(f"variable {var['name']!r}: only label_values(...) queries are checked, got {query!r}")
        yield f"variable {var['name']!r}", match["expr"] or "{}", frozenset({match["label"]})
