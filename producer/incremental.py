"""Label only what is new: ``hardnet submit SOURCE --out DEST --skip-labelled`` (or ``--since JOB``).

An object is *labelled* when an earlier job under DEST has an ok record for the same URI and the
same ETag (an overwritten object has another ETag and is labelled again). Such objects are not
fetched; the new job's manifest counts them as ``skipped`` and points at the records it reuses
(``reused: [{job, parts, records}]``), and ``hardnet status`` shows the count.

**Which earlier job** (the *base*): ``--since JOB``, or for ``--skip-labelled`` the latest job
under DEST (job ids sort by submit time) that has a manifest, the same model and the same sources
(an inventory report counts as the same source from one delivery to the next). Indexes are
cumulative (:mod:`hnq.jobs.index`), so the base's index covers every earlier run of the same nightly
command. No base: everything is labelled (the first run), and the job gets an index for the next.

**Bounded memory**: the ETags come with the listing (ListObjectsV2 and inventory reports carry
them: no HEAD). Objects with an ETag are spooled to local temporary files (gzip), in 256 buckets
by the hash that shards the index; then bucket by bucket, the matching shard of the base's index
(about :data:`hnq.jobs.index.SHARD_TARGET` entries) is loaded and the bucket streamed past it. What is
held: one shard, one bucket's reused rows (compressed), the names of the parts reused. Objects
without an ETag (local files, http URLs, ``--from-file`` lines) go straight through, unspooled.
Listing and filtering end before the first chunk is sent (the spool must be complete).

A base without an index (submitted before indexes existed, or without ``--index``) has one built
from its parts first (and written, for the next run).
"""
from __future__ import annotations

import gzip
import io
import json
import logging
import os
import shutil
import tempfile
import zlib
from typing import Iterable, Iterator

from hnq.errors import ConfigError
from hnq.jobs.index import (REUSE_BITS, SUMMARY_PATH, IndexReader, ensure_index, reused_path, top_bits,
                       uri_hash)
from hnq.objects import SourceObject
from hnq.schema import FINAL_STATES
from hnq.storage import Destination, S3Destination
from hnq.storage.s3.client import s3_client
from hnq.storage.s3.errors import listing_error as _listing_error
from hnq.storage.s3.inventory import identity

log = logging.getLogger("hardnet.incremental")



def job_dirs(d: Destination) -> list[str]:
    """The job folders directly under a destination, sorted (= by submit time)."""
    if isinstance(d, S3Destination):
        out = []
        try:
            for page in s3_client().get_paginator("list_objects_v2").paginate(
                    Bucket=d.bucket, Prefix=d.prefix, Delimiter="/"):
                out += [cp["Prefix"][len(d.prefix):].rstrip("/") for cp in page.get("CommonPrefixes") or ()]
        except Exception as e:  # noqa: BLE001
            raise _listing_error(e, d.bucket, d.prefix) from None
        return sorted(out)
    root = getattr(d, "root", None)
    try:
        return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    except FileNotFoundError:
        return []


def _json(d: Destination, relpath: str) -> dict | None:
    data = d.get(relpath)
    if data is None:
        return None
    try:
        v = json.loads(data)
    except ValueError:
        return None
    return v if isinstance(v, dict) else None


class Base:
    """The earlier job whose index decides what is skipped."""

    def __init__(self, d: Destination, job_id: str, meta: dict, built: bool):
        self.job_id, self.meta, self.built = job_id, meta, built
        self.reader = IndexReader(d, job_id, meta)


def find_base(d: Destination, *, model: str, sources: list[str], since: str | None = None,
              tmpdir: str | None = None) -> Base | None:
    """The base job (see the module doc), its index built first if it has none; None when there
    is none (``--skip-labelled`` only: ``--since`` names a job, which must exist)."""
    if since:
        desc = _json(d, f"{since}/job.json")
        manifest = _json(d, f"{since}/manifest.json")
        if desc is None and manifest is None:
            raise ConfigError(f"--since {since}: no such job under {d.dest} (no {since}/job.json or "
                              f"{since}/manifest.json)")
        got = (manifest or desc).get("model")
        if got and got != model:
            raise ConfigError(f"--since {since}: that job labelled with {got}, this one uses {model}; "
                              "its labels are not this model's")
        if manifest is None:
            log.warning("--since %s: that job has no manifest yet (not finished): only the parts it "
                        "has written count", since)
        return _open(d, since, manifest, tmpdir)
    want = [identity(s) for s in sources]
    for job in reversed(job_dirs(d)):
        manifest = _json(d, f"{job}/manifest.json")
        if manifest is None or manifest.get("state") not in FINAL_STATES:
            continue
        if manifest.get("model") != model or [identity(s) for s in manifest.get("sources", [])] != want:
            continue
        return _open(d, job, manifest, tmpdir)
    return None


def _open(d: Destination, job: str, manifest: dict | None, tmpdir: str | None) -> Base:
    estimate = None
    if manifest:
        estimate = int(manifest.get("succeeded", 0)) + int(manifest.get("skipped", 0))
    meta, built = ensure_index(d, job, estimate=estimate, tmpdir=tmpdir)
    if built:
        log.warning("job %s had no index: built it from its parts (%d labelled objects)", job, meta["count"])
    return Base(d, job, meta, built)


