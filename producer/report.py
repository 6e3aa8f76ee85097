"""`hardnet report JOB`: one self-contained HTML page about a job, for people.

    DEST/JOB_ID/report.html      (S3 or a directory; for a job kept in Redis: a local file)

What it shows: the counts (from the parts, beside the manifest's), the label distribution (the most
frequent top-1 classes as a bar chart), the top-1 score histogram, errors by code with example
URIs, the job's throughput over its life, and contact sheets of thumbnails for the most frequent
classes and for the least confident images.

How it is built, for jobs of millions of images: the parts are read one at a time (JSON Lines or
Parquet) into fixed-size aggregates: counters per class and per error code, 20 score bins, a
reservoir of a few example URIs per class and per error code (Algorithm R, seeded: the same job
gives the same page), and a bounded heap of the least confident images. Memory grows with the
number of classes (1000) and parts, never with the number of images. Throughput comes from when
each part was written: its LastModified (S3) or mtime (files), which needs no clock in the
records; for a job kept in Redis, from the completion time the job state keeps per chunk.

Thumbnails are fetched from the sources with this machine's credentials (the producer's: S3, local
files; http(s) with the usual SSRF guard) and downscaled with Pillow into JPEG data URIs. Pillow is
a worker dependency: without it the page says so where the thumbnails would be. The page has no
script, loads nothing (a Content-Security-Policy forbids it) and works offline; every URI, label and
message is HTML-escaped, so a hostile object key cannot inject markup.
"""
from __future__ import annotations

import argparse
import base64
import heapq
import html
import io
import json
import logging
import os
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone

from hnq.console import EXIT_OK, add_command, err
from hnq.errors import ConfigError

log = logging.getLogger("hardnet.report")

SCORE_BINS = 20
EXAMPLES_PER_CLASS = 6
EXAMPLES_PER_CODE = 5
THUMB_PX = 160


# ------------------------------------------------------------------------------------ aggregation
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
    class_examples: dict = field(default_factory=dict)         # index -> Reservoir of (uri, score)
    low: list = field(default_factory=list)                    # heap of (-score, seq, uri, label)
    parts: list = field(default_factory=list)                  # (finished at, records) per part
    parts_read: int = 0
    score_sum: float = 0.0
    _seq: int = 0

    def __post_init__(self):
        self.rng = random.Random(20260517)

    def add(self, r) -> None:
        self.total += 1
        self._seq += 1
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
        res.add((r.uri, s), self.rng)
        item = (-s, self._seq, r.uri, top.label)
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
        return sorted(((-ns, uri, label) for ns, _, uri, label in self.low))


# ------------------------------------------------------------------------------------ reading
@dataclass
class JobView:
    job_id: str
    dest: str | None
    fmt: str
    chunks: int | None
    info: dict                 # what is known of the job (Redis JobInfo or the manifest)
    manifest: dict | None
    store: object = None       # the JobStore, when Redis knows the job


def _part_times(d, job_id: str) -> dict[str, float]:
    """part file name -> when it was written (S3 LastModified, file mtime), one listing."""
    from hnq.storage import FileDestination, S3Destination
    from hnq.storage.s3.client import s3_client

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


def open_job(s, job_id: str, dest: str | None) -> JobView:
    """What the report needs to know of a job: from Redis when it still knows it, else from
    DEST/JOB_ID/ (manifest.json, job.json)."""
    from hnq.options import JobOptions
    from hnq.storage import open_destination, validate_destination

    info = None
    store = None
    try:
        from producer.commands import job_store

        store = job_store(s)
        ji = store.info(job_id)
        if ji is not None:
            info = ji.model_dump(mode="json")
            info["_options"] = JobOptions.from_json(store.raw(job_id).get("options")).model_dump()
    except Exception as e:  # noqa: BLE001 - Redis may be gone; storage may still have the job
        if not dest:
            raise
        log.info("Redis not used for the report: %s", e)
    if info is not None and dest and info.get("dest") and validate_destination(dest) != info["dest"]:
        raise ConfigError(f"job {job_id} writes to {info['dest']}, not {dest}")
    dest = (info or {}).get("dest") or (validate_destination(dest) if dest else None)
    manifest = None
    if dest:
        d = open_destination(dest)
        raw = d.get(f"{job_id}/manifest.json")
        manifest = json.loads(raw) if raw else None
        desc_raw = d.get(f"{job_id}/job.json")
        desc = json.loads(desc_raw) if desc_raw else {}
        if info is None:
            if manifest is None and not desc:
                raise ConfigError(f"no job {job_id} under {dest} (neither manifest.json nor job.json)")
            info = dict(manifest or {})
            info.setdefault("chunks", desc.get("chunks"))
            info.setdefault("model", desc.get("model"))
            info["_options"] = JobOptions.from_dict(desc.get("options")).model_dump()
            info["state"] = (manifest or {}).get("state", "unknown (Redis no longer knows it)")
        if info.get("chunks") is None:
            info["chunks"] = desc.get("chunks")
    elif info is None:
        raise ConfigError(f"unknown job {job_id}: Redis does not know it; give --out DEST, where its "
                          "results were written")
    fmt = (info.get("_options") or {}).get("format", "jsonl")
    return JobView(job_id=job_id, dest=dest, fmt=fmt, chunks=info.get("chunks"), info=info,
                   manifest=manifest, store=store)


