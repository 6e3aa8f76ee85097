"""Chunk messages a worker cannot handle (a malformed body, a schema version from the future) but
whose job and chunk can be read: dead-lettered with the reason, never dropped (docs/reliability.md).

Dropping them used to be silent data loss in slow motion: the sweeper saw the chunk neither queued,
in flight nor done, re-sent it, and the next worker dropped it again, for ever. A dead letter ends
that loop: the chunk is counted (its stored URIs get `chunk_failed` records naming the reason), the
job can end, `hardnet status JOB` shows the reason and `hardnet redrive JOB` sends the chunk again
as a valid message once the cause is fixed (e.g. the worker upgraded). Everything about the chunk
is taken from our own state (the job hash and the stored inputs), nothing from the bad message but
its job id and chunk number. A message whose job Redis does not know, or whose ids cannot be read,
is logged and dropped: there is nothing to record it against."""
from __future__ import annotations

import logging
import re

from hnq.jobs import parts
from hnq.jobs.inputs import OutputPolicy, read_chunk_uris
from hnq.jobs.store import JobStore
from hnq.options import JobOptions
from hnq.schema import ChunkTask

log = logging.getLogger("hardnet.worker")

_JOB_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def readable_ids(payload) -> tuple[str, int] | None:
    """(job id, chunk) when the message names them plainly, else None."""
    if not isinstance(payload, dict):
        return None
    job, chunk = payload.get("job_id"), payload.get("chunk")
    if not isinstance(job, str) or not _JOB_ID.match(job):
        return None
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
        return None
    return job, chunk


def dead_letter_message(store: JobStore, payload, reason: str, policy: OutputPolicy | None = None) -> str:
    """Returns "dead" (dead-lettered), "kept" (the chunk was completed by a valid delivery: its part
    stands), "ended" (the job ended or was cancelled: nothing to do) or "dropped"."""
    ids = readable_ids(payload)
    if ids is None:
        log.error("dropped a chunk message whose job and chunk cannot be read: %s", reason)
        return "dropped"
    job, chunk = ids
    h = store.raw(job)
    if not h:
        log.error("dropped a chunk message of job %s (unknown to Redis), chunk %d: %s", job, chunk, reason)
        return "dropped"
    if h.get("state") not in ("queued", "running", "abandoned"):
        log.error("chunk %s/%d: ignored an unreadable message of a job that is %s: %s", job, chunk,
                  h.get("state"), reason)
        return "ended"
    if h.get("sealed") == "1" and chunk >= int(h.get("chunks") or 0):
        log.error("dropped a chunk message of job %s naming chunk %d, beyond its %s chunks: %s", job, chunk,
                  h.get("chunks"), reason)
        return "dropped"
    dest = h.get("dest") or None
    try:
        got = read_chunk_uris(store, dest, job, chunk)
    except Exception as e:  # noqa: BLE001 - unreadable inputs: dead-lettered all the same
        log.warning("chunk %s/%d: its stored inputs cannot be read (%s)", job, chunk, e)
        got = None
    uris, digest = got if got is not None else (None, "0" * 16)
    count = len(uris) if uris else (payload.get("count") if isinstance(payload.get("count"), int)
                                    and payload.get("count") > 0 else 1)
    opts = JobOptions.from_json(h.get("options"))
    task = ChunkTask(job_id=job, chunk=chunk, count=count, digest=digest, model=h.get("model") or "hardnet68",
                     dest=dest, options=opts.for_message())
    attempts = int(store.r.hget(store.key(job, "attempts"), str(chunk)) or 0) + 1
    error = f"unreadable message: {reason}"
    store.note_error(job, chunk, error)
    return parts.dead_letter(store, task, uris, error, attempts, policy)


__all__ = ["readable_ids", "dead_letter_message"]
