"""`submit --tag`: write each labelled S3 object's top-1 label back to it as object tags.

Tags written (:data:`TAG_KEYS`)::

    hardnet:label   the top-1 ImageNet class name, sanitised for S3 (below)
    hardnet:score   its softmax probability, 4 decimals ("0.8812")
    hardnet:model   model/weights that made it ("hardnet68/official")

They are **merged** with the object's own tags: GetObjectTagging, then PutObjectTagging of the
object's other tags plus ours (ours replace earlier hardnet:* values). S3 allows at most
:data:`MAX_TAGS` (10) tags per object: when the merge would exceed that, nothing is written (the
object keeps its tags untouched) and the record gets a ``tag_error``. When the object already
carries exactly these values (a retried chunk), no PUT is made.

Restrictions, from the S3 user guide ("Categorizing your storage using tags": up to 10 tags per
object, keys up to 128 and values up to 256 Unicode characters, counted in UTF-16, case-sensitive)
and the S3 API's Tag type (pattern ``^([\\p{L}\\p{Z}\\p{N}_.:/=+\\-@]*)$``: letters, spaces,
numbers and ``_ . : / = + - @``; keys may not start with ``aws:``). ImageNet names have
apostrophes ("potter's wheel", "jack-o'-lantern"): apostrophes are dropped ("potters wheel"), any
other character outside the pattern becomes a space (runs collapsed), and the value is cut to 256
UTF-16 units. The record keeps the exact label; the tag is its S3-safe spelling.

Only objects of buckets this worker may read images from are tagged (``HARDNET_SOURCE_BUCKETS``,
unset = any): tagging writes to the object itself, so it is held to the same allow-list as reading
it. A record whose object lies outside gets ``tag_error`` with a message that begins
``forbidden:`` and names the bucket; no request is made for it.

A tag failure never fails the chunk or the record's labels: the record keeps ``status: ok`` and
gets ``tag_error: {code: tag_error, message}`` (and the job ends ``done_with_errors``). Calls use
the worker's shared boto3 client, so its retry rules apply (HARDNET_S3_RETRY_MODE /
HARDNET_S3_MAX_ATTEMPTS); what outlives them becomes the tag_error's message.

Not atomic: S3 has no conditional PutObjectTagging, so a tag written by someone else between our
GET and PUT of one object is lost. On a versioned bucket the tags go to the current version.
"""
from __future__ import annotations

import logging
import unicodedata
from concurrent.futures import ThreadPoolExecutor

import botocore.exceptions as bex

from hnq.errors import ErrorCode
from hnq.schema import RecordError, ResultRecord
from hnq.storage.s3.client import s3_client
from hnq.storage.s3.errors import code_and_status
from hnq.uris import InvalidURI, parse_s3

log = logging.getLogger("hardnet.worker")

LABEL_KEY = "hardnet:label"
SCORE_KEY = "hardnet:score"
MODEL_KEY = "hardnet:model"
TAG_KEYS = (LABEL_KEY, SCORE_KEY, MODEL_KEY)
MAX_TAGS = 10
MAX_VALUE_UNITS = 256
_EXTRA_OK = set("_.:/=+-@")
_APOSTROPHES = set("'\u2019\u02bc\u2018`")