def scan(view: JobView, stats: ReportStats) -> int:
    """Read every part into ``stats``; returns how many parts were missing."""
    from hnq.options import part_name
    from hnq.jobs.parts import decode_part
    from hnq.storage import open_destination

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


# ------------------------------------------------------------------------------------ thumbnails
def pillow():
    try:
        from PIL import Image
    except ImportError:
        return None
    return Image


def thumbnail(uri: str, Image, px: int = THUMB_PX) -> tuple[str | None, str | None]:
    """(data URI of a JPEG thumbnail, None) or (None, why not)."""
    from hnq.storage import FetchPolicy, fetch

    policy = FetchPolicy(max_bytes=50 * 2**20, timeout_s=20, allow_http=True, http_allow_hosts=("*",),
                         allow_private_networks=False, file_roots=None, s3_client="boto3")
    try:
        data = fetch(uri, policy).data
    except Exception as e:  # noqa: BLE001 - a missing thumbnail is a note, not a failure
        return None, f"{type(e).__name__}: {e}"[:200]
    try:
        Image.MAX_IMAGE_PIXELS = 89_478_485
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (px * 2, px * 2))
            im.thumbnail((px, px))
            im = im.convert("RGB")
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=72)
    except Exception as e:  # noqa: BLE001
        return None, f"not an image Pillow can read ({type(e).__name__})"
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), None


def fetch_thumbnails(uris: list[str], threads: int = 8) -> dict[str, tuple[str | None, str | None]]:
    Image = pillow()
    if Image is None or not uris:
        return {}
    uniq = list(dict.fromkeys(uris))
    with ThreadPoolExecutor(threads, thread_name_prefix="hnq-thumb") as ex:
        return dict(zip(uniq, ex.map(lambda u: thumbnail(u, Image), uniq)))


# ------------------------------------------------------------------------------------ rendering
def e(x) -> str:
    """HTML-escape anything (quotes too: safe in attributes)."""
    return html.escape(str(x), quote=True)


def _fmt_ts(ts) -> str:
    if ts is None:
        return "-"
    if isinstance(ts, (int, float)):
        return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return str(ts)


def svg_bars(rows: list[tuple[str, int]], total: int, width: int = 900) -> str:
    """Horizontal bars: one row per (label, count)."""
    if not rows:
        return '<p class="note">no labelled images</p>'
    bar_h, gap, left, right = 18, 6, 230, 120
    h = len(rows) * (bar_h + gap) + gap
    top = max(n for _, n in rows) or 1
    out = [f'<svg class="chart" id="label-chart" viewBox="0 0 {width} {h}" width="{width}" height="{h}" '
           f'role="img" aria-label="top-1 labels">']
    for i, (label, n) in enumerate(rows):
        y = gap + i * (bar_h + gap)
        w = max(1, round((width - left - right) * n / top))
        pct = 100 * n / total if total else 0
        out.append(f'<text x="{left - 8}" y="{y + 13}" text-anchor="end">{e(label)}</text>'
                   f'<rect x="{left}" y="{y}" width="{w}" height="{bar_h}" fill="#3b7dd8"><title>{e(label)}: {n}</title></rect>'
                   f'<text x="{left + w + 6}" y="{y + 13}">{n} ({pct:.1f}%)</text>')
    out.append("</svg>")
    return "".join(out)


