"""`hardnet report JOB`: one self-contained HTML page about a job, for people.

    DEST/JOB_ID/report.html      (S3 or a directory; for a job kept in Redis: a local file)

What it shows: a header (state in words, the weights the records say, sources, times), the counts (from the parts, beside the manifest's), the label distribution (the most
frequent top-1 classes as a bar chart), the top-1 score histogram, errors by code with example
URIs, the job's throughput over its life, and contact sheets of thumbnails for the most frequent
classes and for the least confident images.

Built in four steps, one module each: :mod:`.job` (what is known of the job: Redis or its
destination), :mod:`.stats` (every part read once into bounded aggregates, for jobs of millions of
images), :mod:`.thumbnails` (the contact sheets' images) and :mod:`.html` (the page). This module
is the command.
"""
from __future__ import annotations

import argparse
import os

from hnq.console import EXIT_OK, add_command, err
from hnq.storage import open_destination
from producer.args import check_output_file, int_range, job_id
from producer.connect import settings
from producer.report.html import render
from producer.report.job import JobView, open_job
from producer.report.stats import ReportStats, scan
from producer.report.thumbnails import fetch_thumbnails, pillow, thumb_uris


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
    s = settings()
    if a.output:
        check_output_file(a.output)   # before the parts are read, not after
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
    r.add_argument("job", type=job_id, metavar="JOB", help="job id")
    r.add_argument("--out", metavar="DEST", help="the job's destination (needed when Redis no longer knows the job)")
    r.add_argument("-o", "--output", metavar="FILE",
                   help="write the page to this local file instead; unset: DEST/JOB/report.html, or "
                   "./hardnet-report-JOB.html for a job whose results are kept in Redis")
    r.add_argument("--classes", type=int_range("--classes", 1, 1000), default=25, metavar="N", help="bars in the label chart")
    r.add_argument("--sheets", type=int_range("--sheets", 0, 1000), default=6, metavar="N",
                   help="contact sheets for the N most frequent classes")
    r.add_argument("--low", type=int_range("--low", 1, 10_000), default=24, metavar="N", help="least confident images shown")
    r.add_argument("--no-thumbnails", action="store_true",
                   help="fetch no images (the sheets show URIs only)")
