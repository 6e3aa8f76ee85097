"""Submitting a job: stream the sources into chunks; write each chunk's URIs beside the job's
results (the claim check, :mod:`hnq.jobs.inputs`) and only then enqueue its small message, so a
million-key prefix is never held in memory and Redis holds about a kilobyte per chunk. The job is
"sealed" with its totals at the end, and DEST/JOB_ID/job.json describes it for `hardnet resume`.
Before anything is written, a job that no live worker of its queue can run is refused, naming the
setting to change (hnq.fleet, HARDNET_CHECK_WORKERS)."""
from __future__ import annotations

import itertools
import json
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from celery import Celery
from redis.exceptions import RedisError

from hnq.console import err
from hnq.errors import ConfigError
from hnq.fleet import JobNeeds, check_job
from hnq.jobs.dispatch import DEFAULT_PRIORITY, PRIORITIES, Dispatcher
from hnq.jobs.finish import finalize_or_fail
from hnq.jobs.index import job_fields
from hnq.jobs.liveness import Heartbeat
from hnq.jobs.inputs import store_chunk_uris
from hnq.jobs.purge import note_credentials
from hnq.jobs.store import JobStore, new_job_id
from hnq.options import DEFAULT_OPTIONS, JobOptions
from hnq.objects import to_entry
from hnq.models import DEFAULT_MODEL, MODELS
from hnq.schema import ChunkTask
from hnq.settings import TASK_FINALIZE, celery_config, lean_messages, redact_url
from hnq.jobs.sweep import resend_chunk, send_chunk
from hnq.storage import check_writable, open_destination, validate_destination
from producer.settings import ProducerSettings
from hnq.logs import redact_uri
from hnq.sources import chunked
from producer.args import field_bounds
from producer.joboptions import check_options, only_s3

if TYPE_CHECKING:
    from hnq.formats import ExtensionFilter
    from producer.incremental import SkipLabelled

log = logging.getLogger("hardnet.producer")



def sender(s: ProducerSettings) -> Celery:
    """A Celery app that only sends (same transport config as the workers, no task code, no torch)."""
    app = Celery("hardnet-producer")
    app.conf.update(celery_config(s))
    lean_messages(app)
    return app


def descriptor_path(job_id: str) -> str:
    return f"{job_id}/job.json"


def write_descriptor(d, job_id: str, **fields) -> None:
    d.put(descriptor_path(job_id), json.dumps({"job_id": job_id, **fields}, indent=2).encode())


def read_descriptor(dest: str, job_id: str) -> dict | None:
    d = open_destination(dest)
    data = d.get(descriptor_path(job_id))
    return json.loads(data) if data else None


@dataclass
class Submitted:
    job_id: str
    total: int
    chunks: int
    dest: str | None
    model: str
    skipped: int = 0


class LocalJobs:
    """The producer's own memory of what it submitted (job id, broker, Redis run id)."""

    def __init__(self, s: ProducerSettings):
        self.path = s.state_dir / "jobs.jsonl"

    def add(self, job_id: str, broker: str, run_id: str | None, dest: str | None = None) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps({"job_id": job_id, "broker": redact_url(broker), "run_id": run_id,
                                    "dest": dest, "at": time.time()}) + "\n")
        except OSError as e:  # a read-only home must not stop a submit
            log.warning("could not remember job %s in %s: %s", job_id, self.path, e)

    def get(self, job_id: str) -> dict | None:
        try:
            with self.path.open() as f:
                for line in f:
                    d = json.loads(line)
                    if d.get("job_id") == job_id:
                        return d
        except (OSError, ValueError):
            return None
        return None


NO_IMAGES = ("no images found in the given sources (a listing keeps the image extensions the workers "
             "decode, e.g. .jpg .png .heic; --extensions any takes every key)")


def _no_images(extensions: "ExtensionFilter | None") -> ConfigError:
    line = extensions.line() if extensions is not None else ""
    return ConfigError(f"no images found in the given sources ({line})" if line else NO_IMAGES)


def _too_big_for_redis(limit: int) -> ConfigError:
    return ConfigError(
        f"this job has more than {limit} images and no --out: its results would be kept in Redis and "
        "fill the broker. Give --out s3://BUCKET/PREFIX/ (or a directory), or --force "
        f"(limit: HARDNET_REDIS_RESULTS_MAX={limit})")


