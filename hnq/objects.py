"""What a listing or an inventory report says about a source object beyond its URI, and the
*precoded* entries of a chunk's stored inputs: objects whose record is decided before any fetch.

:class:`SourceObject` is a ``str`` (the URI), so everything that streams URIs takes it as one; it
also carries the object's ETag, size and storage class when the source gave them (S3 listings and
inventory reports do). The producer uses them to

* not fetch what cannot or need not be fetched, and still give it a record: an object in an
  archive storage class (``GLACIER``, ``DEEP_ARCHIVE``, or ``INTELLIGENT_TIERING`` in its Archive
  Access / Deep Archive Access tier: a GET fails with InvalidObjectState until it is restored) gets
  an ``archived`` error record, a 0-byte object an ``empty`` one. ``GLACIER_IR`` (Instant
  Retrieval) is read like any other class.
* skip objects labelled by an earlier job (``--skip-labelled``: same key, same ETag).

A chunk's stored inputs (:mod:`hnq.jobs.inputs`) hold one JSON value per line: a URI string for an
object to fetch (unchanged from before), or for a precoded one an object::

    {"uri": "s3://b/k.jpg", "code": "archived", "message": "...", "etag": "...", "size": 123}

The worker writes that record as it stands, without fetching, in its place among the chunk's
records; it counts as a failed image with its code like every other error record, so the part,
the job's counts, ``hardnet status`` and the manifest stay one record per input. Workers older
than this module refuse such inputs (ConfigError: the chunk is dead-lettered, and ``hardnet
redrive`` sends it again once they are upgraded): upgrade workers before producers.
"""
from __future__ import annotations

from typing import Callable

from hnq.errors import ConfigError, ErrorCode
from hnq.schema import ResultRecord

#: storage classes whose objects must be restored before a GET (GLACIER_IR is not one of them)
ARCHIVE_CLASSES = frozenset({"GLACIER", "DEEP_ARCHIVE"})
#: Intelligent-Tiering access tiers that need a restore (ARCHIVE_INSTANT_ACCESS does not)
ARCHIVE_TIERS = frozenset({"ARCHIVE_ACCESS", "DEEP_ARCHIVE_ACCESS"})
#: codes a precoded entry may carry
PRECODED_CODES = frozenset({ErrorCode.archived.value, ErrorCode.empty.value})


class SourceObject(str):
    """An object's URI (the ``str`` value) with what its listing said about it (None: unknown)."""

    etag: str | None
    size: int | None
    storage_class: str | None
    access_tier: str | None

    def __new__(cls, uri: str, etag: str | None = None, size: int | None = None,
                storage_class: str | None = None, access_tier: str | None = None) -> "SourceObject":
        self = super().__new__(cls, uri)
        self.etag = etag or None
        self.size = size
        self.storage_class = (storage_class or None) and storage_class.upper()
        self.access_tier = (access_tier or None) and access_tier.upper()
        return self

    def precoded(self) -> tuple[ErrorCode, str] | None:
        """(code, message) of the record this object gets without a fetch, or None: fetch it."""
        sc, tier = self.storage_class, self.access_tier
        if sc in ARCHIVE_CLASSES:
            return ErrorCode.archived, (f"{self}: not fetched: the object is in the {sc} storage class "
                                        "(archived); restore it (or copy it to an instant-access "
                                        "class) and submit it again")
        if sc == "INTELLIGENT_TIERING" and tier in ARCHIVE_TIERS:
            return ErrorCode.archived, (f"{self}: not fetched: the object is in the {tier} tier of "
                                        "INTELLIGENT_TIERING (archived); restore it and submit it again")
        if self.size == 0:
            return ErrorCode.empty, f"{self}: not fetched: the listing says the object is 0 bytes"
        return None

    # the spool of --skip-labelled keeps objects as JSON rows
    def to_row(self) -> list:
        return [str(self), self.etag, self.size, self.storage_class, self.access_tier]

    @classmethod
    def from_row(cls, row: list) -> "SourceObject":
        return cls(*row)

    def __reduce__(self):
        return (SourceObject, tuple(self.to_row()))


def to_entry(item: str) -> str | dict:
    """The chunk-input entry of a source item: the URI, or the precoded record's entry."""
    if isinstance(item, SourceObject):
        pre = item.precoded()
        if pre is None:
            return str(item)
        entry = {"uri": str(item), "code": pre[0].value, "message": pre[1]}
        if item.etag:
            entry["etag"] = item.etag
        if item.size is not None:
            entry["size"] = item.size
        return entry
    return item


def entry_uri(entry: str | dict) -> str:
    return entry if isinstance(entry, str) else entry["uri"]


def check_entry(entry) -> None:
    """ConfigError unless ``entry`` is a URI string or a well-formed precoded entry."""
    if isinstance(entry, str):
        return
    if (not isinstance(entry, dict) or not isinstance(entry.get("uri"), str)
            or entry.get("code") not in PRECODED_CODES or not isinstance(entry.get("message"), str)
            or not set(entry) <= {"uri", "code", "message", "etag", "size"}
            or not isinstance(entry.get("etag", ""), str)
            or not isinstance(entry.get("size", 0), int)):
        raise ConfigError("stored chunk inputs hold an entry that is neither a URI string nor a "
                          f"precoded record: {str(entry)[:200]}")


def precoded_record(entry: dict, model: str, job_id: str | None, weights: str | None = None):
    return ResultRecord.failure(entry["uri"], entry["code"], entry["message"], model, job_id=job_id,
                                weights=weights, etag=entry.get("etag"), size=entry.get("size"))


def with_precoded(entries: list, model: str, job_id: str | None,
                  label: Callable[[list[str]], list | None], weights: str | None = None) -> list | None:
    """One record per entry, in order: ``label(uris)`` makes the records of the entries to fetch
    (None = the chunk was dropped, passed on); precoded entries get theirs without a fetch (with
    ``weights``, the worker's, like its other records)."""
    uris = [e for e in entries if isinstance(e, str)]
    fetched = label(uris) if uris else []
    if fetched is None:
        return None
    if len(uris) == len(entries):
        return fetched
    it = iter(fetched)
    return [next(it) if isinstance(e, str) else precoded_record(e, model, job_id, weights) for e in entries]
