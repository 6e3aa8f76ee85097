"""Ending a job truthfully: the final state follows from the counts, the manifest lists what
exists, and it is written last (after every part, before the final state), atomically.

  done               every image labelled
  done_with_errors   some images have error records, or tags that could not be written (exit 3)
  failed             chunks dead-lettered, a part missing, the manifest unwritable, or no image
                     labelled at all (exit 4)
  cancelled          never overwritten by the above
  abandoned          its submit died while listing (hnq.jobs.liveness; exit 6): never overwritten
                     either, until `hardnet resume` seals it

Finalisation is its own step, under a lease (hnq:job:ID:final, :class:`Lease`): one finaliser at a
time, whoever calls it — the worker's background finaliser after the last chunk (worker/lifecycle.py,
outside any chunk's message), the producer's finalize task, the sweeper, `hardnet resume`. A second
caller exits at once (:func:`finalize_or_fail` returns None). The holder renews the lease while it
works; if it dies the lease expires after :data:`LEASE_S` and the sweeper takes over. The final
state is set only by the lease's holder and only from queued/running (JobStore.finish), so states
never go back (a `failed` job becomes `done` only through `resume`/`redrive`, which reopen it).
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from datetime import datetime, timezone

from hnq.jobs.index import index_for_finalize, manifest_fields
from hnq.jobs.inputs import OutputPolicy, check_output
from hnq.jobs.purge import purge_after_end
from hnq.jobs.store import JobStore
from hnq.options import JobOptions
from hnq.schema import DeadChunk, Manifest
from hnq.storage import open_destination

log = logging.getLogger("hardnet.finish")


def final_state(dead_chunks: int, failed: int, missing: int, succeeded: int | None = None) -> str:
    """``succeeded``: images labelled (or reused: --skip-labelled); a job with failures and none
    labelled is ``failed``."""
    if dead_chunks or missing or (failed and succeeded == 0):
        return "failed"
    return "done_with_errors" if failed else "done"


def build_manifest(store: JobStore, job_id: str, policy: OutputPolicy | None = None) -> Manifest | None:
    """The manifest as it stands (nothing written). None if the job is unknown or not sealed."""
    info = store.info(job_id)
    if info is None or info.chunks is None:
        return None
    raw = store.raw(job_id)
    opts = JobOptions.from_json(raw.get("options"))
    if info.dest:
        check_output(info.dest, policy)
        d = open_destination(info.dest)
        have = {p.rsplit("/", 1)[-1] for p in d.list(f"{job_id}/part-")}
        names = [d.part_path(job_id, c, opts.format).rsplit("/", 1)[-1] for c in range(info.chunks)]
        exists = [n in have for n in names]
    else:
        names = [f"redis:{store.key(job_id, 'part', str(c))}" for c in range(info.chunks)]
        with store.r.pipeline(transaction=False) as p:
            for c in range(info.chunks):
                p.exists(store.key(job_id, "part", str(c)))
            exists = [bool(x) for x in p.execute()]
    parts = [n for n, e in zip(names, exists) if e]
    missing = [c for c, e in enumerate(exists) if not e]
    dead = [DeadChunk(chunk=x.chunk, count=x.count, attempts=x.attempts, error=x.error)
            for x in store.dead_letters(job_id)]
    error = None
    if missing:
        error = f"{len(missing)} of {info.chunks} parts are missing (chunks {missing[:20]})"
    elif info.failed and not info.succeeded and not info.skipped and not dead:
        codes = " ".join(f"{k}={v}" for k, v in sorted(info.error_codes.items()))
        error = (f"no image was labelled ({codes}): `hardnet results JOB --failed-only` shows why"
                 .replace("JOB", job_id))
    tag_errors = info.error_codes.get("tag_error", 0)
    try:
        sources = json.loads(raw.get("sources") or "[]")
    except ValueError:
        sources = []
    return Manifest(
        job_id=job_id, model=info.model or "", weights=store.weights_used(job_id), weights_sha256=store.weights_sha256(job_id),
        # A tag that could not be written is an error of the job (done_with_errors), though the
        # record's labels stand.
        state=final_state(len(dead), info.failed + tag_errors, len(missing), info.succeeded + (info.skipped or 0)), total=info.total or 0,
        succeeded=info.succeeded, failed=info.failed, error_codes=info.error_codes, parts=parts,
        missing_parts=missing, dead_chunks=dead, sources=sources, error=error,
        format=opts.format, top_k=opts.top_k, tag=opts.tag, tag_errors=tag_errors,
        weights_requested=opts.weights,
        skipped_by_extension=info.skipped_by_extension, skipped_extensions=info.skipped_extensions,
        submitted_at=info.submitted_at, started_at=info.started_at,
        finished_at=datetime.now(timezone.utc) if info.finished_at is None else info.finished_at,
        created_at=datetime.now(timezone.utc), **manifest_fields(d if info.dest else None, job_id, raw))


#: seconds the finalisation lease lives without a renewal (its holder renews it every third of that)
LEASE_S = 30.0


class Lease:
    """The job's finalisation lease while held: renewed by a daemon thread; :attr:`lost` is set
    when a renewal finds it taken or gone (the holder then writes nothing more)."""

    def __init__(self, store: JobStore, job_id: str, ttl_s: float = LEASE_S):
        self.store, self.job_id, self.ttl = store, job_id, ttl_s
        self.token = uuid.uuid4().hex
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        if not self.store.take_lease(self.job_id, self.token, self.ttl):
            return False
        self._thread = threading.Thread(target=self._renew, daemon=True, name=f"hardnet-lease-{self.job_id}")
        self._thread.start()
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self.store.renew_lease(self.job_id, self.token, self.ttl):
                    log.error("job %s: the finalisation lease was lost; this finaliser stops", self.job_id)
                    self.lost.set()
                    return
            except Exception as e:  # noqa: BLE001 - Redis trouble: try again before it expires
                log.warning("job %s: could not renew the finalisation lease: %s", self.job_id, e)

    def check(self) -> None:
        if self.lost.is_set():
            raise LeaseLost(f"job {self.job_id}: the finalisation lease was lost")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        try:
            self.store.release_lease(self.job_id, self.token)
        except Exception as e:  # noqa: BLE001 - it expires by itself
            log.warning("job %s: could not release the finalisation lease: %s", self.job_id, e)


class LeaseLost(RuntimeError):
    """Another finaliser holds the job now: this one must not write the manifest or a state."""


def finalize(store: JobStore, job_id: str, policy: OutputPolicy | None = None,
             lease: Lease | None = None) -> str | None:
    """Write the manifest, then set the final state (under ``lease`` when given: nothing is
    written once it is lost). Raises when the manifest cannot be written (:func:`finalize_or_fail`
    retries, then marks the job failed). Returns the job's state."""
    m = build_manifest(store, job_id, policy)
    if m is None:
        return None
    dest = store.raw(job_id).get("dest")
    if dest:
        d = open_destination(dest)
        index_for_finalize(store, job_id)   # --skip-labelled / --index jobs; never raises
        if lease is not None:
            lease.check()
        d.put(d.manifest_path(job_id), m.model_dump_json(indent=2).encode(), content_type="application/json")
    if lease is not None:
        lease.check()
    state = store.finish(job_id, m.state, m.error, lease=lease.token if lease is not None else None)
    log.info("job %s %s", job_id, state)
    if state in ("done", "done_with_errors", "failed", "cancelled"):
        # the stored inputs may hold credentials: only those redrive/resume still need stay (hnq.jobs.purge)
        keep = set() if state == "cancelled" else {x.chunk for x in m.dead_chunks} | set(m.missing_parts)
        purge_after_end(store, job_id, dest, len(m.parts) + len(m.missing_parts), keep)
    return state