def submit(s: ProducerSettings, uris: Iterable[str], *, dest: str | None, model: str,
           chunk_size: int | None = None, store: JobStore | None = None, app: Celery | None = None,
           force: bool = False, sources: list[str] | None = None,
           options: JobOptions | None = None, skip: "SkipLabelled | None" = None,
           index: bool = False, extensions: "ExtensionFilter | None" = None,
           priority: str = DEFAULT_PRIORITY) -> Submitted:
    """``options``: the job's output options (hnq.options); ``skip``: a
    :class:`producer.incremental.SkipLabelled` filter (--skip-labelled, needs a destination);
    ``index``: build the job's labelled index when it ends (:mod:`hnq.jobs.index`);
    ``extensions``: the filter the sources were listed with (``uris`` come through it): what it
    skipped is recorded for the manifest (``skipped_by_extension``)."""
    if model not in MODELS:
        raise ConfigError(f"unknown model {model!r}: choose one of {', '.join(MODELS)}")
    if priority not in PRIORITIES:
        raise ConfigError(f"--priority {priority!r}: choose one of {', '.join(PRIORITIES)}")
    options = options or DEFAULT_OPTIONS
    check_options(options, dest, sources)
    size = s.chunk_size if chunk_size is None else chunk_size
    lo, hi = field_bounds(ProducerSettings, "chunk_size")
    if not lo <= size <= hi:   # 0 is not "the default": a caller that means it passes None
        raise ConfigError(f"--chunk-size {size}: give {lo} to {hi} (the bounds of HARDNET_CHUNK_SIZE)")
    if options.tag:
        uris = only_s3(uris)
    d = None
    if dest:
        dest = validate_destination(dest)
    uris = iter(uris)
    store = store or JobStore.from_settings(s)
    # Can a live worker run it? Before anything is written (hnq.fleet): the SOURCE arguments, or
    # for a --from-file / --inventory job its first URI; the destination; job-named weights.
    direct = [x for x in sources or [] if not x.startswith(("@", "inventory:"))]
    first = None if direct else next(uris, None)
    note = None
    if s.check_workers:
        needs = JobNeeds.of(direct or ([first] if first else []), dest=dest, weights=options.weights)
        try:
            note = check_job(store.r, s.queue, needs)
        except RedisError as e:     # Redis away: what follows fails with its own message
            note = None
            log.debug("live workers not checked: %s", e)
    if dest:
        check_writable(dest)              # a missing bucket / unwritable directory: fail now
        d = open_destination(dest)
    if skip is not None and d is None:
        raise ConfigError("--skip-labelled / --since need --out DEST (the earlier jobs' results)")
    # The first URI before the job exists: sources that hold no image (or whose first listing
    # fails) are refused with nothing created.
    if direct:
        first = next(uris, None)
    if first is None:
        raise _no_images(extensions)
    uris = itertools.chain([first], uris)
    if note:      # no live worker: said once the job is sure to exist (other refusals come first)
        err(note)
    # What the job records about its sources is for display (status, manifest): no credentials.
    sources = [redact_uri(x) for x in sources or []]   # an S3 prefix stays exact; URL credentials go
    app = app or sender(s)
    job_id = new_job_id()
    now = time.time()
    meta = dict(model=model, dest=dest, queue=s.queue, chunk_size=size, sources=(sources or [])[:100],
                submitted_at=now, options=options.model_dump(), priority=priority)
    if d is not None:
        write_descriptor(d, job_id, **meta)
    store.create(job_id, model=model, dest=dest, queue=s.queue, sources=sources, chunk_size=size,
                 submitted_at=now, options=options.to_json(), priority=priority)
    # Until the job is sealed: if this process dies while listing, the job becomes `abandoned`.
    beat = Heartbeat(store, job_id, s.heartbeat_interval).__enter__()
    msg_options = options.for_message()
    try:
        run_id = store.r.info("server").get("run_id")
    except Exception:  # noqa: BLE001
        run_id = None
    LocalJobs(s).add(job_id, s.broker_url, run_id, dest)
    if skip is not None:
        skip.start(d, job_id)
        uris = skip.filter(uris)
    total = chunks = 0
    window = 2 * s.upload_threads
    pending: deque = deque()
    pool = ThreadPoolExecutor(s.upload_threads, thread_name_prefix="hardnet-upload")
    try:
        dispatcher = Dispatcher(store, app, s.dispatch_ahead)

        def send_oldest() -> None:
            c, n, fut = pending.popleft()
            task = ChunkTask(job_id=job_id, chunk=c, count=n, digest=fut.result(), model=model, dest=dest,
                             options=msg_options)
            send_chunk(store, s.queue, task, priority)
            if c == 0:      # idle workers (blocked on the empty queue) start at once
                dispatcher.top_up(s.queue)

        for chunk in chunked(map(to_entry, uris), size):   # precoded records: hnq.objects
            if d is None and not force and total + len(chunk) > s.redis_results_max:
                raise _too_big_for_redis(s.redis_results_max)
            # Inputs are written by a few threads; each chunk is sent, in chunk order, once its
            # inputs are stored. At most `window` chunks are held in memory.
            pending.append((chunks, len(chunk), pool.submit(_store_inputs, store, d, job_id, chunks, chunk)))
            chunks += 1
            total += len(chunk)
            while pending and (len(pending) > window or pending[0][2].done()):
                send_oldest()
        while pending:
            send_oldest()
        dispatcher.top_up(s.queue)
    except BaseException:
        # Listing failed half way (or Ctrl-C, or a refused size): what was sent will be dropped.
        for _, _, fut in pending:
            fut.cancel()
        store.cancel(job_id)
        beat.__exit__(None, None, None)
        raise
    finally:
        pool.shutdown(wait=True)
    skipped = skip.finish()["skipped"] if skip is not None else 0
    if total == 0 and not skipped:
        store.cancel(job_id)
        beat.__exit__(None, None, None)
        raise _no_images(extensions)
    extra = job_fields(skipped, index and d is not None)    # for finalize and resume
    if extensions is not None:
        extra.update(extensions.job_fields())              # skipped_by_extension: the manifest
    if extra:
        store.r.hset(store.key(job_id), mapping=extra)
    if d is not None:
        write_descriptor(d, job_id, **meta, total=total, chunks=chunks, **extra)
    sealed_complete = store.seal(job_id, total, chunks)
    beat.__exit__(None, None, None)
    if sealed_complete:
        if chunks == 0:   # everything was labelled before: nothing for a worker to do
            finalize_or_fail(store, job_id)
        else:
            # Every chunk finished before we had counted them: no worker saw a "last" chunk.
            app.send_task(TASK_FINALIZE, args=[job_id, dest], queue=s.queue)
    return Submitted(job_id=job_id, total=total, chunks=chunks, dest=dest, model=model, skipped=skipped)


