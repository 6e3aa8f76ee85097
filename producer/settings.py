"""Producer settings: one class, every field documented, read from HARDNET_* variables."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field

from hnq.models import DEFAULT_MODEL
from hnq.settings import CommonSettings, ModelSetting


class ProducerSettings(CommonSettings):
    model: ModelSetting = Field(DEFAULT_MODEL, description="Default model for `hardnet submit` (--model overrides).")
    chunk_size: int = Field(
        512, ge=1, le=10_000,
        description="URIs per Celery task. Larger chunks = bigger batches and fewer messages (each "
        "costs about 1.2 KB of Redis while queued: 512 keeps a queued URI under 4 bytes); smaller = "
        "finer load balancing and less work redone after a crash.")
    redis_results_max: int = Field(
        100_000, ge=1, description="Largest job whose results may be kept in Redis (no --out); "
        "bigger ones are refused unless `submit --force`: results must not fill the broker.")
    upload_threads: int = Field(
        8, ge=1, le=128, description="Concurrent writes of chunk inputs (the claim check) to the "
        "destination during `submit`.")
    state_dir: Path = Field(
        Path.home() / ".local" / "state" / "hardnet",
        description="Where the producer remembers the jobs it submitted, so that `hardnet status` can "
        "tell a job whose state Redis lost from a job id that never existed.")
    poll_interval: float = Field(1.0, gt=0, description="Seconds between progress updates of --wait "
                                 "(the job's end is seen at once, not at the next update).")
    no_worker_notice: float = Field(
        30.0, ge=0, description="Seconds a wait (`submit --wait`, `wait`, `resume --wait`) watches a job "
        "that does not move before it looks for a live worker of the job's queue (the workers' "
        "heartbeats in Redis); if there is none it says so once, with how to start one. 0 = never.")
    heartbeat_interval: float = Field(
        5.0, gt=0, le=300, description="Seconds between the refreshes of a listing `submit`'s heartbeat "
        "in Redis; 6 intervals without one (the process killed) and the workers' sweeper marks the "
        "unsealed job `abandoned` (`hardnet resume JOB` seals and finishes it).")
    check_workers: bool = Field(
        True, description="`submit` reads what the live workers of its queue accept (their heartbeats: "
        "HARDNET_FILE_ROOTS, HARDNET_OUTPUT_ROOTS, buckets, http, job weights) and refuses, exit 2, a job "
        "none of them can run, naming the setting to change; with no live worker the job waits. "
        "false = submit without asking (a worker that accepts it will start later).")
    list_threads: int = Field(
        8, ge=1, le=256, description="Concurrent ListObjectsV2 requests when `submit` lists an S3 "
        "prefix: the prefix is fanned out over its folders (common prefixes), HARDNET_LIST_DEPTH levels "
        "deep; keys then come in no fixed order. 1 = one sorted stream (`submit --list-threads`).")
    list_depth: int = Field(
        2, ge=0, le=16, description="Levels of folders (common prefixes, Delimiter '/') below the "
        "given prefix that the listing fans out over; deeper folders are listed whole. Deeper = more "
        "parallel units but more requests for small folders (`submit --list-depth`).")
    spool_dir: Path | None = Field(
        None, description="Where `submit --skip-labelled` spools the listing (gzip, about 30 bytes "
        "per object) and Parquet inventory files are downloaded to; unset = the system temp "
        "directory (TMPDIR).")
