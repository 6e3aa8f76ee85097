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

from collections import Counter
from collections.abc import Sequence
from json.encoder import encode_basestring as _jstr   # json.dumps' string escaping (ensure_ascii=False)
from typing import Callable

from hnq.errors import ConfigError, ErrorCode
from hnq.logs import redact, redact_uri
from hnq.schema import RecordError, ResultRecord

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


_ENTRY_KEYS = frozenset({"uri", "code", "message", "etag", "size"})


def check_entry(entry) -> None:
    """ConfigError unless ``entry`` is a URI string or a well-formed precoded entry."""
    if isinstance(entry, str):
        return
    if isinstance(entry, dict):
        get = entry.get
        code = get("code")
        if (isinstance(get("uri"), str) and isinstance(code, str) and code in PRECODED_CODES
                and isinstance(get("message"), str) and entry.keys() <= _ENTRY_KEYS
                and isinstance(get("etag", ""), str) and isinstance(get("size", 0), int)):
            return
    raise ConfigError("stored chunk inputs hold an entry that is neither a URI string nor a "
                      f"precoded record: {str(entry)[:200]}")


def check_entries(entries: list) -> None:
    """:func:`check_entry` of every entry; a URI string or the producer's own entry of an
    archived object (every key, plain types) is accepted without a call."""
    keys, codes = _ENTRY_KEYS, PRECODED_CODES
    for e in entries:
        if type(e) is str:
            continue
        if (type(e) is dict and e.keys() == keys and type(e["uri"]) is str and type(e["message"]) is str
                and type(e["etag"]) is str and type(e["size"]) is int and type(e["code"]) is str
                and e["code"] in codes):
            continue
        check_entry(e)


# --- a precoded entry's record, without pydantic's validation --------------------------------
# A chunk of archived objects is all precoded records: validating each through pydantic (two
# models and their validators) was the largest part of a worker's cost per record
# (benchmarks/bench_job_core.py). The values are checked here instead, as the models' validators
# would (the same redaction of the URI and the message); anything unusual (a value of another
# type) goes through the validating constructor, which decides as before.
_CODES = {c: ErrorCode(c) for c in PRECODED_CODES}
_PRECODED_SET = frozenset({"uri", "status", "error", "model", "job_id", "weights", "etag", "size"})
_ERROR_SET = frozenset({"code", "message"})
_setattr = object.__setattr__


def _trusted(cls, values: dict, fields_set: frozenset):
    """A model instance of already checked ``values`` (every field, in declaration order), as
    pydantic's ``model_construct`` makes one, without its per-field loop."""
    m = cls.__new__(cls)
    _setattr(m, "__dict__", values)
    _setattr(m, "__pydantic_fields_set__", set(fields_set))
    _setattr(m, "__pydantic_extra__", None)
    _setattr(m, "__pydantic_private__", None)
    return m


def _validated_record(entry: dict, model: str, job_id: str | None, weights: str | None) -> ResultRecord:
    return ResultRecord.failure(entry["uri"], entry["code"], entry["message"], model, job_id=job_id,
                                weights=weights, etag=entry.get("etag"), size=entry.get("size"))


def _fast_record(entry: dict, model: str, job_id: str | None, weights: str | None) -> ResultRecord:
    uri, message, code = entry["uri"], entry["message"], _CODES.get(entry["code"])
    etag, size = entry.get("etag"), entry.get("size")
    if (type(uri) is not str or type(message) is not str or code is None or type(model) is not str
            or (etag is not None and type(etag) is not str) or (size is not None and type(size) is not int)
            or (job_id is not None and type(job_id) is not str)
            or (weights is not None and type(weights) is not str)):
        return _validated_record(entry, model, job_id, weights)
    err = _trusted(RecordError, {"code": code, "message": redact(message)}, _ERROR_SET)
    return _trusted(ResultRecord, {"uri": redact_uri(uri), "status": "error", "top5": None, "topk": None,
                                   "error": err, "tag_error": None, "model": model, "weights": weights,
                                   "job_id": job_id, "etag": etag, "size": size}, _PRECODED_SET)


def _fast_path_agrees() -> bool:
    """Whether :func:`_fast_record` makes what the validating constructor makes with this pydantic
    (checked once, at import: a pydantic whose models keep other state gets the validated path)."""
    e = {"uri": "s3://b/k.jpg", "code": "archived", "message": "m", "etag": "e", "size": 1}
    try:
        a, b = _fast_record(e, "hardnet68", "j", "random"), _validated_record(e, "hardnet68", "j", "random")
        return (a == b and a.__dict__ == b.__dict__ and a.__pydantic_fields_set__ == b.__pydantic_fields_set__
                and a.error.__dict__ == b.error.__dict__ and a.to_json() == b.to_json()
                and type(a) is type(b))
    except Exception:  # noqa: BLE001 - pydantic internals changed: the validated path
        return False


_FAST = _fast_path_agrees()


