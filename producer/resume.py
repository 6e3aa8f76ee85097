"""`hardnet resume JOB [--out DEST]`: finish a job from what storage holds.

When Redis still knows the job, the chunks that are neither done, in flight nor still queued are
sent again (hnq.jobs.sweep.lost_chunks, the sweeper's rule, with a short quiet period). When Redis lost it (FLUSHALL, a restart without persistence), the job's state is rebuilt from
DEST/JOB_ID/: job.json (written by `submit`: model, chunk size, totals), the stored inputs
(inputs/chunk-N.jsonl.gz) and the parts. A part counts as complete when it holds one record per URI
of its chunk and no chunk_failed record; its counts (ok, failed, per error code) are read back from
it. Every other chunk is sent again, after the job is sealed, so the last one to finish writes the
manifest as usual.

Cost: one LIST per 1,000 parts, one GET per existing part (read with a few threads), one GET per
chunk sent again."""
from __future__ import annotations

import json
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from hnq.errors import ConfigError
from hnq.jobs.dispatch import DEFAULT_PRIORITY, Dispatcher
from hnq.jobs.finish import finalize_or_fail, is_complete_unfinished
from hnq.jobs.index import job_fields
from hnq.jobs.liveness import seal_abandoned
from hnq.jobs.parts import iter_parquet_records
from hnq.jobs.store import JobStore
from hnq.models import DEFAULT_MODEL
from hnq.options import JobOptions
from hnq.storage import open_destination, validate_destination
from hnq.jobs.sweep import RESUME_QUIET_S, lost_chunks, resend_chunk
from producer.settings import ProducerSettings
from producer.submit import LocalJobs, read_descriptor, sender, write_descriptor

log = logging.getLogger("hardnet.resume")


def _part_dicts(data: bytes, fmt: str):
    if fmt == "parquet":
        for rec in iter_parquet_records(data):
            yield rec.model_dump(mode="json", exclude_none=True)
        return
    for line in data.decode("utf-8", "replace").splitlines():
        if line.strip():
            yield json.loads(line)


def _part_outcome(data: bytes, expected: int, fmt: str = "jsonl") -> dict | None:
    """Counts of a complete part, or None when it is incomplete (or holds chunk_failed records)."""
    ok = failed = 0
    codes: Counter = Counter()
    weights = None
    uris = set()
    try:
        rows = list(_part_dicts(data, fmt))
    except ConfigError:
        raise                    # pyarrow missing here: say so, do not re-label the whole job
    except Exception:  # noqa: BLE001 - unreadable JSON / Parquet: an incomplete part
        return None
    for r in rows:
        uris.add(r.get("uri"))
        if r.get("tag_error"):
            codes["tag_error"] += 1
        if r.get("status") == "ok":
            ok += 1
            weights = weights or r.get("weights")
        else:
            code = (r.get("error") or {}).get("code", "internal_error")
            if code == "chunk_failed":
                return None      # a dead letter's records: labelling it again may succeed now
            failed += 1
            codes[code] += 1
    if ok + failed != expected or len(uris) != expected:
        return None
    return {"ok": ok, "failed": failed, "codes": dict(codes), "weights": weights}


def resume(s: ProducerSettings, store: JobStore, job_id: str, dest: str | None = None, app=None) -> dict:
    app = app or sender(s)
    got = _resume(s, store, job_id, dest, app)
    if got.get("sent"):       # idle workers start at once (hnq.jobs.dispatch)
        Dispatcher(store, app, s.dispatch_ahead).top_up(store.raw(job_id).get("queue") or s.queue)
    return got


