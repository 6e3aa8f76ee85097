"""Ending a job truthfully: the final state follows from the counts, the manifest lists what
exists, and it is written last (after every part, before the final state), atomically.

  done               every image labelled
  done_with_errors   some images have error records, or tags that could not be written (exit 3)
  failed             chunks dead-lettered, a part missing, or the manifest unwritable (exit 4)
  cancelled          never overwritten by the above

Used by the worker that completes the last chunk, by `hardnet resume` and by the sweeper.
"""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

from hnq.jobs.index import index_for_finalize, manifest_fields
from hnq.jobs.inputs import OutputPolicy, check_output
from hnq.jobs.purge import purge_after_end
from hnq.jobs.store import JobStore
from hnq.options import JobOptions
from hnq.schema import DeadChunk, Manifest
from hnq.storage import open_destination

log = logging.getLogger("hardnet.finish")


def final_state(dead_chunks: int, failed: int, missing: int) -> str:
    if dead_chunks or missing:
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
    tag_errors = info.error_codes.get("tag_error", 0)
    try:
        sources = json.loads(raw.get("sources") or "[]")
    except ValueError:
        sources = []
    return Manifest(
        job_id=job_id, model=info.model or "", weights=store.weights_used(job_id), weights_sha256=store.weights_sha256(job_id),
        # A tag that could not be written is an error of the job (done_with_errors), though the
        # record's labels stand.
        state=final_state(len(dead), info.failed + tag_errors, len(missing)), total=info.total or 0,
        succeeded=info.succeeded, failed=info.failed, error_codes=info.error_codes, parts=parts,
        missing_parts=missing, dead_chunks=dead, sources=sources, error=error,
        format=opts.format, top_k=opts.top_k, tag=opts.tag, tag_errors=tag_errors,
        weights_requested=opts.weights,
        submitted_at=info.submitted_at, started_at=info.started_at,
        finished_at=datetime.now(timezone.utc) if info.finished_at is None else info.finished_at,
        created_at=datetime.now(timezone.utc), **manifest_fields(d if info.dest else None, job_id, raw))


def finalize(store: JobStore, job_id: str, policy: OutputPolicy | None = None) -> str | None:
    """Write the manifest, then set the final state. Raises when the manifest cannot be written
    (the caller retries, or calls :func:`finalize_or_fail`). Returns the job's state."""
    m = build_manifest(store, job_id, policy)
    if m is None:
        return None
    dest = store.raw(job_id).get("dest")
    if dest:
        d = open_destination(dest)
        index_for_finalize(store, job_id)   # --skip-labelled / --index jobs; never raises
        d.put(d.manifest_path(job_id), m.model_dump_json(indent=2).encode(), content_type="application/json")
    state = store.finish(job_id, m.state, m.error)
    log.info("job %s %s", job_id, state)
    if state in ("done", "done_with_errors", "failed", "cancelled"):
        # the stored inputs may hold credentials: only those redrive/resume still need stay (hnq.jobs.purge)
        keep = set() if state == "cancelled" else {x.chunk for x in m.dead_chunks} | set(m.missing_parts)
        purge_after_end(store, job_id, dest, len(m.parts) + len(m.missing_parts), keep)
    return state


def finalize_or_fail(store: JobStore, job_id: str, policy: OutputPolicy | None = None) -> str | None:
    """Finalise; if that fails, the job is marked failed with the reason (never left running)."""
    try:
        return finalize(store, job_id, policy)
    except Exception as e:  # noqa: BLE001 - any failure must end up in the job's state
        err = f"the manifest could not be written: {type(e).__name__}: {e}"
        log.error("job %s failed: %s", job_id, err)
        return store.finish(job_id, "failed", err)


def is_complete_unfinished(store: JobStore, job_id: str) -> bool:
    """Every chunk of a sealed job has an outcome, but the job has no final state yet."""
    h = store.raw(job_id)
    return (bool(h) and h.get("sealed") == "1" and h.get("state") in ("queued", "running")
            and int(h.get("chunks_done", 0)) >= int(h.get("chunks") or 0))


__all__ = ["final_state", "build_manifest", "finalize", "finalize_or_fail", "is_complete_unfinished"]
