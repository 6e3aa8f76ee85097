"""Healing lost messages without a person: the sweeper.

A chunk message can vanish (the queue list deleted, an AOF `everysec` window, an operator's
FLUSH of the wrong DB). Its URIs are safe in storage (the claim check), so a chunk can always be
sent again; the question is only *when* a chunk is lost rather than waiting. A chunk of a live,
sealed job is **stalled** when it is

  * not done (no outcome in hnq:job:ID:done),
  * not in flight (not in kombu's ``unacked`` hash, which holds every message a worker has taken
    and not yet acknowledged; it is small: workers x prefetch),
  * not possibly still queued: the queue list is empty, or a chunk sent later than this one's last
    event has already been taken from it (the list is FIFO; hnq:wm:QUEUE is the latest send time
    of a taken chunk, kept by the workers at start),
  * and its last event (sent or started, hnq:job:ID:seen) is older than the visibility timeout
    (twice that plus the restore scan after a start, so kombu's own redelivery of a dead worker's
    chunk comes first).

Stalled chunks are re-sent from their stored inputs. A false positive costs a duplicate run (the
part name is deterministic and counters are per chunk, so the result is the same), never data.
Workers sweep every ``HARDNET_SWEEP_INTERVAL`` s (one at a time, under a Redis lock); ``hardnet
sweep`` runs one pass by hand, and ``hardnet status JOB`` shows the stalled chunks.
"""
from __future__ import annotations

import base64
import json
import logging
import time
from typing import Callable

from hnq.jobs.finish import finalize_or_fail, is_complete_unfinished
from hnq.jobs.inputs import read_chunk_uris
from hnq.jobs.store import JobStore
from hnq.options import JobOptions
from hnq.models import DEFAULT_MODEL
from hnq.schema import ChunkTask
from hnq.settings import TASK_CLASSIFY

log = logging.getLogger("hardnet.sweep")

#: seconds of clock skew tolerated between producers and workers
SKEW_S = 5.0
UNACKED_KEY = "unacked"   # kombu's Redis transport default
LOCK_KEY = "hnq:sweep:lock"


def send_chunk(app, store: JobStore, queue: str, task: ChunkTask, producer=None) -> None:
    """Enqueue one chunk's claim check (and note it for the sweeper)."""
    store.mark_sent(task.job_id, [task.chunk])
    app.send_task(TASK_CLASSIFY, args=[task.model_dump(exclude_none=True)], queue=queue, producer=producer)


def resend_chunk(app, store: JobStore, queue: str, job_id: str, chunk: int, model: str,
                 dest: str | None) -> bool:
    """Send a chunk again from its stored inputs (redrive, sweep, resume). False if they are gone."""
    got = read_chunk_uris(store, dest, job_id, chunk)
    if got is None:
        log.error("chunk %s/%d cannot be sent again: its stored inputs are missing", job_id, chunk)
        return False
    uris, digest = got
    # The job's options travel with every send (a re-sent Parquet chunk stays Parquet).
    opts = JobOptions.from_json(store.r.hget(store.key(job_id), "options")).for_message()
    send_chunk(app, store, queue, ChunkTask(job_id=job_id, chunk=chunk, count=len(uris), digest=digest,
                                            model=model, dest=dest, options=opts))
    return True


def in_flight(store: JobStore) -> set[tuple[str, int]]:
    """(job, chunk) of every chunk message taken by a worker and not yet acknowledged."""
    out = set()
    for raw in store.r.hvals(UNACKED_KEY):
        try:
            msg = json.loads(raw)[0]
            if msg.get("headers", {}).get("task") != TASK_CLASSIFY:
                continue
            body = json.loads(base64.b64decode(msg["body"]))
            p = body[0][0]
            out.add((p["job_id"], int(p["chunk"])))
        except (ValueError, KeyError, IndexError, TypeError):
            continue
    return out


def stalled_chunks(store: JobStore, job_id: str, visibility_timeout: float, *,
                   flying: set[tuple[str, int]] | None = None, now: float | None = None) -> list[int]:
    h = store.raw(job_id)
    if not h or h.get("state") not in ("queued", "running") or h.get("sealed") != "1":
        return []
    now = now or time.time()
    queue = h.get("queue") or "hardnet"
    qlen = store.r.llen(queue)
    wm = store.watermark(queue)
    flying = in_flight(store) if flying is None else flying
    done = store.done_chunks(job_id)
    seen = store.seen(job_id)
    submitted = float(h.get("submitted_at") or now)
    out = []
    for c in range(int(h.get("chunks") or 0)):
        if c in done or (job_id, c) in flying:
            continue
        kind, at = seen.get(c, ("q", submitted))
        quiet = visibility_timeout if kind == "q" else 2 * visibility_timeout + 30
        if now - at <= quiet:
            continue
        if qlen > 0 and wm <= at + SKEW_S:
            continue      # it may still be waiting in the list
        out.append(c)
    return out


def sweep(store: JobStore, app, visibility_timeout: float, jobs: list[str] | None = None,
          send: Callable | None = None) -> dict[str, list[int]]:
    """One pass over the recent live jobs: re-send stalled chunks, finalise jobs whose every chunk
    is done but which have no final state. Returns {job: chunks re-sent}."""
    flying = in_flight(store)
    sent: dict[str, list[int]] = {}
    for job in jobs if jobs is not None else store.recent(500):
        try:
            if is_complete_unfinished(store, job):
                log.warning("job %s: every chunk is done but it was not finalised; finalising", job)
                finalize_or_fail(store, job)
                continue
            stalled = stalled_chunks(store, job, visibility_timeout, flying=flying)
            if not stalled:
                continue
            h = store.raw(job)
            queue, model, dest = h.get("queue") or "hardnet", h.get("model") or DEFAULT_MODEL, h.get("dest") or None
            for c in stalled:
                if (send or resend_chunk)(app, store, queue, job, c, model, dest):
                    sent.setdefault(job, []).append(c)
            log.warning("job %s: re-sent %d stalled chunk(s) %s", job, len(sent.get(job, [])), sent.get(job, [])[:20])
        except Exception as e:  # noqa: BLE001 - one job's trouble must not stop the sweep
            log.error("sweep of job %s failed: %s", job, e)
    return sent