def _resume(s: ProducerSettings, store: JobStore, job_id: str, dest: str | None, app) -> dict:
    info = store.info(job_id)
    if info is not None:
        return _resume_known(s, store, app, job_id, info, dest)
    if not dest:
        known = LocalJobs(s).get(job_id) or {}
        dest = known.get("dest")
    if not dest:
        raise ConfigError(f"Redis no longer knows job {job_id}: give --out DEST, the destination its "
                          "results were written to")
    dest = validate_destination(dest)
    desc = read_descriptor(dest, job_id)
    if desc is None:
        raise ConfigError(f"no job {job_id} under {dest} (no {job_id}/job.json there); a job whose "
                          "results were kept in Redis cannot be rebuilt from storage")
    if "chunks" not in desc:
        raise ConfigError(f"the submit of job {job_id} never finished listing its sources; submit them again")
    chunks, total, size = int(desc["chunks"]), int(desc["total"]), int(desc["chunk_size"])
    model = desc["model"]
    opts = JobOptions.from_dict(desc.get("options"))
    d = open_destination(dest)
    store.create(job_id, model=model, dest=dest, queue=s.queue, sources=desc.get("sources"),
                 chunk_size=size, submitted_at=desc.get("submitted_at"), state="running",
                 options=opts.to_json(), priority=desc.get("priority") or DEFAULT_PRIORITY)
    extra = job_fields(int(desc.get("skipped") or 0), bool(desc.get("index")))  # --skip-labelled / --index
    extra.update({k: desc[k] for k in ("skipped_by_extension", "skipped_extensions") if desc.get(k)})
    if extra:
        store.r.hset(store.key(job_id), mapping=extra)
    have = {p.rsplit("/", 1)[-1] for p in d.list(f"{job_id}/part-")}

    def check(c: int):
        name = d.part_path(job_id, c, opts.format)
        if name.rsplit("/", 1)[-1] not in have:
            return c, None
        data = d.get(name)
        return c, (_part_outcome(data, min(size, total - c * size), opts.format) if data is not None else None)

    to_send = []
    complete = 0
    with ThreadPoolExecutor(16) as ex:
        for c, out in ex.map(check, range(chunks)):
            if out is None:
                to_send.append(c)
            else:
                store.complete_chunk(job_id, c, out["ok"], out["failed"], codes=out["codes"],
                                     weights=out["weights"])
                complete += 1
    if store.seal(job_id, total, chunks):
        finalize_or_fail(store, job_id)
        return {"rebuilt": True, "complete": complete, "sent": []}
    sent = [c for c in to_send if resend_chunk(store, s.queue, job_id, c, model, dest)]
    gone = sorted(set(to_send) - set(sent))
    return {"rebuilt": True, "complete": complete, "sent": sent,
            "note": f"{len(gone)} chunks have no stored inputs: {gone[:20]}" if gone else ""}


def _resume_known(s, store: JobStore, app, job_id: str, info, dest: str | None) -> dict:
    if dest and info.dest and validate_destination(dest) != info.dest:
        raise ConfigError(f"job {job_id} writes to {info.dest}, not {dest}")
    if info.state == "cancelled":
        raise ConfigError(f"job {job_id} was cancelled: it is not resumed")
    if info.state == "abandoned" or (info.chunks is None and store.abandon_if_gone(job_id)):
        return _resume_abandoned(s, store, app, job_id)
    if info.chunks is None:
        raise ConfigError(f"job {job_id} is still being listed by its submit")
    done = store.done_chunks(job_id)
    if info.state in ("done", "done_with_errors", "failed") and len(done) >= info.chunks:
        return {"rebuilt": False, "complete": len(done), "sent": [], "note": f"already {info.state}"}
    if is_complete_unfinished(store, job_id):
        st = finalize_or_fail(store, job_id)      # None: another finaliser holds the job's lease
        return {"rebuilt": False, "complete": len(done), "sent": [],
                "note": f"finalised: {st}" if st else "another finaliser is finishing it"}
    # the sweeper's rule (hnq.jobs.sweep.lost_chunks): nothing done, in flight or still queued
    h = store.raw(job_id)
    queue = h.get("queue") or s.queue
    todo = lost_chunks(store, job_id, RESUME_QUIET_S, h=h)
    sent = [c for c in todo if resend_chunk(store, queue, job_id, c, info.model or DEFAULT_MODEL, info.dest)]
    return {"rebuilt": False, "complete": len(done), "sent": sent}


def _resume_abandoned(s, store: JobStore, app, job_id: str) -> dict:
    """Its submit died while listing (hnq.jobs.liveness): seal it with the chunks whose inputs were
    stored, send those never sent, and let it finish (or finish it now if all are done)."""
    got = seal_abandoned(store, job_id)
    raw = store.raw(job_id)
    dest, model = raw.get("dest") or None, raw.get("model") or "hardnet68"
    if dest:
        desc = read_descriptor(dest, job_id)
        if desc is not None:      # resume from storage alone needs the totals
            write_descriptor(open_destination(dest), job_id, **{k: v for k, v in desc.items() if k != "job_id"},
                             total=got["total"], chunks=got["chunks"])
    queue = raw.get("queue") or s.queue
    sent = [c for c in got["unsent"] if resend_chunk(store, queue, job_id, c, model, dest)]
    note = f"sealed with the {got['chunks']} chunks ({got['total']} URIs) its submit had stored"
    if got["complete"] or is_complete_unfinished(store, job_id):
        finalize_or_fail(store, job_id)
        note += "; finalised"
    return {"rebuilt": False, "complete": len(store.done_chunks(job_id)), "sent": sent, "note": note}