def finalize_or_fail(store: JobStore, job_id: str, policy: OutputPolicy | None = None, *,
                     attempts: int = 1, backoff_s: float = 2.0) -> str | None:
    """Finalise under the job's lease: None at once when another finaliser holds it (or the job
    has ended already: nothing to do). Up to ``attempts`` tries (``backoff_s`` doubling between
    them); when the last one fails the job is marked failed with the reason (never left running)."""
    raw = store.raw(job_id)
    if raw.get("state") not in ("queued", "running"):
        return None
    lease = Lease(store, job_id)
    if not lease.acquire():
        log.info("job %s: another finaliser holds its lease; leaving it to that one", job_id)
        return None
    try:
        for n in range(1, attempts + 1):
            try:
                return finalize(store, job_id, policy, lease)
            except LeaseLost:
                return None
            except Exception as e:  # noqa: BLE001 - any failure must end up in the job's state
                err = f"the manifest could not be written: {type(e).__name__}: {e}"
                if n < attempts:
                    log.warning("job %s: finalisation attempt %d failed (%s); trying again", job_id, n, err)
                    time.sleep(backoff_s * 2 ** (n - 1))
                    continue
                log.error("job %s failed: %s", job_id, err)
                if lease.lost.is_set():
                    return None
                return store.finish(job_id, "failed", err, lease=lease.token)
        return None
    finally:
        lease.release()


def is_complete_unfinished(store: JobStore, job_id: str) -> bool:
    """Every chunk of a sealed job has an outcome, but the job has no final state yet."""
    h = store.raw(job_id)
    return (bool(h) and h.get("sealed") == "1" and h.get("state") in ("queued", "running")
            and int(h.get("chunks_done", 0)) >= int(h.get("chunks") or 0))


__all__ = ["LEASE_S", "Lease", "LeaseLost", "final_state", "build_manifest", "finalize", "finalize_or_fail",
           "is_complete_unfinished"]
