"""Stored inputs that hold credentials are deleted when their job ends.

A chunk's stored inputs (the claim check, :mod:`hnq.jobs.inputs`: ``DEST/JOB/inputs/chunk-N.jsonl.gz``
or the Redis key ``hnq:job:JOB:in:N``) hold its URIs exactly as submitted: presigned URLs with
their signatures, ``user:password@`` URLs with their passwords. Records redact those
(:func:`hnq.logs.redact_uri`); the inputs cannot (the workers fetch with them), so they must not
outlive their use in the shared results prefix.

* A worker that loads a chunk whose URIs hold something a record would redact
  (:func:`hnq.logs.has_credentials`) marks the job: the object ``DEST/JOB/inputs/CREDENTIALS``
  (empty; it survives a Redis that lost the job), once per job and worker process.
* When the job ends (:func:`hnq.jobs.finish.finalize`) and the marker is there, the inputs of every
  chunk are deleted **except** those of dead-lettered chunks and of chunks without a part, which
  `hardnet redrive` and `hardnet resume` still need. The marker goes with the last of them: a later
  end of the job (after the redrive or resume finished those chunks) deletes the rest.
* Jobs without such URIs keep their inputs as before: `hardnet resume --out` can then re-label a
  part lost after the job ended. With the marker that is no longer possible for the deleted chunks
  (resume says which chunks have no stored inputs).
* A job whose results stay in Redis (no ``--out``): its inputs are Redis keys that nothing reads
  after the end, so those of its completed chunks are always deleted then (they expire with the job
  anyway, HARDNET_RESULTS_TTL_DAYS; this frees the broker's memory sooner).
* A cancelled job is neither resumed nor redriven: `hardnet cancel` deletes all its inputs that the
  rules above delete (:func:`purge_cancelled`).

A deletion that fails is logged (saying what to delete by hand) and never changes the job's
outcome: its manifest and state are already written.
"""
from __future__ import annotations

import logging
import threading

from hnq.jobs.inputs import inputs_relpath
from hnq.jobs.liveness import stored_chunks
from hnq.logs import has_credentials
from hnq.objects import entry_uri
from hnq.storage import open_destination

log = logging.getLogger("hardnet.finish")

_REDIS_BATCH = 500
_marked: dict[tuple[str, str], None] = {}   # (dest, job) marked by this process; the last 1,024
_marked_lock = threading.Lock()


def marker_relpath(job_id: str) -> str:
    return f"{job_id}/inputs/CREDENTIALS"


def _any_credentials(entries: list) -> bool:
    for e in entries:
        u = e if type(e) is str else entry_uri(e)
        # a credential needs "=" or "@" in the URI: most URIs have neither (one test per entry)
        if ("=" in u or "@" in u) and has_credentials(u):
            return True
    return False


def note_credentials(dest: str | None, job_id: str, entries: list) -> bool:
    """Mark the job when a URI of ``entries`` (a chunk's stored entries) holds a credential.
    Returns whether it does. Only jobs with a destination are marked (see the module doc)."""
    if not dest or not _any_credentials(entries):
        return False
    key = (dest, job_id)
    with _marked_lock:
        if key in _marked:
            return True
    d = open_destination(dest)
    d.put(marker_relpath(job_id), b"", content_type="text/plain")
    with _marked_lock:
        _marked[key] = None
        while len(_marked) > 1024:
            del _marked[next(iter(_marked))]
    return True


def purge_inputs(store, job_id: str, dest: str | None, chunks: int, keep: set[int]) -> int:
    """Delete what the module doc says of job ``job_id``'s stored inputs (chunks ``0..chunks-1``
    except ``keep``); returns how many inputs were deleted. Raises what the store raises."""
    if dest:
        d = open_destination(dest)
        have = set(d.list(f"{job_id}/inputs/"))
        marker = marker_relpath(job_id)
        if marker not in have:
            return 0
        doomed = [p for p in (inputs_relpath(job_id, c) for c in range(chunks) if c not in keep)
                  if p in have]
        if doomed:
            d.delete(doomed)
        if not keep:
            d.delete([marker])   # last: a failure above leaves it for the next end
        return len(doomed)
    keys = [store.key(job_id, "in", str(c)) for c in range(chunks) if c not in keep]
    gone = 0
    for i in range(0, len(keys), _REDIS_BATCH):
        gone += int(store.r.delete(*keys[i:i + _REDIS_BATCH]) or 0)
    return gone


def purge_cancelled(store, job_id: str) -> None:
    """`hardnet cancel`: a cancelled job is neither resumed nor redriven, and never finalised, so
    what the module doc says is done now, for every chunk whose inputs were stored (a chunk that
    a worker takes after the cancel is dropped before its inputs are read: worker.chunk)."""
    h = store.raw(job_id)
    dest = h.get("dest") or None
    chunks = int(h.get("chunks") or 0)
    if not chunks:      # cancelled while its submit was still listing: what it stored so far
        chunks = max(stored_chunks(store, dest, job_id), default=-1) + 1
    purge_after_end(store, job_id, dest, chunks, set())


def purge_after_end(store, job_id: str, dest: str | None, chunks: int, keep: set[int]) -> None:
    """:func:`purge_inputs`, logged, never raising (the job's end is already written)."""
    try:
        n = purge_inputs(store, job_id, dest, chunks, keep)
    except Exception as e:  # noqa: BLE001 - the manifest and state stand
        log.error("job %s: its stored inputs could not be deleted (%s: %s); they may hold credentials: "
                  "delete %s yourself", job_id, type(e).__name__, e,
                  f"{dest}{job_id}/inputs/" if dest else f"the Redis keys {store.key(job_id, 'in')}:*")
        return
    if n:
        log.info("job %s: stored inputs of %d chunk(s) deleted%s", job_id, n,
                 f", {len(keep)} kept for redrive/resume (dead-lettered or without a part)" if keep else "")


__all__ = ["note_credentials", "purge_inputs", "purge_after_end", "purge_cancelled", "marker_relpath"]