class _GzRows:
    """JSON rows gzip-compressed as they come (a bucket's reused rows, held compressed)."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.z = zlib.compressobj(6, zlib.DEFLATED, 31)
        self.n = 0

    def add(self, row: list) -> None:
        self.buf.write(self.z.compress((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8", "surrogatepass")))
        self.n += 1

    def close(self) -> bytes:
        self.buf.write(self.z.flush())
        return self.buf.getvalue()


class _Spool:
    """Objects spooled to one gzip file per bucket (the top REUSE_BITS bits of the URI hash)."""

    def __init__(self, tmpdir: str | None):
        self.dir = tempfile.mkdtemp(prefix="hardnet-spool-", dir=tmpdir)
        self.files: dict[int, tuple] = {}
        self.count = 0

    def add(self, obj: SourceObject) -> None:
        b = top_bits(uri_hash(str(obj)), REUSE_BITS)
        w = self.files.get(b)
        if w is None:
            # a 1 KB window and memLevel 3: 256 of these open at once cost ~3.5 MB (the defaults: 64)
            w = (open(os.path.join(self.dir, f"{b:02x}.gz"), "wb", buffering=4096),
                 zlib.compressobj(1, zlib.DEFLATED, 16 + 10, 3))
            self.files[b] = w
        w[0].write(w[1].compress((json.dumps(obj.to_row(), ensure_ascii=False) + "\n").encode("utf-8", "surrogatepass")))
        self.count += 1

    def close_writers(self) -> None:
        for f, z in self.files.values():
            f.write(z.flush())
            f.close()

    def buckets(self) -> list[int]:
        return sorted(self.files)

    def read(self, b: int) -> Iterator[SourceObject]:
        with gzip.open(os.path.join(self.dir, f"{b:02x}.gz"), "rt", encoding="utf-8",
                       errors="surrogatepass") as f:
            for line in f:
                yield SourceObject.from_row(json.loads(line))

    def cleanup(self) -> None:
        for f, _ in self.files.values():
            if not f.closed:
                f.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class SkipLabelled:
    """The filter of one submit: ``filter(items)`` streams what must be labelled and writes the
    job's reused rows; ``skipped`` and :meth:`summary` say what was left out."""

    def __init__(self, base: Base | None, tmpdir: str | None = None):
        self.base = base
        self.tmpdir = tmpdir
        self.d: Destination | None = None
        self.job_id: str | None = None
        self.skipped = 0
        self.spooled = 0
        self.passed_unspooled = 0
        self._reused: dict[str, dict] = {}   # job -> {"parts": set, "records": n}

    def start(self, d: Destination, job_id: str) -> None:
        self.d, self.job_id = d, job_id

    def filter(self, items: Iterable[str]) -> Iterator[str]:
        assert self.d is not None and self.job_id is not None, "start() first"
        if self.base is None:
            yield from items
            return
        spool = _Spool(self.tmpdir)
        try:
            for it in items:
                if isinstance(it, SourceObject) and it.etag:
                    spool.add(it)
                else:
                    self.passed_unspooled += 1
                    yield it
            spool.close_writers()
            self.spooled = spool.count
            for b in spool.buckets():
                yield from self._bucket(spool, b)
        finally:
            spool.cleanup()

    def _bucket(self, spool: _Spool, b: int) -> Iterator[SourceObject]:
        reader = self.base.reader
        bits = reader.bits
        out = _GzRows()
        if bits <= REUSE_BITS:
            groups = [(b >> (REUSE_BITS - bits), None)]
        else:   # finer shards than buckets: one pass over the bucket per shard in it
            sub = bits - REUSE_BITS
            groups = [((b << sub) | j, bits) for j in range(1 << sub)]
        for shard, only_bits in groups:
            table = reader.shard(shard)
            for obj in spool.read(b):
                if only_bits is not None and top_bits(uri_hash(str(obj)), only_bits) != shard:
                    continue
                hit = table.get(str(obj))
                if hit is not None and hit[0] == obj.etag:
                    etag, job, part = hit
                    self.skipped += 1
                    r = self._reused.setdefault(job, {"parts": set(), "records": 0})
                    r["parts"].add(part)
                    r["records"] += 1
                    out.add([str(obj), etag, job, part])
                else:
                    yield obj
        if out.n:
            self.d.put(reused_path(self.job_id, b), out.close(), content_type="application/gzip")

    def reused(self) -> list[dict]:
        return [{"job": j, "records": r["records"], "parts": sorted(r["parts"])}
                for j, r in sorted(self._reused.items())]

    def summary(self) -> dict:
        return {"base": self.base.job_id if self.base else None, "skipped": self.skipped,
                "reused": self.reused()}

    def finish(self) -> dict:
        """Write DEST/JOB/reused/summary.json (what the manifest's ``reused`` is read from)."""
        s = self.summary()
        self.d.put(f"{self.job_id}/{SUMMARY_PATH}", json.dumps(s, indent=1).encode())
        return s
