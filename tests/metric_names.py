"""What metric names the code exports, and which ones a PromQL expression uses: so that the Grafana
dashboard, the KEDA trigger and the docs can be checked against the code, not against a list."""
from __future__ import annotations

import re

#: the series a family of each type produces (prometheus_client naming)
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
             "gauge": ("",), "summary": ("", "_count", "_sum", "_created"), "info": ("_info",),
             "stateset": ("",), "gaugehistogram": ("_bucket", "_gcount", "_gsum"), "unknown": ("",)}


def families():
    """Every hardnet_* metric family: the worker's (default registry, plus its scrape-time
    collector, described with no engines) and the exporter's."""
    from prometheus_client import REGISTRY

    import worker.metrics as wm
    from producer.exporter import QueueCollector

    fams = [f for f in REGISTRY.collect() if f.name.startswith("hardnet_")]
    have = {f.name for f in fams}
    fams += [f for f in wm.RuntimeCollector(lambda: []).describe() if f.name not in have]
    fams += list(QueueCollector._families().values())
    return fams


def exported_series() -> set[str]:
    return {f.name + s for f in families() for s in _SUFFIXES[f.type]}


def documented_name(fam) -> str:
    """The name an operator types in PromQL for a family (counters with their _total)."""
    return fam.name + "_total" if fam.type == "counter" else fam.name


_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and",
             "or", "unless", "inf", "nan", "atan2"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names used by a PromQL expression: identifiers that are not functions, keywords,
    label names (in {...}, by/without/on/ignoring/group_x (...)), durations or Grafana variables."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)          # strings
    s = re.sub(r"\{[^}]*\}", "", s)                                           # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)                                          # ranges
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w$.:])([A-Za-z_:][A-Za-z0-9_:]*)", s):
        name = m.group(1)
        rest = s[m.end():].lstrip()
        if rest.startswith("(") or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names
