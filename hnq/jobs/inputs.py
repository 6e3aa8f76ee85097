"""The claim check: a chunk's URIs are stored beside the job's results, and the Celery message
carries only (job, chunk, count, digest, model, dest).

Where the URIs go:
  S3 / file destination   DEST/JOB_ID/inputs/chunk-NNNNN.jsonl.gz  (gzip of one JSON value a line)
  Redis destination       hnq:job:JOB_ID:in:N                      (the same bytes, with the job's TTL)

Each line is a URI string, or the entry of a record decided before any fetch (an archived or
0-byte object: :mod:`hnq.objects`), which the worker writes without fetching.

The digest is over the uncompressed JSON Lines, so the worker can tell that what it read is the
list the producer meant (a re-submitted job id, a hand-edited object, a truncated copy). Writes are
atomic (S3 PUT; file: temp + rename), and the message is sent only after its inputs were written.

Destinations named in a message are validated by the worker against its own
:class:`OutputPolicy` (``HARDNET_OUTPUT_ROOTS``, ``HARDNET_OUTPUT_BUCKETS``) before anything is
read from or written to them: a message is never trusted to pick where a worker writes.
"""
from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass

from hnq.errors import ConfigError
from hnq.objects import check_entries, entry_uri
from hnq.storage import Destination, open_destination, validate_destination
from hnq.storage.file import within_roots
from hnq.uris import file_uri_to_path

#: hex characters of the digest (96 bits: enough to tell lists apart, short in every message)
DIGEST_CHARS = 24


def inputs_relpath(job_id: str, chunk: int) -> str:
    return f"{job_id}/inputs/chunk-{chunk:05d}.jsonl.gz"


def encode_uris(uris: list[str]) -> tuple[bytes, str]:
    """(gzip bytes to store, digest of the list)."""
    raw = "".join(json.dumps(u, ensure_ascii=False) + "\n" for u in uris).encode("utf-8", "surrogatepass")
    return gzip.compress(raw, compresslevel=6, mtime=0), digest_of(raw)


def digest_of(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:DIGEST_CHARS]


def _parse_lines(text: str) -> list:
    """The JSON value of each line of ``text`` (lines end with \\n; empty ones skipped). One parse
    of the whole list when the lines are what :func:`encode_uris` writes (one value per line, no
    empty line): a chunk's entries in one C call, not one ``json.loads`` each; otherwise line by
    line (a line that is not one JSON value raises ValueError there). JSON strings hold no raw
    \\n, so a line is a value; other line separators (U+2028, U+0085), which json.dumps leaves
    raw inside strings, are part of their value."""
    body = text[:-1] if text.endswith("\n") else text
    if body and "\n\n" not in body and not body.startswith("\n"):
        try:
            entries = json.loads("[" + body.replace("\n", ",") + "]")
        except ValueError:
            entries = None
        if entries is not None and len(entries) == body.count("\n") + 1:
            return entries
    return [json.loads(line) for line in text.split("\n") if line]


def decode_entries(data: bytes) -> tuple[list, str]:
    """(entries, digest) of stored bytes: each entry a URI string or a precoded record's entry
    (:mod:`hnq.objects`); ConfigError when they are not a stored input list."""
    try:
        raw = gzip.decompress(data)
        entries = _parse_lines(raw.decode("utf-8", "surrogatepass"))
    except (OSError, EOFError, ValueError) as e:
        raise ConfigError(f"stored chunk inputs are unreadable ({e})") from None
    check_entries(entries)
    return entries, digest_of(raw)


def decode_uris(data: bytes) -> tuple[list[str], str]:
    """(URIs, digest) of stored bytes (the URI of every entry, precoded ones included);
    ConfigError when they are not a stored input list."""
    entries, digest = decode_entries(data)
    return [entry_uri(e) for e in entries], digest


# ----------------------------------------------------------------------------- output policy
@dataclass(frozen=True)
class OutputPolicy:
    """Where a worker may write. ``roots``: directories ``file://`` destinations must lie in (None
    = any, ``()`` = none); ``buckets``: S3 buckets allowed (None = any)."""

    roots: tuple[str, ...] | None = ()
    buckets: tuple[str, ...] | None = None


def check_output(dest: str, policy: OutputPolicy | None) -> str:
    """The normalised destination if ``policy`` allows it, else ConfigError naming the rule."""
    norm = validate_destination(dest)
    if policy is None:
        return norm
    if norm.startswith("s3://"):
        bucket = norm[5:].split("/", 1)[0]
        if policy.buckets is not None and bucket not in policy.buckets:
            raise ConfigError(f"destination {norm}: bucket {bucket!r} is not in this worker's "
                              "HARDNET_OUTPUT_BUCKETS")
        return norm
    if policy.roots is None:
        return norm
    if not policy.roots:
        raise ConfigError(f"destination {norm}: this worker writes no local files (set "
                          "HARDNET_OUTPUT_ROOTS to allow directories)")
    if within_roots(file_uri_to_path(norm), policy.roots) is None:
        raise ConfigError(f"destination {norm} is outside this worker's HARDNET_OUTPUT_ROOTS")
    return norm


# ----------------------------------------------------------------------------- store / load
def store_chunk_uris(store, dest: Destination | None, job_id: str, chunk: int, uris: list[str]) -> str:
    """Write one chunk's URIs where the job keeps them; returns the digest for the message."""
    data, digest = encode_uris(uris)
    if dest is not None:
        dest.put(inputs_relpath(job_id, chunk), data, content_type="application/gzip")
    else:
        store.put_inputs(job_id, chunk, data)
    return digest


def _read_chunk_data(store, dest: str | None, job_id: str, chunk: int) -> bytes | None:
    if dest:
        d = open_destination(dest)
        return d.get(inputs_relpath(job_id, chunk))
    return store.get_inputs(job_id, chunk)


def read_chunk_uris(store, dest: str | None, job_id: str, chunk: int) -> tuple[list[str], str] | None:
    """(URIs, digest) as stored, or None when they are not there."""
    data = _read_chunk_data(store, dest, job_id, chunk)
    if data is None:
        return None
    return decode_uris(data)


def load_chunk_uris(store, task, policy: OutputPolicy | None) -> list[str]:
    """:func:`load_chunk_entries`, as URIs."""
    return [entry_uri(e) for e in load_chunk_entries(store, task, policy)]


def load_chunk_entries(store, task, policy: OutputPolicy | None) -> list:
    """The worker's side: check the message's destination against the worker's own policy, read
    the chunk's entries (URIs, and precoded records: :mod:`hnq.objects`) and verify them against
    the message (count and digest). ConfigError for anything that another attempt would not fix;
    TransientError (from storage) otherwise."""
    if task.dest:
        check_output(task.dest, policy)
    data = _read_chunk_data(store, task.dest, task.job_id, task.chunk)
    got = decode_entries(data) if data is not None else None
    where = (open_destination(task.dest).uri(inputs_relpath(task.job_id, task.chunk)) if task.dest
             else store.key(task.job_id, "in", str(task.chunk)))
    if got is None:
        raise ConfigError(f"chunk inputs missing: {where}")
    entries, digest = got
    if digest != task.digest or len(entries) != task.count:
        raise ConfigError(f"chunk inputs at {where} do not match the message ({len(entries)} URIs, "
                          f"digest {digest}; message says {task.count}, {task.digest})")
    return entries
