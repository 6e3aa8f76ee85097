"""Aggregation over a job's parts, for `hardnet report`: the parts are read one at a time (JSON
Lines or Parquet) into fixed-size aggregates, so that a job of millions of images fits in memory.

Counters per class and per error code, 20 score bins, a reservoir of a few example URIs per class
and per error code (Algorithm R, seeded: the same job gives the same page), and a bounded heap of
the least confident images. Memory grows with the number of classes and parts, never with the
number of images. Throughput comes from when each part was written: its LastModified (S3) or mtime
(files), which needs no clock in the records; for a job kept in Redis, from the completion time the
job state keeps per chunk.
"""
from __future__ import annotations

import heapq
import os
import random
from collections import Counter
from dataclasses import dataclass, field

from hnq.errors import ConfigError
from hnq.jobs.parts import decode_part
from hnq.options import part_name
from hnq.storage import FileDestination, S3Destination, open_destination
from hnq.storage.s3.client import s3_client
from producer.report.job import JobView

SCORE_BINS = 20
EXAMPLES_PER_CLASS = 6
EXAMPLES_PER_CODE = 5


class Reservoir:
    """A uniform sample of at most ``size`` items from a stream (Algorithm R)."""

    __slots__ = ("size", "seen", "items")

    def __init__(self, size: int):
        self.size = size
        self.seen = 0
        self.items: list = []

    def add(self, item, rng: random.Random) -> None:
        self.seen += 1
        if len(self.items) < self.size:
            self.items.append(item)
        else:
            j = rng.randrange(self.seen)
            if j < self.size:
                self.items[j] = item


@dataclass
class ReportStats:
    """Everything the page shows, accumulated one record at a time in bounded memory."""

    low_n: int = 24
    per_class: int = EXAMPLES_PER_CLASS
    total: int = 0
    ok: int = 0
    failed: int = 0
    tag_errors: int = 0
    classes: Counter = field(default_factory=Counter)          # top-1 index -> images
    names: dict = field(default_factory=dict)                  # index -> label
    score_bins: list = field(default_factory=lambda: [0] * SCORE_BINS)
    codes: Counter = field(default_factory=Counter)
    code_examples: dict = field(default_factory=dict)          # code -> Reservoir of (uri, message)
    class_examples: dict = field(default_factory=dict)         # index -> Reservoir of (uri, score, top-5)
    low: list = field(default_factory=list)                    # heap of (-score, seq, uri, label, top-5)
    weights: Counter = field(default_factory=Counter)          # the records' `weights` -> records
    parts: list = field(default_factory=list)                  # (finished at, records) per part
    parts_read: int = 0
    score_sum: float = 0.0
    _seq: int = 0

    def __post_init__(self):
        self.rng = random.Random(20260517)

    def add(self, r) -> None:
        self.total += 1
        self._seq += 1
        if getattr(r, "weights", None):
            self.weights[str(r.weights)] += 1
        if r.tag_error is not None:
            self.tag_errors += 1
            self._example(str(getattr(r.tag_error.code, "value", r.tag_error.code)), r.uri, r.tag_error.message)
        if r.status != "ok" or not r.labels:
            self.failed += 1
            code = str(getattr(r.error.code, "value", r.error.code)) if r.error else "internal_error"
            self.codes[code] += 1
            self._example(code, r.uri, r.error.message if r.error else "")
            return
        self.ok += 1
        top = r.labels[0]
        self.classes[top.index] += 1
        self.names.setdefault(top.index, top.label)
        s = min(max(float(top.score), 0.0), 1.0)
        self.score_sum += s
        self.score_bins[min(SCORE_BINS - 1, int(s * SCORE_BINS))] += 1
        res = self.class_examples.get(top.index)
        if res is None:
            res = self.class_examples[top.index] = Reservoir(self.per_class)
        tip = " · ".join(f"{lab.label} {float(lab.score):.3f}" for lab in r.labels[:5])
        res.add((r.uri, s, tip), self.rng)
        item = (-s, self._seq, r.uri, top.label, tip)
        if len(self.low) < self.low_n:
            heapq.heappush(self.low, item)
        elif item > self.low[0]:         # lower score than the highest kept
            heapq.heapreplace(self.low, item)

    def _example(self, code: str, uri: str, message: str) -> None:
        res = self.code_examples.get(code)
        if res is None:
            res = self.code_examples[code] = Reservoir(EXAMPLES_PER_CODE)
        res.add((uri, message), self.rng)

    def lowest(self) -> list[tuple[float, str, str]]:
        """(score, uri, top-1 label), lowest score first."""
        return [x[:3] for x in self.lowest_with_top5()]

    def lowest_with_top5(self) -> list[tuple[float, str, str, str]]:
        """(score, uri, top-1 label, top-5 text), lowest score first."""
        return sorted(((-ns, uri, label, tip) for ns, _, uri, label, tip in self.low))


def _part_times(d, job_id: str) -> dict[str, float]:
    """part file name -> when it was written (S3 LastModified, file mtime), one listing."""
    out: dict[str, float] = {}
    if isinstance(d, S3Destination):
        pages = s3_client().get_paginator("list_objects_v2").paginate(
            Bucket=d.bucket, Prefix=f"{d.prefix}{job_id}/part-")
        for page in pages:
            for obj in page.get("Contents", ()) or ():
                out[obj["Key"].rsplit("/", 1)[-1]] = obj["LastModified"].timestamp()
    elif isinstance(d, FileDestination):
        base = os.path.join(d.root, job_id)
        try:
            with os.scandir(base) as it:
                for e in it:
                    if e.name.startswith("part-") and e.is_file():
                        out[e.name] = e.stat().st_mtime
        except FileNotFoundError:
            pass
    return out


def scan(view: JobView, stats: ReportStats) -> int:
    """Read every part into ``stats``; returns how many parts were missing."""
    missing = 0
    if view.chunks is None:
        raise ConfigError(f"job {view.job_id} is still being listed; try again when it is sealed")
    if view.dest:
        d = open_destination(view.dest)
        times = _part_times(d, view.job_id)
        for c in range(view.chunks):
            name = part_name(c, view.fmt)
            if name not in times:
                missing += 1
                continue
            data = d.get(f"{view.job_id}/{name}")
            if data is None:
                missing += 1
                continue
            n = 0
            for r in decode_part(data, view.fmt):
                stats.add(r)
                n += 1
            stats.parts_read += 1
            stats.parts.append((times[name], n))
    else:
        store = view.store
        times = store.done_times(view.job_id)
        for c in range(view.chunks):
            text = store.get_part(view.job_id, c)
            if text is None:
                missing += 1
                continue
            n = 0
            for r in decode_part(text.encode(), "jsonl"):
                stats.add(r)
                n += 1
            stats.parts_read += 1
            if c in times:
                stats.parts.append((times[c], n))
    return missing
