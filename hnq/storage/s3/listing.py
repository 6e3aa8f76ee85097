"""Every listing of S3 in one place: the objects under a prefix as a stream of
:class:`~hnq.objects.SourceObject` (URI, ETag, size, storage class), in one stream or fanned out
over its common prefixes (:func:`list_objects`, the producer's sources); the plain keys under a
prefix (:func:`iter_keys`, a destination's listing); the folders directly under a prefix
(:func:`iter_folders`, inventory report dates).

**Single stream** (``threads=1``): ListObjectsV2 pages one after the other, in the calling
thread. Keys come in S3's order (sorted by UTF-8 bytes). Each page waits for the one before it
(the continuation token), so the rate is one page of up to 1,000 keys per round trip.

**Fanned out** (``threads=N > 1``): the prefix is listed with ``Delimiter='/'``; each common
prefix it holds (a "folder") becomes a unit of its own, down to ``depth`` levels below the given
prefix, and the units at that depth are listed in full (no delimiter). ``N`` threads take units
from a queue and list them at the same time, so up to N round trips are in flight. What a level
holds directly (keys beside its folders) comes with its delimited listing: no key is listed twice.

* **Bounded memory**: the threads hand over whole pages through a queue of at most
  ``queue_pages`` pages (default 2 x N); a thread waits while it is full. What is held is that
  queue, one page per thread and the names of the folders not yet listed (at most the folders
  down to ``depth`` levels: never the keys).
* **Order**: every key under the prefix exactly once, but **not in a fixed order**: pages of
  different folders interleave as the threads finish them (within one folder, keys are in S3's
  order). A job listed this way has the same images, its chunks are cut differently from run to
  run. ``threads=1`` keeps the sorted order.
* **Flat prefixes**: a prefix without folders is one unit, listed as a single stream (splitting
  it by key ranges would need split points that S3 does not give; docs/whole-bucket.md).
* **Too fine a fan-out costs requests**: a folder of 10 keys is one round trip for 10 keys
  where a single stream gets up to 1,000. ``depth`` (default 2) bounds it.
* **Extensions**: a key is kept when its extension is one of ``extensions`` (an
  :class:`hnq.formats.ExtensionFilter`: by default the image extensions of :mod:`hnq.formats`, any
  case; ``any`` keeps every key, also keys without an extension); the filter counts what it left
  out, per extension (the job's ``skipped_by_extension``). Directory markers are never kept nor
  counted.
* **Errors**: a missing bucket, AccessDenied (also on one folder only: the message names it),
  bad credentials -> ConfigError; S3 still failing after boto3's retries -> TransientError. The
  first error stops every thread and is raised to the consumer.
"""
from __future__ import annotations

import logging
import os
import queue
import re
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

from hnq.errors import ConfigError, TransientError
from hnq.formats import ExtensionFilter
from hnq.objects import SourceObject
from hnq.storage.base import clean_etag
from hnq.storage.s3.client import boto3_session, client_config, env_key, s3_client
from hnq.storage.s3.errors import listing_error
from hnq.uris import is_image_name, s3_uri

log = logging.getLogger("hardnet.listing")

_DONE = object()

#: keys per ListObjectsV2 page (S3's maximum is 1000)
LIST_PAGE_SIZE = 1000


@dataclass
class ListingStats:
    """What a listing did (tests and benchmarks read it)."""

    requests: int = 0
    units: int = 0                 # prefixes listed (1 for a single stream)
    keys: int = 0                  # keys emitted (after the filters)
    peak_queued_pages: int = 0     # most pages waiting in the hand-over queue at once
    queue_pages: int = 0           # its bound
    peak_pending_units: int = 0    # most folder names waiting to be listed at once
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


_lc_lock = threading.Lock()
_lc: dict[tuple, object] = {}
_LAST_MODIFIED = re.compile(rb"<LastModified>[^<]*</LastModified>")


def _drop_last_modified(response_dict=None, **_) -> None:
    # botocore turns every <LastModified> into a datetime with dateutil, most of a listing's CPU
    # (figures: docs/whole-bucket.md#4-listing-a-big-prefix-instead). Nothing here reads it.
    body = response_dict.get("body") if response_dict else None
    if isinstance(body, bytes) and b"<LastModified>" in body:
        response_dict["body"] = _LAST_MODIFIED.sub(b"", body)


