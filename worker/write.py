"""Writing a chunk's records, a dead letter's records and (via hnq.jobs.finish) the job manifest. Names
are deterministic (part-<chunk>), so a retried or duplicated chunk overwrites its own part instead
of adding records."""
from __future__ import annotations

import logging
import time
from collections import Counter

from hnq.errors import ConfigError, ErrorCode
from hnq.jobs.finish import finalize, finalize_or_fail, is_complete_unfinished
from hnq.jobs.inputs import OutputPolicy, check_output, read_chunk_uris
from hnq.jobs.store import JobStore
from hnq.options import JobOptions
from hnq.jobs.parts import encode_part
from hnq.schema import ChunkTask, Manifest, ResultRecord
from hnq.storage import open_destination

log = logging.getLogger("hardnet.worker")


def to_jsonl(records: list[ResultRecord]) -> bytes:
    return "".join(r.to_json() + "\n" for r in records).encode()


def write_part(store: JobStore, dest: str | None, job_id: str, chunk: int, records: list[ResultRecord],
               options: JobOptions | None = None) -> None:
    """Store the chunk's part in the job's format (hnq.jobs.parts), then count its records
    (hardnet_images_total counts what was written, the chunk_failed records of a dead letter
    included) and the write's time. Parquet only to a destination (submit refuses it without
    --out, and a worker refuses a message that asks for it)."""
    from worker import metrics

    t0 = time.monotonic()
    fmt = options.format if options else "jsonl"
    top_k = options.top_k if options else 5
    if fmt != "jsonl" and not dest:
        raise ConfigError(f"{fmt} parts need a destination (--out); results kept in Redis are JSON Lines")
    data, ctype = encode_part(records, fmt, top_k=top_k, job_id=job_id)
    if dest:
        d = open_destination(dest)
        d.put(d.part_path(job_id, chunk, fmt), data, content_type=ctype)
    else:
        store.put_part(job_id, chunk, data)
    metrics.STAGE_SECONDS.labels("write").observe(time.monotonic() - t0)
    metrics.count_records(records)


def outcome_extras(records: list[ResultRecord]) -> dict:
    """The keyword arguments of JobStore.complete_chunk beyond ok/failed: error records per code
    and the weights the records were made with."""
    codes = Counter(r.error.code for r in records if r.error is not None)
    codes.update(r.tag_error.code for r in records if r.tag_error is not None)
    weights = next((r.weights for r in records if r.weights), None)
    return {"codes": {str(getattr(k, "value", k)): n for k, n in codes.items()}, "weights": weights}


def write_manifest(store: JobStore, dest: str | None, job_id: str) -> Manifest | None:
    """Kept for callers of the former API: finalise the job (manifest, then final state)."""
    finalize(store, job_id)
    from hnq.jobs.finish import build_manifest

    return build_manifest(store, job_id)


def dead_letter(store: JobStore, task: ChunkTask, uris: list[str] | None, error: str, attempts: int,
                policy: OutputPolicy | None = None, write: bool = True) -> str:
    """Give up on a chunk. Returns "kept" when an earlier attempt had completed it (its part and
    counts are left alone: a dead letter never overwrites a completed part), else "dead": the chunk
    is counted as failed, listed as a dead letter for `hardnet redrive`, and — when ``write`` and
    its URIs are known — every URI gets a chunk_failed record in its part. When this was the last
    chunk the job is finalised, and marked failed if even that fails (never left running)."""
    job, chunk = task.job_id, task.chunk
    finished = store.complete_dead(job, chunk, task.count, error, attempts)
    if finished is None:
        log.warning("chunk %s/%d was completed by an earlier attempt: its part is kept (delivery %d "
                    "after: %s)", job, chunk, attempts, error)
        if is_complete_unfinished(store, job):
            finalize_or_fail(store, job, policy)
        return "kept"
    log.error("chunk %s/%d dead-lettered after %d attempts: %s", job, chunk, attempts, error)
    if write and task.dest:
        try:
            check_output(task.dest, policy)
        except ConfigError:
            write = False     # a destination this worker may not use gets nothing from it
    if write and uris is None:
        try:
            got = read_chunk_uris(store, task.dest, job, chunk)
            uris = got[0] if got and len(got[0]) == task.count else None
        except Exception:  # noqa: BLE001 - the inputs may be what is failing
            uris = None
    if write and uris is not None:
        msg = f"chunk failed after {attempts} attempts: {error}"
        records = [ResultRecord.failure(u, ErrorCode.chunk_failed, msg, task.model, job_id=job) for u in uris]
        try:
            write_part(store, task.dest, job, chunk, records, task.options)
        except Exception as e:  # noqa: BLE001 - the destination itself may be what is failing
            log.error("could not write the failure records of %s/%d: %s", job, chunk, e)
        if store.is_completed(job, chunk):
            log.error("chunk %s/%d completed by another attempt while it was being dead-lettered: its "
                      "part may hold chunk_failed records although the job counts it as labelled", job, chunk)
    if finished:
        finalize_or_fail(store, job, policy)
    return "dead"