def _allowed(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "LN" or ch in _EXTRA_OK or ch == " "


def tag_value(text: str) -> str:
    """``text`` spelt with the characters S3 allows in a tag value (see the module docstring)."""
    out = []
    for ch in text:
        if ch in _APOSTROPHES:
            continue
        if unicodedata.category(ch)[0] == "Z":
            ch = " "                  # every kind of space is a plain space
        out.append(ch if _allowed(ch) else " ")
    value = " ".join("".join(out).split())
    units, cut = 0, []
    for ch in value:
        units += 2 if ord(ch) > 0xFFFF else 1
        if units > MAX_VALUE_UNITS:
            break
        cut.append(ch)
    return "".join(cut).strip()


def tags_for(record: ResultRecord) -> dict[str, str]:
    top = record.labels[0]
    return {LABEL_KEY: tag_value(top.label) or str(top.index),
            SCORE_KEY: f"{top.score:.4f}",
            MODEL_KEY: tag_value(f"{record.model}/{record.weights or 'official'}")}


class TagFailed(Exception):
    pass


def _why(e: BaseException, what: str, permission: str) -> str:
    if isinstance(e, bex.ClientError):
        code, status = code_and_status(e)
        if code in ("NoSuchKey", "NoSuchBucket", "404") or status == 404:
            return f"{what}: the object no longer exists"
        if code in ("AccessDenied", "403") or status == 403:
            return f"{what}: access denied; the worker's credentials need {permission}"
        if code == "MethodNotAllowed":
            return f"{what}: the store does not allow object tagging here ({code})"
        return f"{what}: S3 answered {code or status} (after the client's retries)"
    return f"{what}: {type(e).__name__}: {e}"


def tag_object(uri: str, ours: dict[str, str], client=None) -> str:
    """Merge ``ours`` into the object's tags. Returns 'tagged' or 'unchanged'; raises TagFailed
    with the reason (over the limit, denied, gone, storage failing)."""
    try:
        bucket, key = parse_s3(uri)
    except InvalidURI as e:
        raise TagFailed(f"not tagged: {e}") from None
    client = client or s3_client()
    try:
        got = client.get_object_tagging(Bucket=bucket, Key=key)
    except Exception as e:  # noqa: BLE001 - becomes the record's tag_error
        raise TagFailed(_why(e, "reading the object's tags failed", "s3:GetObjectTagging")) from None
    existing = {t["Key"]: t["Value"] for t in got.get("TagSet", [])}
    if all(existing.get(k) == v for k, v in ours.items()):
        return "unchanged"
    merged = {k: v for k, v in existing.items() if k not in ours}
    foreign = len(merged)
    merged.update(ours)
    if len(merged) > MAX_TAGS:
        raise TagFailed(f"not tagged: the object has {foreign} tags of its own, and {len(ours)} more "
                        f"would exceed S3's limit of {MAX_TAGS} tags per object; its tags were left "
                        "untouched")
    try:
        client.put_object_tagging(Bucket=bucket, Key=key, Tagging={
            "TagSet": [{"Key": k, "Value": v} for k, v in merged.items()]})
    except Exception as e:  # noqa: BLE001
        raise TagFailed(_why(e, "writing the object's tags failed", "s3:PutObjectTagging")) from None
    return "tagged"


def tag_records(records: list[ResultRecord], threads: int = 16, client=None,
                buckets: tuple[str, ...] | None = None) -> tuple[list[ResultRecord], dict]:
    """Tag every labelled record's S3 object; returns the records (a failed one with its
    ``tag_error`` set) and counts {'tagged', 'unchanged', 'failed'}. ``buckets``: the buckets
    whose objects may be tagged (HARDNET_SOURCE_BUCKETS; None = any); another bucket's object
    gets a ``forbidden:`` tag_error and no request."""
    out = list(records)
    counts = {"tagged": 0, "unchanged": 0, "failed": 0}
    todo = [i for i, r in enumerate(records) if r.status == "ok" and r.labels]

    def one(i: int):
        r = records[i]
        if not r.uri.startswith("s3://"):
            return i, None, "not tagged: only s3:// objects have object tags"
        if buckets is not None:
            bucket = r.uri[5:].split("/", 1)[0]
            if bucket not in buckets:
                return i, None, (f"forbidden: not tagged: bucket {bucket!r} is not in this worker's "
                                 "HARDNET_SOURCE_BUCKETS (the only buckets it may tag)")
        try:
            return i, tag_object(r.uri, tags_for(r), client), None
        except TagFailed as e:
            return i, None, str(e)
        except Exception as e:  # noqa: BLE001 - never fail the chunk for a tag
            return i, None, f"not tagged: {type(e).__name__}: {e}"

    if not todo:
        return out, counts
    with ThreadPoolExecutor(max(1, min(threads, len(todo))), thread_name_prefix="hnq-tag") as ex:
        for i, result, why in ex.map(one, todo):
            if why is None:
                counts[result] += 1
            else:
                counts["failed"] += 1
                out[i] = records[i].model_copy(update={
                    "tag_error": RecordError(code=ErrorCode.tag_error, message=why[:1000])})
    if counts["failed"]:
        log.warning("tagging: %d of %d objects could not be tagged (first: %s)", counts["failed"],
                    len(todo), next(r.tag_error.message for r in out if r.tag_error))
    return out, counts