def listing_client():
    """An S3 client of the process's boto3 session (same credentials, endpoint, retries) that
    parses ListObjectsV2 answers without their LastModified. One per process and environment."""
    session = boto3_session()   # a new one after reset_s3_client() (new credentials)
    key = (os.getpid(), env_key(), id(session))
    c = _lc.get(key)
    if c is None:
        with _lc_lock:
            c = _lc.get(key)
            if c is None:
                c = session.client("s3", config=client_config())
                c.meta.events.register("before-parse.s3.ListObjectsV2", _drop_last_modified)
                _lc.clear()
                _lc[key] = c
    return c


def iter_keys(bucket: str, prefix: str = "", *, recursive: bool = True,
              images_only: bool = True, page_size: int | None = None) -> Iterator[str]:
    """Stream the keys under ``prefix`` page by page (ListObjectsV2), skipping directory markers
    (keys ending in ``/``) and, with ``images_only``, non-image keys. ``recursive=False`` lists
    only the keys directly under ``prefix`` (delimiter ``/``). Missing bucket / no access ->
    ConfigError."""
    paginator = s3_client().get_paginator("list_objects_v2")
    kwargs = {"Bucket": bucket, "Prefix": prefix,
              "PaginationConfig": {"PageSize": page_size or LIST_PAGE_SIZE}}
    if not recursive:
        kwargs["Delimiter"] = "/"
    try:
        for page in paginator.paginate(**kwargs):
            for obj in page.get("Contents", ()) or ():
                key = obj["Key"]
                if key.endswith("/"):
                    continue
                if images_only and not is_image_name(key):
                    continue
                yield key
    except (ConfigError, TransientError):
        raise
    except Exception as e:  # noqa: BLE001
        raise listing_error(e, bucket, prefix) from None


def iter_folders(bucket: str, prefix: str) -> Iterator[str]:
    """The names of the folders (common prefixes) directly under ``prefix`` (which ends in ``/``
    or is empty), without ``prefix`` and the trailing ``/``, in S3's order. Errors as
    :func:`iter_keys`."""
    try:
        for page in s3_client().get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix, Delimiter="/"):
            for cp in page.get("CommonPrefixes") or ():
                yield cp["Prefix"][len(prefix):].rstrip("/")
    except (ConfigError, TransientError):
        raise
    except Exception as e:  # noqa: BLE001
        raise listing_error(e, bucket, prefix) from None


def _next_page(resp: dict, bucket: str, prefix: str) -> str | None:
    """The continuation token of a ListObjectsV2 page, None after the last page."""
    if not resp.get("IsTruncated"):
        return None
    token = resp.get("NextContinuationToken")
    if not token:
        raise TransientError(f"s3://{bucket}/{prefix}: S3 said the listing is truncated but gave "
                             "no continuation token")
    return token


def _objects(bucket: str, contents, keep: ExtensionFilter | None) -> list[SourceObject]:
    out = []
    for obj in contents or ():
        key = obj["Key"]
        if key.endswith("/") or (keep is not None and not keep.keep(key)):
            continue
        out.append(SourceObject(s3_uri(bucket, key), etag=clean_etag(obj.get("ETag")), size=obj.get("Size"),
                                storage_class=obj.get("StorageClass")))
    return out


def list_objects(bucket: str, prefix: str = "", *, threads: int = 1, depth: int = 2,
                 images_only: bool = True, recursive: bool = True, page_size: int | None = None,
                 queue_pages: int | None = None, stats: ListingStats | None = None,
                 extensions: ExtensionFilter | None = None) -> Iterator[SourceObject]:
    """Stream the objects under ``s3://bucket/prefix`` (see the module doc). ``recursive=False``:
    only the keys directly under ``prefix`` (one delimited stream). ``extensions``: which keys are
    kept (and the count of those left out); unset: the image extensions, or with
    ``images_only=False`` every key."""
    if threads < 1:
        raise ConfigError(f"listing threads must be >= 1, not {threads}")
    if depth < 0:
        raise ConfigError(f"listing depth must be >= 0, not {depth}")
    stats = stats if stats is not None else ListingStats()
    page_size = page_size or LIST_PAGE_SIZE
    keep = extensions if extensions is not None else (ExtensionFilter() if images_only else None)
    if keep is not None and keep.takes_all:
        keep = None
    if threads == 1 or not recursive:
        yield from _single(bucket, prefix, recursive, keep, page_size, stats)
    else:
        yield from _Parallel(bucket, prefix, threads, depth, keep, page_size,
                             queue_pages or 2 * threads, stats).run()