def svg_columns(values: list[float], labels: list[str], *, id: str, aria: str, color: str = "#2f9e6e",
                width: int = 900, height: int = 220, unit: str = "") -> str:
    """Vertical columns with a few x-axis labels (first, middle, last)."""
    if not values:
        return '<p class="note">no data</p>'
    pad_l, pad_b, pad_t = 60, 30, 10
    n = len(values)
    top = max(values) or 1
    cw = (width - pad_l - 10) / n
    out = [f'<svg class="chart" id="{e(id)}" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
           f'role="img" aria-label="{e(aria)}">',
           f'<line x1="{pad_l}" y1="{height - pad_b}" x2="{width - 10}" y2="{height - pad_b}" stroke="#888"/>',
           f'<text x="{pad_l - 6}" y="{pad_t + 10}" text-anchor="end">{e(_num(top))}</text>',
           f'<text x="{pad_l - 6}" y="{height - pad_b}" text-anchor="end">0</text>']
    for i, v in enumerate(values):
        bh = (height - pad_b - pad_t) * v / top
        x = pad_l + i * cw
        out.append(f'<rect x="{x + 1:.1f}" y="{height - pad_b - bh:.1f}" width="{max(1.0, cw - 2):.1f}" '
                   f'height="{bh:.1f}" fill="{color}"><title>{e(labels[i])}: {e(_num(v))}{e(unit)}</title></rect>')
    for i in sorted({0, n // 2, n - 1}):
        x = pad_l + i * cw + cw / 2
        out.append(f'<text x="{x:.1f}" y="{height - 10}" text-anchor="middle">{e(labels[i])}</text>')
    out.append("</svg>")
    return "".join(out)


def _num(v: float) -> str:
    return f"{v:.0f}" if v >= 100 or float(v).is_integer() else f"{v:.1f}"


def throughput(parts: list[tuple[float, int]], started: float | None, bins: int = 40):
    """(values images/s per bin, bin labels, overall rate, span s) from part completion times."""
    if not parts:
        return [], [], None, None
    times = sorted(t for t, _ in parts)
    t0 = min(started, times[0]) if started else times[0]
    t1 = times[-1]
    span = max(t1 - t0, 1.0)
    nb = max(1, min(bins, len(parts)))
    w = span / nb
    counts = [0] * nb
    for t, n in parts:
        counts[min(nb - 1, int((t - t0) / w))] += n
    values = [c / w for c in counts]
    labels = [f"+{_dur(i * w)}" for i in range(nb)]
    return values, labels, sum(n for _, n in parts) / span, span


def _dur(s: float) -> str:
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}min"
    return f"{s / 3600:.1f}h"


def _ts_of(v) -> float | None:
    if v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    try:
        return datetime.fromisoformat(str(v).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1d232a;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse} td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums} .note{color:#6b5900;background:#fff6d6;padding:6px 10px;border-radius:4px}
.uri{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;word-break:break-all}
.chart text{font-size:12px;fill:#333} .sheet{display:flex;flex-wrap:wrap;gap:8px;margin:6px 0 14px}
figure{margin:0;width:164px} figure img,figure .ph{width:160px;height:160px;object-fit:contain;background:#f3f3f3;border:1px solid #ddd;display:block}
figure .ph{font-size:11px;color:#777;overflow:hidden;padding:4px;box-sizing:border-box;word-break:break-all}
figcaption{font-size:11px;word-break:break-all;color:#333} .meta td:first-child{color:#555}
"""


def render(view: JobView, st: ReportStats, missing: int, *, top_classes: int = 25,
           sheet_classes: int = 6, thumbs: dict | None, pillow_missing: bool, thumbs_off: bool) -> str:
    info, m = view.info, view.manifest or {}
    opts = info.get("_options") or {}
    started = _ts_of(info.get("started_at") or m.get("started_at"))
    q = []
    q.append("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
             "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
             "style-src 'unsafe-inline'\">"
             f"<title>hardnet report {e(view.job_id)}</title><style>{CSS}</style></head><body>")
    q.append(f'<h1>Job <span id="job-id">{e(view.job_id)}</span></h1>')
    q.append(f'<p>state <b id="state">{e(info.get("state"))}</b> · model {e(info.get("model"))} · '
             f'weights {e(", ".join(m.get("weights", [])) or opts.get("weights") or "worker default")} · '
             f'format {e(view.fmt)} · top-k {e(opts.get("top_k", 5))}'
             f'{" · S3 tags written" if opts.get("tag") else ""} · destination {e(view.dest or "redis")}</p>')
    if "random" in (m.get("weights") or []):
        q.append('<p class="note">These records were made with <b>random weights</b>: the labels are meaningless.</p>')

    # counts: from the parts, beside the manifest's
    q.append("<h2>Counts</h2><table id=\"counts\"><tr><th></th><th>from the parts</th><th>manifest</th></tr>")
    for key, label, mine in (("total", "images", st.total), ("succeeded", "labelled", st.ok),
                             ("failed", "failed", st.failed), ("tag_errors", "tag errors", st.tag_errors)):
        theirs = m.get(key, "-") if m else "-"
        q.append(f'<tr><td>{label}</td><td class="n" data-count="{key}">{mine}</td>'
                 f'<td class="n" data-manifest="{key}">{e(theirs)}</td></tr>')
    q.append(f'<tr><td>parts read</td><td class="n" data-count="parts">{st.parts_read}</td>'
             f'<td class="n" data-manifest="parts">{len(m.get("parts", [])) if m else "-"}</td></tr>')
    q.append(f'<tr><td>parts missing</td><td class="n" data-count="missing_parts">{missing}</td>'
             f'<td class="n" data-manifest="missing_parts">{len(m.get("missing_parts", [])) if m else "-"}</td></tr></table>')
    if not m:
        q.append('<p class="note">No manifest yet: the job has not finished (or its manifest could not be written).</p>')
    if st.ok:
        q.append(f'<p>mean top-1 score <span id="mean-score">{st.score_sum / st.ok:.3f}</span> · '
                 f'<span id="n-classes">{len(st.classes)}</span> distinct top-1 classes</p>')

    # label distribution
    top = st.classes.most_common(top_classes)
    q.append(f"<h2>Top-1 labels (the {len(top)} most frequent of {len(st.classes)})</h2>")
    q.append(svg_bars([(st.names[i], n) for i, n in top], st.ok))

    # score histogram
    q.append("<h2>Top-1 score</h2>")
    labels = [f"{i / SCORE_BINS:.2f}–{(i + 1) / SCORE_BINS:.2f}" for i in range(SCORE_BINS)]
    q.append(svg_columns([float(v) for v in st.score_bins], labels, id="score-chart",
                         aria="histogram of top-1 scores", color="#7a5cc4"))
    q.append('<table id="score-bins" hidden>' + "".join(
        f'<tr><td>{labels[i]}</td><td data-bin="{i}">{v}</td></tr>' for i, v in enumerate(st.score_bins)) + "</table>")

    # errors
    q.append("<h2>Errors by code</h2>")
    all_codes = dict(st.codes)
    if st.tag_errors:
        all_codes["tag_error"] = st.tag_errors
    if not all_codes:
        q.append('<p id="no-errors">No errors: every image was labelled.</p>')
    else:
        q.append('<table id="errors"><tr><th>code</th><th>images</th><th>examples</th></tr>')
        for code, n in sorted(all_codes.items(), key=lambda kv: -kv[1]):
            ex = st.code_examples.get(code)
            items = "".join(f'<div><span class="uri">{e(u)}</span><br><small>{e(msg[:300])}</small></div>'
                            for u, msg in (ex.items if ex else []))
            q.append(f'<tr><td>{e(code)}</td><td class="n" data-code="{e(code)}">{n}</td><td>{items}</td></tr>')
        q.append("</table>")

    # throughput
    q.append("<h2>Throughput</h2>")
    values, tlabels, rate, span = throughput(st.parts, started)
    if values:
        q.append(f'<p>{sum(n for _, n in st.parts)} images in {len(st.parts)} parts over {_dur(span)} '
                 f'(<span id="rate">{rate:.1f}</span> images/s overall), from when each part was written</p>')
        q.append("<p><small>images per second</small></p>")
        q.append(svg_columns(values, tlabels, id="throughput-chart", aria="images per second over the job",
                             unit=" img/s"))
    else:
        q.append('<p class="note">No part completion times known for this job.</p>')

    # contact sheets
    q.append("<h2>Contact sheets</h2>")
    if thumbs_off:
        q.append('<p class="note" id="thumbs-note">Thumbnails were turned off (--no-thumbnails).</p>')
    elif pillow_missing:
        q.append('<p class="note" id="thumbs-note">Thumbnails are not shown: Pillow is not installed on the '
                 "machine that made this report (pip install pillow, or hardnet-queue[worker]).</p>")
    thumbs = thumbs or {}

    def figure(uri: str, caption: str) -> str:
        src, why = thumbs.get(uri, (None, None))
        if src:
            img = f'<img src="{e(src)}" alt="{e(caption)}">'
        else:
            img = f'<div class="ph">{e(why or "no thumbnail")}</div>'
        return f'<figure>{img}<figcaption>{e(caption)}<br><span class="uri">{e(uri)}</span></figcaption></figure>'

    for i, n in top[:sheet_classes]:
        res = st.class_examples.get(i)
        q.append(f'<h3>{e(st.names[i])} <small>({n} images)</small></h3><div class="sheet">')
        q.append("".join(figure(u, f"{s:.3f}") for u, s in sorted(res.items if res else [], key=lambda x: -x[1])))
        q.append("</div>")
    low = st.lowest()
    if low:
        q.append(f'<h3>Least confident ({len(low)} lowest top-1 scores)</h3><div class="sheet" id="low-sheet">')
        q.append("".join(figure(u, f"{s:.3f} {label}") for s, u, label in low))
        q.append("</div>")
    q.append(f'<p><small>made by hardnet report at {_fmt_ts(time.time())}</small></p></body></html>')
    return "".join(q)


def thumb_uris(st: ReportStats, sheet_classes: int) -> list[str]:
    uris = []
    for i, _ in st.classes.most_common(sheet_classes):
        res = st.class_examples.get(i)
        uris += [u for u, _ in (res.items if res else [])]
    uris += [u for _, u, _ in st.lowest()]
    return uris


def build_report(s, job_id: str, *, dest: str | None = None, top_classes: int = 25, sheet_classes: int = 6,
                 low_n: int = 24, thumbnails: bool = True) -> tuple[str, JobView, ReportStats]:
    view = open_job(s, job_id, dest)
    st = ReportStats(low_n=low_n)
    missing = scan(view, st)
    Image = pillow() if thumbnails else None
    thumbs = fetch_thumbnails(thumb_uris(st, sheet_classes)) if Image is not None else {}
    page = render(view, st, missing, top_classes=top_classes, sheet_classes=sheet_classes, thumbs=thumbs,
                  pillow_missing=thumbnails and Image is None, thumbs_off=not thumbnails)
    return page, view, st


def cmd_report(a: argparse.Namespace) -> int:
    from producer.commands import settings
    from hnq.storage import open_destination

    s = settings()
    page, view, st = build_report(s, a.job, dest=a.out, top_classes=a.classes, sheet_classes=a.sheets,
                                  low_n=a.low, thumbnails=not a.no_thumbnails)
    data = page.encode("utf-8")
    if a.output:
        path = os.path.abspath(a.output)
        with open(path, "wb") as f:
            f.write(data)
        where = path
    elif view.dest:
        d = open_destination(view.dest)
        d.put(f"{a.job}/report.html", data, content_type="text/html; charset=utf-8")
        where = d.uri(f"{a.job}/report.html")
        if where.startswith("file://"):
            where = os.path.join(d.root, a.job, "report.html")
    else:
        where = os.path.abspath(f"hardnet-report-{a.job}.html")
        with open(where, "wb") as f:
            f.write(data)
    print(where, flush=True)
    err(f"report of job {a.job}: {st.total} records ({st.ok} labelled, {st.failed} failed) -> {where}")
    return EXIT_OK


def register(sub) -> None:
    r = add_command(sub, "report", "write a self-contained HTML report of a job (DEST/JOB/report.html) "
                    "and print where", cmd_report)
    r.add_argument("job", help="job id")
    r.add_argument("--out", metavar="DEST", help="the job's destination (needed when Redis no longer knows the job)")
    r.add_argument("-o", "--output", metavar="FILE",
                   help="write the page to this local file instead; unset: DEST/JOB/report.html, or "
                   "./hardnet-report-JOB.html for a job whose results are kept in Redis")
    r.add_argument("--classes", type=int, default=25, metavar="N", help="bars in the label chart")
    r.add_argument("--sheets", type=int, default=6, metavar="N",
                   help="contact sheets for the N most frequent classes")
    r.add_argument("--low", type=int, default=24, metavar="N", help="least confident images shown")
    r.add_argument("--no-thumbnails", action="store_true",
                   help="fetch no images (the sheets show URIs only)")
