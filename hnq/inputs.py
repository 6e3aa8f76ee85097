"""The claim check: a chunk's URIs are stored beside the job's results, and the Celery message
carries only (job, chunk, count, digest, model, dest).

Where the URIs go:
  S3 / file destination   DEST/JOB_ID/inputs/chunk-NNNNN.jsonl.gz  (gzip of one JSON string a line)
  Redis destination       hnq:job:JOB_ID:in:N                      (the same bytes, with the job's TTL)

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


def decode_uris(data: bytes) -> tuple[list[str], str]:
    """(URIs, digest) of stored bytes; ConfigError when they are not a stored URI list."""
    try:
        raw = gzip.decompress(data)
        uris = [json.loads(line) for line in raw.decode("utf-8", "surrogatepass").splitlines() if line]
    except (OSError, EOFError, ValueError) as e:
        raise ConfigError(f"stored chunk inputs are unreadable ({e})") from None
    if not all(isinstance(u, str) for u in uris):
        raise ConfigError("stored chunk inputs are not a list of URI strings")
    return uris, digest_of(raw)


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


def read_chunk_uris(store, dest: str | None, job_id: str, chunk: int) -> tuple[list[str], str] | None:
    """(URIs, digest) as stored, or None when they are not there."""
    if dest:
        d = open_destination(dest)
        data = d.get(inputs_relpath(job_id, chunk))
    else:
        data = store.get_inputs(job_id, chunk)
    if data is None:
        return None
    return decode_uris(data)


def load_chunk_uris(store, task, policy: OutputPolicy | None) -> list[str]:
    """The worker's side: check the message's destination against the worker's own policy, read
    the chunk's URIs and verify them against the message (count and digest). ConfigError for
    anything that another attempt would not fix; TransientError (from storage) otherwise."""
    if task.dest:
        check_output(task.dest, policy)
    got = read_chunk_uris(store, task.dest, task.job_id, task.chunk)
    where = (open_destination(task.dest).uri(inputs_relpath(task.job_id, task.chunk)) if task.dest
             else store.key(task.job_id, "in", str(task.chunk)))
    if got is None:
        raise ConfigError(f"chunk inputs missing: {where}")
    uris, digest = got
    if digest != task.digest or len(uris) != task.count:
        raise ConfigError(f"chunk inputs at {where} do not match the message ({len(uris)} URIs, "
                          f"digest {digest}; message says {task.count}, {task.digest})")
    return uris
