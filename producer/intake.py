"""What ``hardnet submit`` reads its images from: SOURCE arguments (listed with
``--list-threads`` / ``--list-depth``), ``--from-file``, ``--inventory`` reports, the
``--extensions`` a listing keeps (:class:`hnq.formats.ExtensionFilter`, which counts what it
skips for the manifest's ``skipped_by_extension``), and the ``--skip-labelled`` / ``--since``
filter over all of them (:mod:`producer.incremental`)."""
from __future__ import annotations

import argparse
from typing import Iterator

from hnq.console import err
from hnq.errors import ConfigError
from hnq.formats import ExtensionFilter
from hnq.storage import open_destination, validate_destination
from producer.incremental import SkipLabelled, find_base
from hnq.storage.s3.inventory import InventoryStats, iter_inventory, open_report
from producer.args import extensions_arg
from producer.settings import ProducerSettings
from hnq.sources import check_sources, check_uri_list, expand_sources, read_uri_list


class Intake:
    """The sources, checked on creation before anything exists: the SOURCE arguments' form and
    local paths (:func:`hnq.sources.check_sources`), the whole --from-file (UTF-8; s3:// only with
    ``tag``: :func:`hnq.sources.check_uri_list`), then the inventory reports (read) and the
    --skip-labelled base (which may write an earlier job's index)."""

    def __init__(self, s: ProducerSettings, a: argparse.Namespace, model: str, tag: bool = False):
        self.a = a
        self.threads = a.list_threads if a.list_threads is not None else s.list_threads
        self.depth = a.list_depth if a.list_depth is not None else s.list_depth
        if self.threads < 1:
            raise ConfigError(f"--list-threads must be at least 1, not {self.threads}")
        if self.depth < 0:
            raise ConfigError(f"--list-depth must be at least 0, not {self.depth}")
        self.tmpdir = str(s.spool_dir) if s.spool_dir else None
        # what listings, directory walks and inventory reports keep; counts what they skip
        try:
            self.extensions = ExtensionFilter.of(getattr(a, "extensions", None))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        check_sources(a.sources)
        # read whole now: a non-UTF-8 byte on its last line stops the submit before the job exists
        self.uri_list = (check_uri_list(a.from_file, tmpdir=self.tmpdir, require_s3=tag)
                         if a.from_file else None)
        # resolved now: a missing report fails before a job exists, and the job records which one
        self.reports = [open_report(m) for m in (a.inventory or [])]
        self.sources = (list(a.sources) + ([f"@{a.from_file}"] if a.from_file else [])
                        + [f"inventory:{r.uri}" for r in self.reports])
        self.inventory_stats: list[InventoryStats] = []
        self.skip: SkipLabelled | None = None
        self.index = bool(getattr(a, "index", False))
        if a.skip_labelled or a.since:
            if not a.out:
                raise ConfigError("--skip-labelled / --since need --out DEST: the earlier jobs are "
                                  "looked for there")
            d = open_destination(validate_destination(a.out))
            base = find_base(d, model=model, sources=self.sources, since=a.since, tmpdir=self.tmpdir)
            if base is None:
                err(f"--skip-labelled: no earlier job under {d.dest} with model {model} and these sources: "
                    "every object is labelled (this job's index serves the next run)")
            else:
                err(f"--skip-labelled: objects labelled by job {base.job_id} or the jobs its index covers "
                    f"({base.meta['count']} objects{', index just built from its parts' if base.built else ''}) "
                    "are skipped")
            self.skip = SkipLabelled(base, self.tmpdir)
            self.index = True

    def items(self) -> Iterator[str]:
        a = self.a
        if a.sources:
            yield from expand_sources(a.sources, list_threads=self.threads, list_depth=self.depth,
                                      extensions=self.extensions)
        if self.uri_list is not None:
            yield from read_uri_list(self.uri_list, extensions=self.extensions)
        for r in self.reports:
            st = InventoryStats()
            self.inventory_stats.append(st)
            yield from iter_inventory(r, tmpdir=self.tmpdir, stats=st, extensions=self.extensions)

    def report(self, job) -> None:
        for st in self.inventory_stats:
            err(st.line())
        if self.extensions.line():
            err(f"job {job.job_id}: {self.extensions.line()}")
        if self.skip is not None and self.skip.base is not None:
            err(f"job {job.job_id}: {self.skip.skipped} objects skipped (labelled before), "
                f"{job.total} to label")


def intake(s: ProducerSettings, a: argparse.Namespace, *, model: str, tag: bool = False) -> Intake:
    return Intake(s, a, model, tag)


def add_arguments(s: argparse.ArgumentParser) -> None:
    """The intake options of `hardnet submit` that no other module reads (``--extensions``)."""
    s.add_argument("--extensions", type=extensions_arg, metavar="any|LIST",
                   help="which files and keys a directory walk, an s3:// prefix listing and an "
                   "inventory report keep: 'any' (every key, also keys without an extension; one "
                   "that is not an image gets a decode_error record) or a comma-separated list such "
                   "as jpg,png,heic (any case); unset: every extension the workers decode "
                   "(docs/output.md). What is skipped is counted: skipped_by_extension")
