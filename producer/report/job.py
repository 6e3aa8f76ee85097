"""What `hardnet report` knows of a job: from Redis while it still knows it, else from the job's
destination (DEST/JOB_ID/manifest.json and job.json), so that a job whose state Redis lost can
still be reported on."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from hnq.errors import ConfigError
from hnq.options import JobOptions
from hnq.storage import open_destination, validate_destination
from producer.connect import job_store

log = logging.getLogger("hardnet.report")


@dataclass
class JobView:
    job_id: str
    dest: str | None
    fmt: str
    chunks: int | None
    info: dict                 # what is known of the job (Redis JobInfo or the manifest)
    manifest: dict | None
    store: object = None       # the JobStore, when Redis knows the job


def open_job(s, job_id: str, dest: str | None) -> JobView:
    """What the report needs to know of a job: from Redis when it still knows it, else from
    DEST/JOB_ID/ (manifest.json, job.json)."""
    info = None
    store = None
    try:
        store = job_store(s)
        ji = store.info(job_id)
        if ji is not None:
            info = ji.model_dump(mode="json")
            raw = store.raw(job_id)
            info["_options"] = JobOptions.from_json(raw.get("options")).model_dump()
            try:
                info["_sources"] = json.loads(raw.get("sources") or "[]")
            except ValueError:
                info["_sources"] = []
    except Exception as e:  # noqa: BLE001 - Redis may be gone; storage may still have the job
        if not dest:
            raise
        log.info("Redis not used for the report: %s", e)
    if info is not None and dest and info.get("dest") and validate_destination(dest) != info["dest"]:
        raise ConfigError(f"job {job_id} writes to {info['dest']}, not {dest}")
    dest = (info or {}).get("dest") or (validate_destination(dest) if dest else None)
    manifest = None
    if dest:
        d = open_destination(dest)
        raw = d.get(f"{job_id}/manifest.json")
        manifest = json.loads(raw) if raw else None
        desc_raw = d.get(f"{job_id}/job.json")
        desc = json.loads(desc_raw) if desc_raw else {}
        if info is None:
            if manifest is None and not desc:
                raise ConfigError(f"no job {job_id} under {dest} (neither manifest.json nor job.json)")
            info = dict(manifest or {})
            info.setdefault("chunks", desc.get("chunks"))
            info.setdefault("model", desc.get("model"))
            info["_options"] = JobOptions.from_dict(desc.get("options")).model_dump()
            info["state"] = (manifest or {}).get("state", "unknown (Redis no longer knows it)")
        if info.get("chunks") is None:
            info["chunks"] = desc.get("chunks")
        if not info.get("_sources"):
            info["_sources"] = (manifest or {}).get("sources") or desc.get("sources") or []
        for k in ("submitted_at", "started_at", "finished_at"):
            if not info.get(k):
                info[k] = (manifest or {}).get(k) or desc.get(k)
    elif info is None:
        raise ConfigError(f"unknown job {job_id}: Redis does not know it; give --out DEST, where its "
                          "results were written")
    fmt = (info.get("_options") or {}).get("format", "jsonl")
    return JobView(job_id=job_id, dest=dest, fmt=fmt, chunks=info.get("chunks"), info=info,
                   manifest=manifest, store=store)
