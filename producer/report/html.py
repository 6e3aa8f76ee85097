"""The report's one HTML page: SVG charts drawn here (no script, no library) and the page itself.

The page has no script, loads nothing (a Content-Security-Policy forbids it) and works offline;
every URI, label and message is HTML-escaped, so a hostile object key cannot inject markup.
"""
from __future__ import annotations

import html
import re
import time
from urllib.parse import quote
from datetime import datetime, timezone

from producer.report.job import JobView
from producer.report.stats import SCORE_BINS, ReportStats

CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1d232a;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse} td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums} .note{color:#6b5900;background:#fff6d6;padding:6px 10px;border-radius:4px}
.uri{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;word-break:break-all}
.chart text{font-size:12px;fill:#333} .sheet{display:flex;flex-wrap:wrap;gap:8px;margin:6px 0 14px}
figure{margin:0;width:164px} figure img,figure .ph{width:160px;height:160px;object-fit:contain;background:#f3f3f3;border:1px solid #ddd;display:block}
figure .ph{font-size:11px;color:#777;overflow:hidden;padding:4px;box-sizing:border-box;word-break:break-all}
figcaption{font-size:11px;color:#333} figcaption a.name{display:block;overflow:hidden;text-overflow:ellipsis;white-space:nowrap} .meta td:first-child{color:#555}
"""


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
    if s < 10:
        return f"{s:.1f}s"
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


#: What the page says of a job in each state (the job's own words; nothing labelled is `failed`).
STATE_WORDS = {
    "done": "Done: every image was labelled.",
    "done_with_errors": "Done with errors: the job ended, some images could not be labelled (see Errors by code).",
    "failed": "Failed: the job ended with no image labelled.",
    "cancelled": "Cancelled: the job was cancelled; the chunks that had not started were dropped.",
    "abandoned": "Abandoned: the job stopped making progress and was given up.",
}
ENDED = set(STATE_WORDS)


def short_name(uri: str) -> str:
    """The last path segment of a URI (the file or key name), for a caption."""
    tail = uri.rstrip("/").rsplit("/", 1)[-1]
    return tail or uri


def _link(uri: str, title: str | None = None) -> str:
    t = f' title="{e(title)}"' if title else ""
    href = re.sub(r"\s", lambda m: quote(m.group()), uri)   # whitespace percent-encoded, as a browser would
    return f'<a class="name" href="{e(href)}"{t}>{e(short_name(uri))}</a>'


def _message_without(uri: str, msg: str) -> str:
    """An error message without the URI (or its local path) it repeats."""
    for form in (uri, uri[len("file://"):] if uri.startswith("file://") else None):
        if form:
            msg = msg.replace(form, "")
    msg = " ".join(msg.split()).strip(" :,-")
    return msg or "(no message)"


def render(view: JobView, st: ReportStats, missing: int, *, top_classes: int = 25,
           sheet_classes: int = 6, thumbs: dict | None, pillow_missing: bool, thumbs_off: bool) -> str:
    info, m = view.info, view.manifest or {}
    opts = info.get("_options") or {}
    started = _ts_of(info.get("started_at") or m.get("started_at"))
    submitted = _ts_of(info.get("submitted_at") or m.get("submitted_at"))
    finished = _ts_of(info.get("finished_at") or m.get("finished_at"))
    state = str(info.get("state") or m.get("state") or "unknown")
    # the weights are the records' own: a job's options say only what was asked
    if st.weights:
        weights = [w for w, _ in st.weights.most_common()]
    else:
        weights = list(m.get("weights") or [])
    weights_text = ", ".join(weights) or (f"{opts['weights']} (asked; no record says)" if opts.get("weights")
                                          else "unknown (no records)")
    sources = [str(x) for x in (info.get("_sources") or m.get("sources") or [])]
    q = []
    q.append("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
             "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
             "style-src 'unsafe-inline'\">"
             f"<title>hardnet report {e(view.job_id)}</title><style>{CSS}</style></head><body>")
    q.append(f'<h1>Job <span id="job-id">{e(view.job_id)}</span></h1>')
    q.append(f'<p>state <b id="state">{e(info.get("state"))}</b> · model {e(info.get("model"))} · '
             f'weights <span id="weights">{e(weights_text)}</span> · '
             f'format {e(view.fmt)} · top-k {e(opts.get("top_k", 5))}'
             f'{" · S3 tags written" if opts.get("tag") else ""} · destination {e(view.dest or "redis")}</p>')
    if "random" in weights:
        q.append('<p class="note" id="random-weights">These records were made with <b>random weights</b>: '
                 'the labels are meaningless.</p>')
    q.append('<table class="meta" id="times">')
    if sources:
        shown = ", ".join(e(x) for x in sources[:5]) + (f" and {len(sources) - 5} more" if len(sources) > 5 else "")
        q.append(f'<tr><td>sources</td><td id="sources" class="uri">{shown}</td></tr>')
    for key, ts in (("submitted", submitted), ("started", started), ("finished", finished)):
        q.append(f'<tr><td>{key}</td><td id="{key}-at">{e(_fmt_ts(ts) if ts else "-")}</td></tr>')
    if finished and (started or submitted):
        d = finished - (started or submitted)
        q.append(f'<tr><td>duration</td><td id="duration">{e(_dur(max(d, 0.0)))}'
                 f'{"" if started else " (from submission)"}</td></tr>')
    q.append("</table>")
    words = STATE_WORDS.get(state)
    if words is None:
        words = f"The job has not finished (state {state}): this page shows what was written so far."
    q.append(f'<p id="state-words"><strong>{e(words)}</strong>')
    if state == "cancelled":
        dropped = max(0, int(info.get("total") or m.get("total") or 0) - st.total)
        q.append(f' {st.total} images were done before the cancel, {dropped} were dropped unlabelled.')
    if info.get("error") or m.get("error"):
        q.append(f' <span id="job-error">{e(info.get("error") or m.get("error"))}</span>')
    q.append("</p>")

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
        if not view.dest:
            q.append('<p class="note" id="no-manifest">No manifest: this job\'s results are kept in Redis (no '
                     'destination); the counts are the parts\'.</p>')
        elif state in ENDED:
            q.append('<p class="note">No manifest: a job that ends this way writes none; the counts are the parts\'.</p>')
        else:
            q.append('<p class="note">No manifest yet: the job has not finished.</p>')
    if st.ok:
        q.append(f'<p>mean top-1 score <span id="mean-score">{st.score_sum / st.ok:.3f}</span> · '
                 f'<span id="n-classes">{len(st.classes)}</span> distinct top-1 classes</p>')

    # label distribution
    top = st.classes.most_common(top_classes)
    labels = [f"{i / SCORE_BINS:.2f}–{(i + 1) / SCORE_BINS:.2f}" for i in range(SCORE_BINS)]
    if st.ok:
        q.append(f"<h2>Top-1 labels (the {len(top)} most frequent of {len(st.classes)})</h2>")
        q.append(svg_bars([(st.names[i], n) for i, n in top], st.ok))
        q.append("<h2>Top-1 score</h2>")
        q.append(svg_columns([float(v) for v in st.score_bins], labels, id="score-chart",
                             aria="histogram of top-1 scores", color="#7a5cc4"))
    else:
        q.append('<h2>Labels</h2><p id="no-labels">No image was labelled: there are no labels or scores to chart.</p>')
    q.append('<table id="score-bins" hidden>' + "".join(
        f'<tr><td>{labels[i]}</td><td data-bin="{i}">{v}</td></tr>' for i, v in enumerate(st.score_bins)) + "</table>")

    # errors
    q.append("<h2>Errors by code</h2>")
    all_codes = dict(st.codes)
    if st.tag_errors:
        all_codes["tag_error"] = st.tag_errors
    if not all_codes and not st.total:
        q.append('<p id="no-records">No records: no image was processed.</p>')
    elif not all_codes:
        q.append('<p id="no-errors">No errors: every image was labelled.</p>')
    else:
        q.append('<table id="errors"><tr><th>code</th><th>images</th><th>examples</th></tr>')
        for code, n in sorted(all_codes.items(), key=lambda kv: -kv[1]):
            ex = st.code_examples.get(code)
            items = "".join(f'<div>{_link(u)}: <small>{e(_message_without(u, msg)[:300])}</small></div>'
                            for u, msg in (ex.items if ex else []))
            q.append(f'<tr><td>{e(code)}</td><td class="n" data-code="{e(code)}">{n}</td><td>{items}</td></tr>')
        q.append("</table>")

    # throughput
    q.append("<h2>Throughput</h2>")
    values, tlabels, rate, span = throughput(st.parts, started)
    if len(st.parts) == 1:
        n1 = st.parts[0][1]
        rate_txt = f", {n1 / (finished - started):.1f} images/s" if finished and started and finished > started else ""
        q.append(f'<p id="one-part">One part ({n1} images{rate_txt}): no chart to draw.</p>')
    elif values:
        q.append(f'<p>{sum(n for _, n in st.parts)} images in {len(st.parts)} parts over {_dur(span)} '
                 f'(<span id="rate">{rate:.1f}</span> images/s overall), from when each part was written</p>')
        q.append("<p><small>images per second</small></p>")
        q.append(svg_columns(values, tlabels, id="throughput-chart", aria="images per second over the job",
                             unit=" img/s"))
    else:
        q.append('<p id="no-parts">No part was written: nothing to chart.</p>' if not st.parts_read
                 else '<p class="note">No part completion times known for this job.</p>')

    # contact sheets
    q.append("<h2>Contact sheets</h2>")
    if thumbs_off:
        q.append('<p class="note" id="thumbs-note">Thumbnails were turned off (--no-thumbnails).</p>')
    elif pillow_missing:
        q.append('<p class="note" id="thumbs-note">Thumbnails are not shown: Pillow is not installed on the '
                 "machine that made this report (pip install pillow, or hardnet-queue[worker]).</p>")
    thumbs = thumbs or {}

    def figure(uri: str, caption: str, tip: str) -> str:
        src, why = thumbs.get(uri, (None, None))
        if src:
            img = f'<img src="{e(src)}" alt="{e(caption)}">'
        else:
            img = f'<div class="ph">{e(why or "no thumbnail")}</div>'
        return f'<figure title="{e(tip)}">{img}<figcaption>{e(caption)}<br>{_link(uri, tip)}</figcaption></figure>'

    for i, n in top[:sheet_classes]:
        res = st.class_examples.get(i)
        q.append(f'<h3>{e(st.names[i])} <small>({n} images)</small></h3><div class="sheet">')
        q.append("".join(figure(u, f"{s:.3f}", tip) for u, s, tip in sorted(res.items if res else [], key=lambda x: -x[1])))
        q.append("</div>")
    low = st.lowest_with_top5()
    if not st.ok:
        q.append('<p id="no-sheets">No image was labelled: no contact sheet.</p>')
    if low:
        q.append(f'<h3>Least confident ({len(low)} lowest top-1 scores)</h3><div class="sheet" id="low-sheet">')
        q.append("".join(figure(u, f"{s:.3f} {label}", tip) for s, u, label, tip in low))
        q.append("</div>")
    q.append(f'<p><small>made by hardnet report at {_fmt_ts(time.time())}</small></p></body></html>')
    return "".join(q)