def precoded_record(entry: dict, model: str, job_id: str | None, weights: str | None = None) -> ResultRecord:
    """The record of a precoded entry (checked by :func:`check_entry`): the same record as
    ``ResultRecord.failure`` makes (tests/unit/test_objects.py compares them)."""
    if _FAST:
        return _fast_record(entry, model, job_id, weights)
    return _validated_record(entry, model, job_id, weights)


class PrecodedRecords(Sequence):
    """The records of a chunk whose entries are all precoded (a chunk of archived objects), as a
    sequence of :class:`ResultRecord` made only when one is read (:func:`precoded_record`); what a
    chunk does with all of them — its JSON Lines part (:meth:`jsonl`), its counts (:meth:`codes`,
    :meth:`tally`) — is made from the entries directly, without a model object per record, so a
    chunk of archived objects costs its worker a few microseconds per record
    (benchmarks/bench_job_core.py). Every record is an error record without labels: the job's
    top-k naming and ``--tag`` leave them as they are."""

    def __init__(self, entries: list, model: str, job_id: str | None, weights: str | None):
        self.entries, self.model, self.job_id, self.weights = entries, model, job_id, weights
        self._records: list | None = None
        self._codes: Counter | None = None

    @classmethod
    def of(cls, entries: list, model: str, job_id: str | None, weights: str | None) -> "PrecodedRecords | None":
        """The records of ``entries`` (precoded, checked by :func:`check_entry`), or None when one
        of the values is of a type the direct encoding does not write (then the validated records)."""
        if not _FAST or type(model) is not str or (job_id is not None and type(job_id) is not str) or (
                weights is not None and type(weights) is not str):
            return None
        for e in entries:
            if type(e) is not dict:
                return None
            etag, size = e.get("etag"), e.get("size")
            if (type(e["uri"]) is not str or type(e["message"]) is not str
                    or (etag is not None and type(etag) is not str) or (size is not None and type(size) is not int)):
                return None
        return cls(entries, model, job_id, weights)

    def _all(self) -> list:
        if self._records is None:
            self._records = [_fast_record(e, self.model, self.job_id, self.weights) for e in self.entries]
        return self._records

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i):
        return self._all()[i]

    def __iter__(self):
        return iter(self._all())

    def jsonl(self) -> bytes:
        """The part's JSON Lines: the bytes hnq.jobs.parts.to_jsonl writes for these records
        (tests/unit/test_objects.py compares them)."""
        tail = f'}},"model":{_jstr(self.model)}'
        for name, v in (("weights", self.weights), ("job_id", self.job_id)):
            if v is not None:
                tail += f',"{name}":{_jstr(v)}'
        mid = {c: f',"status":"error","error":{{"code":{_jstr(c)},"message":' for c in PRECODED_CODES}
        lines = []
        add = lines.append
        for e in self.entries:
            uri, msg = e["uri"], e["message"]
            if not uri.startswith("s3://"):     # an s3:// URI is its key, never redacted
                uri = redact_uri(uri)
            if "=" in msg or ("@" in msg and "://" in msg):    # what redact() looks at first
                msg = redact(msg)
            line = f'{{"uri":{_jstr(uri)}{mid[e["code"]]}{_jstr(msg)}{tail}'
            etag = e.get("etag")
            if etag is not None:
                line += f',"etag":{_jstr(etag)}'
            size = e.get("size")
            add(f'{line}}}\n' if size is None else f'{line},"size":{size}}}\n')
        try:
            return "".join(lines).encode()
        except UnicodeEncodeError:     # a lone surrogate: what pydantic's serialiser makes of it
            return "".join(r.to_json() + "\n" for r in self).encode()

    def codes(self) -> Counter:
        """Records per error code."""
        if self._codes is None:
            self._codes = Counter(e["code"] for e in self.entries)
        return Counter(self._codes)

    def tally(self) -> dict[tuple[str, str, str], int]:
        """Records per (model, status, code), as worker.metrics counts them."""
        return {(self.model, "error", c): n for c, n in self.codes().items()}


def with_precoded(entries: list, model: str, job_id: str | None,
                  label: Callable[[list[str]], list | None], weights: str | None = None) -> Sequence | None:
    """One record per entry, in order: ``label(uris)`` makes the records of the entries to fetch
    (None = the chunk was dropped, passed on); precoded entries get theirs without a fetch (with
    ``weights``, the worker's, like its other records). A chunk of precoded entries only gets
    :class:`PrecodedRecords`."""
    uris = [e for e in entries if isinstance(e, str)]
    if not uris:      # a chunk of archived / 0-byte objects only: nothing to fetch
        return (PrecodedRecords.of(entries, model, job_id, weights)
                or [precoded_record(e, model, job_id, weights) for e in entries])
    fetched = label(uris)
    if fetched is None:
        return None
    if len(uris) == len(entries):
        return fetched
    it = iter(fetched)
    return [next(it) if isinstance(e, str) else precoded_record(e, model, job_id, weights) for e in entries]
