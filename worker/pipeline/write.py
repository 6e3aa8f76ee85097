"""Writing a chunk's records and the job manifest. Names are deterministic (part-<chunk>), so a
retried or duplicated chunk overwrites its own part instead of adding records."""
from __future__ import annotations

from datetime import datetime, timezone

from hnq.jobs import JobStore
from hnq.schema import Manifest, ResultRecord
from hnq.storage import open_destination


def to_jsonl(records: list[ResultRecord]) -> bytes:
    return "".join(r.to_json() + "\n" for r in records).encode()


def write_part(store: JobStore, dest: str | None, job_id: str, chunk: int, records: list[ResultRecord]) -> None:
    data = to_jsonl(records)
    if dest:
        d = open_destination(dest)
        d.put(d.part_path(job_id, chunk), data, content_type="application/x-ndjson")
    else:
        store.put_part(job_id, chunk, data)


def write_manifest(store: JobStore, dest: str | None, job_id: str) -> Manifest | None:
    info = store.info(job_id)
    if info is None or info.chunks is None:
        return None
    if dest:
        d = open_destination(dest)
        parts = [d.part_path(job_id, c).rsplit("/", 1)[-1] for c in range(info.chunks)]
    else:
        parts = [f"redis:{store.key(job_id, 'part', str(c))}" for c in range(info.chunks)]
    m = Manifest(job_id=job_id, model=info.model or "", state="done", total=info.total or 0,
                 succeeded=info.succeeded, failed=info.failed, parts=parts,
                 created_at=datetime.now(timezone.utc))
    if dest:
        d.put(d.manifest_path(job_id), m.model_dump_json(indent=2).encode(), content_type="application/json")
    return m