def _single(bucket, prefix, recursive, keep, page_size, stats) -> Iterator[SourceObject]:
    kwargs = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": page_size}
    if not recursive:
        kwargs["Delimiter"] = "/"
    stats.units = 1
    client = listing_client()
    token = None
    while True:
        try:
            resp = client.list_objects_v2(**kwargs, **({"ContinuationToken": token} if token else {}))
        except Exception as e:  # noqa: BLE001 - mapped
            raise listing_error(e, bucket, prefix) from None
        stats.requests += 1
        objs = _objects(bucket, resp.get("Contents"), keep)
        stats.keys += len(objs)
        yield from objs
        token = _next_page(resp, bucket, prefix)
        if token is None:
            return


class _Parallel:
    def __init__(self, bucket, prefix, threads, depth, keep, page_size, queue_pages, stats):
        self.bucket, self.prefix, self.depth = bucket, prefix, depth
        self.keep, self.page_size = keep, page_size
        self.n = threads
        self.stats = stats
        stats.queue_pages = queue_pages
        self.out: queue.Queue = queue.Queue(maxsize=queue_pages)
        self.cv = threading.Condition()
        self.work: deque[tuple[str, int]] = deque([(prefix, 0)])
        self.pending = 1          # units queued or being listed
        self.stop = threading.Event()

    def run(self) -> Iterator[SourceObject]:
        ts = [threading.Thread(target=self._thread, name=f"hardnet-list-{i}", daemon=True)
              for i in range(self.n)]
        for t in ts:
            t.start()
        try:
            while True:
                item = self.out.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                self.stats.keys += len(item)
                yield from item
        finally:
            self.stop.set()
            with self.cv:
                self.cv.notify_all()
            for t in ts:   # each finishes its request in flight (boto3 timeouts bound it)
                t.join(timeout=30)

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.out.put(item, timeout=0.2)
            except queue.Full:
                continue
            with self.stats._lock:
                self.stats.peak_queued_pages = max(self.stats.peak_queued_pages, self.out.qsize())
            return True
        return False

    def _thread(self) -> None:
        client = listing_client()
        while True:
            with self.cv:
                while not self.work and self.pending > 0 and not self.stop.is_set():
                    self.cv.wait()
                if self.stop.is_set() or not self.work:
                    return
                prefix, level = self.work.popleft()
            try:
                self._unit(client, prefix, level)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                if not isinstance(e, (ConfigError, TransientError)):
                    e = listing_error(e, self.bucket, prefix)
                self._put(e)
                self.stop.set()
                with self.cv:
                    self.cv.notify_all()
                return
            with self.cv:
                self.pending -= 1
                last = self.pending == 0
                if last:
                    self.cv.notify_all()
            if last:
                self._put(_DONE)
                return

    def _unit(self, client, prefix: str, level: int) -> None:
        kwargs = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": self.page_size}
        if level < self.depth:
            kwargs["Delimiter"] = "/"
        with self.stats._lock:
            self.stats.units += 1
        token = None
        while not self.stop.is_set():
            resp = client.list_objects_v2(**kwargs, **({"ContinuationToken": token} if token else {}))
            with self.stats._lock:
                self.stats.requests += 1
            folders = [cp["Prefix"] for cp in resp.get("CommonPrefixes") or () if cp.get("Prefix")]
            if folders:
                with self.cv:
                    self.work.extend((f, level + 1) for f in folders)
                    self.pending += len(folders)
                    self.stats.peak_pending_units = max(self.stats.peak_pending_units, len(self.work))
                    self.cv.notify(len(folders))
            objs = _objects(self.bucket, resp.get("Contents"), self.keep)
            if objs and not self._put(objs):
                return
            token = _next_page(resp, self.bucket, prefix)
            if token is None:
                return
