"""Healing lost messages without a person: the sweeper, and the one rule for re-sending a chunk.

A chunk message can vanish (the queue list deleted, an AOF `everysec` window, an operator's
FLUSH of the wrong DB). Its URIs are safe in storage (the claim check), so a chunk can always be
sent again; the question is only *when* a chunk is lost rather than waiting. The rule, judged
from our own Redis state only (:func:`lost_chunks`; kombu's private ``unacked`` hash is not read):
a chunk of a live, sealed job may be sent again when it is

  * not done: no outcome in hnq:job:ID:done (a dead letter is an outcome: `hardnet redrive`),
  * not in flight: no live lease in hnq:job:ID:lease (the attempt running a chunk holds one and
    renews it while it runs; worker.chunk),
  * not possibly queued: its last send (hnq:job:ID:seen "q TIME") is not newer than the queue's
    watermark (hnq:wm:QUEUE, the latest send time of a chunk taken from that list, which is FIFO),
    or the list is empty,
  * and quiet for ``quiet_s``: that long since it was sent, or since its lease expired (the
    sweeper uses the visibility timeout, so kombu's own redelivery of a dead worker's chunk comes
    first; `hardnet resume`, an operator's order, a few seconds).

The sweeper and `hardnet resume` both re-send by this rule and reset the chunk's attempt budget
(:func:`resend_chunk`). A false positive costs one message: a delivery of a done chunk is
acknowledged without fetching anything, and one of a chunk whose lease is live waits for it
(worker.chunk). Workers sweep every ``HARDNET_SWEEP_INTERVAL`` s (one at a time, under a Redis
lock); ``hardnet sweep`` runs one pass by hand, and ``hardnet status JOB`` shows the stalled chunks.
"""
from __future__ import annotations

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
#: `hardnet resume`'s quiet period: seconds since a chunk was sent (or its lease expired)
RESUME_QUIET_S = 10.0
LOCK_KEY = "hnq:sweep:lock"
#: kombu's Redis transport's hash of taken messages: only its length is read (producer.exporter's
#: metric); what is in flight is judged from our own leases
UNACKED_KEY = "unacked"


def send_chunk(app, store: JobStore, queue: str, task: ChunkTask, producer=None) -> None:
    """Enqueue one chunk's claim check (and note it for the sweeper)."""
    store.mark_sent(task.job_id, [task.chunk])
    app.send_task(TASK_CLASSIFY, args=[task.model_dump(exclude_none=True)], queue=queue, producer=producer)


def resend_chunk(app, store: JobStore, queue: str, job_id: str, chunk: int, model: str,
                 dest: str | None) -> bool:
    """Send a chunk again from its stored inputs (redrive, sweep, resume), with a fresh attempt
    budget. False if the inputs are gone."""
    got = read_chunk_uris(store, dest, job_id, chunk)
    if got is None:
        log.error("chunk %s/%d cannot be sent again: its stored inputs are missing", job_id, chunk)
        return False
    uris, digest = got
    # The job's options travel with every send (a re-sent Parquet chunk stays Parquet).
    opts = JobOptions.from_json(store.r.hget(store.key(job_id), "options")).for_message()
    store.forget_attempts(job_id, [chunk])
    send_chunk(app, store, queue, ChunkTask(job_id=job_id, chunk=chunk, count=len(uris), digest=digest,
                                            model=model, dest=dest, options=opts))
    return True


def lost_chunks(store: JobStore, job_id: str, quiet_s: float, *, now: float | None = None,
                h: dict | None = None) -> list[int]:
    """The chunks of ``job_id`` that may be sent again (the rule in this module's docstring):
    neither done, in flight (a live lease) nor possibly queued, and quiet for ``quiet_s``."""
    h = store.raw(job_id) if h is None else h
    if not h or h.get("state") not in ("queued", "running") or h.get("sealed") != "1":
        return []
    now = now or time.time()
    queue = h.get("queue") or "hardnet"
    qlen = store.r.llen(queue)
    wm = store.watermark(queue)
    done = store.done_chunks(job_id)
    seen = store.seen(job_id)
    leases = store.chunk_leases(job_id)
    submitted = float(h.get("submitted_at") or now)
    out = []
    for c in range(int(h.get("chunks") or 0)):
        if c in done:
            continue
        kind, at = seen.get(c, ("q", submitted))
        lease = leases.get(c)
        if lease is not None and lease + SKEW_S > now:
            continue                              # in flight: its attempt renews the lease
        if kind == "q":
            if now - at <= quiet_s or (qlen > 0 and wm <= at + SKEW_S):
                continue                          # just sent, or may still be waiting in the list
        elif kind == "r":
            if now - at <= quiet_s:
                continue                          # a failed attempt's retry, due at `at`
        else:
            # started: quiet since its lease expired (a worker without leases: since the start,
            # for twice the quiet period)
            since = lease if lease is not None else at
            if now - since <= (quiet_s if lease is not None else 2 * quiet_s + 30):
                continue
        out.append(c)
    return out


def stalled_chunks(store: JobStore, job_id: str, visibility_timeout: float, *,
                   now: float | None = None) -> list[int]:
    """What the sweeper would re-send now (`hardnet status JOB` lists them as stalled)."""
    return lost_chunks(store, job_id, visibility_timeout, now=now)


def sweep(store: JobStore, app, visibility_timeout: float, jobs: list[str] | None = None,
          send: Callable | None = None) -> dict[str, list[int]]:
    """One pass over the recent live jobs: re-send stalled chunks, finalise jobs whose every chunk
    is done but which have no final state. Returns {job: chunks re-sent}."""
    sent: dict[str, list[int]] = {}
    for job in jobs if jobs is not None else store.recent(500):
        try:
            if is_complete_unfinished(store, job):
                log.warning("job %s: every chunk is done but it was not finalised; finalising", job)
                finalize_or_fail(store, job)
                continue
            stalled = stalled_chunks(store, job, visibility_timeout)
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
