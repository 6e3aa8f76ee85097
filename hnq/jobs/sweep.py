"""Healing lost messages without a person: the sweeper, and the one rule for re-sending a chunk.

A chunk message can vanish (the queue list deleted, an AOF `everysec` window, an operator's
FLUSH of the wrong DB). Its URIs are safe in storage (the claim check), so a chunk can always be
sent again; the question is only *when* a chunk is lost rather than waiting. The rule, judged
from our own Redis state only (:func:`lost_chunks`; kombu's private ``unacked`` hash is not read):
a chunk of a live, sealed job may be sent again when it is

  * not done: no outcome in hnq:job:ID:done (a dead letter is an outcome: `hardnet redrive`),
  * not in flight: no live lease in hnq:job:ID:lease (the attempt running a chunk holds one and
    renews it while it runs; worker.chunk),
  * not possibly waiting: a chunk is sent onto its job's ready list (seen "p TIME") and later
    dispatched into the Celery queue (seen "q TIME"; hnq.jobs.dispatch). A "p" chunk may still
    wait while the ready list is not empty and its push is not older than the job's ``dwm`` (the
    push time of the latest chunk dispatched: the list is FIFO). A "q" chunk may still be queued
    while the Celery queue is not empty and its dispatch is not older than the queue's watermark
    (hnq:wm:QUEUE, the latest dispatch time of a chunk started from that list, which is FIFO),
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

from hnq.jobs.dispatch import reactivate, ready_lists
from hnq.jobs.finish import finalize_or_fail, is_complete_unfinished
from hnq.jobs.inputs import read_chunk_uris
from hnq.jobs.store import JobStore
from hnq.models import DEFAULT_MODEL
from hnq.schema import ChunkTask

log = logging.getLogger("hardnet.sweep")

#: seconds of clock skew tolerated between producers and workers
SKEW_S = 5.0
#: a chunk dispatched (seen "q") that is no longer possibly in the list and has not started for this
#: long is lost (its dispatcher died before publishing, or the message was lost): a worker starts a
#: chunk it took at once, and kombu's restore of a dead worker's message is covered by the lease
#: rule of started chunks
LOST_DISPATCH_S = 30.0
#: `hardnet resume`'s quiet period: seconds since a chunk was sent (or its lease expired)
RESUME_QUIET_S = 10.0
LOCK_KEY = "hnq:sweep:lock"
#: kombu's Redis transport's hash of taken messages: only its length is read (producer.exporter's
#: metric); what is in flight is judged from our own leases
UNACKED_KEY = "unacked"


def send_chunk(store: JobStore, queue: str, task: ChunkTask, priority: str | None = None) -> None:
    """Send one chunk: onto its job's ready list, from which the dispatchers move it into the Celery
    queue in the job's turn (hnq.jobs.dispatch). ``priority``: the job's (None: read it)."""
    if priority is None:
        priority = store.r.hget(store.key(task.job_id), "priority")
    ready_lists(store).push(task.job_id, queue, priority, [(task.chunk, task.count, task.digest)])


def resend_chunk(store: JobStore, queue: str, job_id: str, chunk: int, model: str, dest: str | None) -> bool:
    """Send a chunk again from its stored inputs (redrive, sweep, resume), with a fresh attempt
    budget: onto its job's ready list (the message is built when it is dispatched, from the job's
    fields). False if the inputs are gone."""
    got = read_chunk_uris(store, dest, job_id, chunk)
    if got is None:
        log.error("chunk %s/%d cannot be sent again: its stored inputs are missing", job_id, chunk)
        return False
    uris, digest = got
    store.forget_attempts(job_id, [chunk])
    send_chunk(store, queue, ChunkTask(job_id=job_id, chunk=chunk, count=len(uris), digest=digest,
                                       model=model, dest=dest))
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
    ready = ready_lists(store).waiting(job_id)
    dwm = float(h.get("dwm") or 0)
    done = store.done_chunks(job_id)
    seen = store.seen(job_id)
    leases = store.chunk_leases(job_id)
    submitted = float(h.get("submitted_at") or now)
    out = []
    for c in range(int(h.get("chunks") or 0)):
        if c in done:
            continue
        kind, at = seen.get(c, ("?", submitted))
        lease = leases.get(c)
        if lease is not None and lease + SKEW_S > now:
            continue                              # in flight: its attempt renews the lease
        if kind == "p":
            if now - at <= quiet_s or (ready > 0 and dwm <= at + SKEW_S):
                continue                          # just pushed, or still on its job's ready list
        elif kind in ("q", "?"):
            if qlen > 0 and wm <= at + SKEW_S:
                continue                          # may still be waiting in the list
            # a dispatched chunk is started at once by the worker that takes it; one without any
            # record (sent by an older producer, or its record lost) waits the whole quiet period
            if now - at <= (min(quiet_s, LOST_DISPATCH_S) if kind == "q" else quiet_s):
                continue                          # just dispatched (or taken by a worker, not started yet)
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


def sweep(store: JobStore, visibility_timeout: float, jobs: list[str] | None = None) -> dict[str, list[int]]:
    """One pass over the recent live jobs: re-send stalled chunks, finalise jobs whose every chunk
    is done but which have no final state. Returns {job: chunks re-sent}."""
    sent: dict[str, list[int]] = {}
    for job in jobs if jobs is not None else store.recent(500):
        try:
            h = store.raw(job)
            if h.get("state") in ("queued", "running", "abandoned") and reactivate(store, job, h):
                log.warning("job %s: its ready chunks had lost their turn; put back", job)
            if is_complete_unfinished(store, job):
                log.warning("job %s: every chunk is done but it was not finalised; finalising", job)
                finalize_or_fail(store, job)
                continue
            stalled = stalled_chunks(store, job, visibility_timeout)
            if not stalled:
                continue
            queue, model, dest = h.get("queue") or "hardnet", h.get("model") or DEFAULT_MODEL, h.get("dest") or None
            for c in stalled:
                if resend_chunk(store, queue, job, c, model, dest):
                    sent.setdefault(job, []).append(c)
            log.warning("job %s: re-sent %d stalled chunk(s) %s", job, len(sent.get(job, [])), sent.get(job, [])[:20])
        except Exception as e:  # noqa: BLE001 - one job's trouble must not stop the sweep
            log.error("sweep of job %s failed: %s", job, e)
    return sent