def _store_inputs(store: JobStore, d, job_id: str, chunk: int, entries: list) -> str:
    """A chunk's claim check; the job is marked first when a URI holds a credential, so that its
    inputs are deleted when it ends or is cancelled, even if no worker ever loaded a chunk
    (hnq.jobs.purge)."""
    if d is not None:
        note_credentials(d.dest, job_id, entries)
    return store_chunk_uris(store, d, job_id, chunk, entries)


def requeue_dead(s: ProducerSettings, store: JobStore, job_id: str, chunk: int | None = None,
                 app: Celery | None = None) -> int:
    """Send a job's dead-lettered chunks again (after fixing what made them fail)."""
    info = store.info(job_id)
    if info is None:
        raise ConfigError(f"unknown job {job_id}")
    if info.state == "cancelled":
        raise ConfigError(f"job {job_id} was cancelled: its chunks are not sent again "
                          "(submit the sources again for a new job)")
    app = app or sender(s)
    queue = store.raw(job_id).get("queue") or s.queue
    n = 0
    for d in store.dead_letters(job_id):
        if chunk is not None and d.chunk != chunk:
            continue
        store.reset_attempts(job_id, d.chunk)
        if resend_chunk(store, queue, job_id, d.chunk, info.model or DEFAULT_MODEL, info.dest):
            n += 1
    if n:
        Dispatcher(store, app, s.dispatch_ahead).top_up(queue)
    return n
