"""Labelling one chunk in a worker process: the engine context, the body of a chunk's task, and the
dead-letter glue around it (worker.tasks holds only the Celery tasks that call it).

Reliability rules (docs/reliability.md): a chunk's part is written before its task returns (and so
before the message is acknowledged: acks_late); deliveries are counted in Redis, so a chunk that
keeps failing (or keeps killing its worker) goes to the dead-letter list after `max_attempts`
instead of being redelivered forever (celery#8969).
Long: one chunk's whole protocol in a worker (claim, lease, label, keep, write, count, dead letter)
reads best in one place.

Idempotent deliveries (docs/reliability.md, "One delivery, one effect"): before anything else a
delivery claims the chunk in Redis (JobStore.claim_and_start): a chunk already done is acknowledged
without reading or fetching anything; one whose lease another attempt holds waits for that lease
(the delivery is retried when it expires, without counting an attempt); otherwise this attempt
holds the lease, renewed while it runs (:class:`Leases`). Records finished by an attempt that
then fails (storage down, a part write that failed) are kept (hnq.jobs.parts.keep_records) and
the next attempt fetches only the others."""
from __future__ import annotations

import ctypes
import gc
import logging
import os
import random
import threading
import time
import uuid
from collections import Counter
from typing import Callable

from hnq.errors import ConfigError, TransientError
from hnq.jobs.finish import finalize_or_fail, is_complete_unfinished
from hnq.jobs.inputs import load_chunk_entries
from hnq.jobs.purge import note_credentials
from hnq.jobs import parts
from hnq.jobs.store import JobStore
from hnq.objects import PrecodedRecords, entry_uri, with_precoded
from hnq.options import TOP_K_DEFAULT, JobOptions
from hnq.schema import ChunkTask, ResultRecord
from hnq.storage.s3.tags import tag_records
from worker import metrics, shutdown
from worker.admission import BATCHES_IN_FLIGHT, Admission
from worker.engine_pool import EnginePool, check_job_weights, resolve_job_weights
from worker.settings import WorkerSettings

log = logging.getLogger("hardnet.worker")

#: How often a task waiting on its chunk looks whether the job was cancelled meanwhile.
CANCEL_POLL_S = 1.0


class Context:
    """Per-process state, built lazily (never in a fork parent: CUDA): the engines
    (worker/engine_pool.py: one per model and weights that jobs ask for, at most HARDNET_MAX_ENGINES,
    loaded on first use), shared by every chunk in flight (the threads pool runs
    `chunks_in_flight` tasks at once). The configured model is loaded at start-up; a job that asks
    for another variant or checkpoint gets it loaded on first use, so `hardnet submit --model /
    --weights` is always honoured."""

    def __init__(self, s: WorkerSettings, admission: Admission):
        import torch  # torch only once the engines are built, not when Celery imports the tasks

        self.s = s
        self.store = JobStore.from_settings(s)
        self.engines = EnginePool(self._build, s.max_engines, close=self._close)
        first = self.engine(s.model)
        clf = first.classifier
        # Now that the device's batch size is known: the images a worker holds in flight.
        admission.configure(s.images_in_flight or BATCHES_IN_FLIGHT * clf.batch_size)
        self.summary = (
            f"model={s.model} weights={clf.weights} sha256={clf.weights_sha256} device={clf.device} "
            f"batch={clf.batch_size} amp={clf.amp} chunks_in_flight={s.chunks_in_flight}.."
            f"{s.pool_size} images_in_flight={admission.images} "
            f"fetch_threads={first.cfg.fetch_threads} decode_threads={first.cfg.decode_threads} "
            f"torch_threads={torch.get_num_threads()} "
            f"bytes_in_flight={first.budget.limit / 2**20:.0f}MiB")

    def weights_for(self, model: str, job_weights: str | None) -> str | None:
        """The weights a chunk of ``model`` is labelled with (ConfigError when the job names a
        checkpoint this worker may not load)."""
        s = self.s
        if job_weights is not None:
            check_job_weights(job_weights, tuple(s.job_weights_allow or ()), s.weights)
        return resolve_job_weights(model, job_weights, s.model, s.weights)

    def engine(self, model: str, job_weights: str | None = None):
        """The engine of (model, weights), not held (start-up, logs); chunks use :meth:`lease`."""
        return self.engines.get(model, self.weights_for(model, job_weights))

    def lease(self, model: str, job_weights: str | None = None):
        return self.engines.lease(model, self.weights_for(model, job_weights))

    def _build(self, model: str, weights: str | None):
        # torch and the model code: imported by the first engine built, not by Celery's task import
        from worker.engine import build_engine
        from worker.engine.classifier import Classifier

        s = self.s
        t0 = time.monotonic()
        clf = Classifier(model, weights, device=s.device, batch_size=s.batch_size or None,
                         amp=s.amp, fast_jpeg=s.fast_jpeg, max_pixels=s.max_pixels)
        release_freed_memory()   # the weights' loading temporaries, before the trace adds its own
        eng = build_engine(clf, s.fetch_policy(), fetch_threads=s.fetch_threads,
                           decode_threads=s.decode_threads, batch_wait_s=s.batch_wait_ms / 1000,
                           retry=s.retry_policy(), compile=s.compile, cuda_graphs=s.cuda_graphs,
                           torchscript=s.torchscript,
                           decode=s.decode, gc_threshold=s.gc_threshold, torch_threads=s.torch_threads,
                           bytes_in_flight=s.bytes_in_flight, memory_limit_mb=s.max_memory_per_child_mb,
                           warm_up=clf.device.type == "cuda" or s.compile)
        release_freed_memory()   # the trace's
        metrics.instrument(eng, model)
        metrics.engine_loaded(model, clf.device, time.monotonic() - t0)
        log.info("engine for %s: weights=%s sha256=%s", model, clf.weights, clf.weights_sha256)
        return eng

    @staticmethod
    def _close(engine) -> None:
        engine.close()
        engine.classifier = None
        try:
            import torch  # already loaded by the engine being closed

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass


class ChunkRunner:
    """The chunk labelling of one worker process: its :class:`Context`, built once on first use
    (worker.lifecycle builds it at start-up), and the job store alone for what needs no model
    (dropping a cancelled chunk, finalising a job)."""

    def __init__(self, settings: WorkerSettings, admission: Admission):
        self.settings = settings
        self.admission = admission
        self._ctx: Context | None = None
        self._ctx_lock = threading.Lock()
        self._plain_store: JobStore | None = None
        self.leases = Leases(self.store)
        #: called with the job id when a chunk completes its job (worker.lifecycle sets the finaliser)
        self.job_complete: Callable[[str], None] = self.finalize_job

    @property
    def built(self) -> Context | None:
        """The context if it was built (start-up logs, metrics), else None; builds nothing."""
        return self._ctx

    def context(self) -> Context:
        with self._ctx_lock:
            if self._ctx is None:
                self._ctx = Context(self.settings, self.admission)
            return self._ctx

    def store(self) -> JobStore:
        # The job store alone (no model): enough to drop cancelled chunks without loading weights.
        if self._ctx is not None:
            return self._ctx.store
        if self._plain_store is None:
            self._plain_store = JobStore.from_settings(self.settings)
        return self._plain_store

    def dead_letter(self, store: JobStore, task: ChunkTask, error: str, attempts: int) -> None:
        """Give up on a chunk (hnq.jobs.parts.dead_letter): never over a part that an earlier
        attempt completed; otherwise chunk_failed records, a dead letter for `hardnet redrive`, and
        the job finalised if this was its last chunk."""
        if parts.dead_letter(store, task, None, error, attempts, self.settings.output_policy(),
                             observe=metrics.part_written) == "dead":
            metrics.CHUNKS.labels("dead_lettered").inc()

    def finalize_job(self, job_id: str) -> None:
        finalize_or_fail(self.store(), job_id, self.settings.output_policy())

    def run(self, task: ChunkTask, retry: Callable[..., BaseException]) -> dict | None:
        """Label one delivery of ``task`` and write its part. ``retry``: the Celery task's own
        ``retry`` (it raises); a chunk that failed ``max_attempts`` times, or with a configuration
        error, is dead-lettered instead."""
        settings = self.settings
        store = self.store()
        if shutdown.stopping():
            # the worker is stopping (worker.shutdown): back to the queue untouched, nothing counted
            store.mark_sent(task.job_id, [task.chunk])
            raise shutdown.HandedBack(f"chunk {task.job_id}/{task.chunk} handed back unstarted: the "
                                      "worker is stopping")
        token = uuid.uuid4().hex[:16]
        lease_s = max(2, min(settings.chunk_lease_s, settings.visibility_timeout))
        # the claim and, when it takes the lease, the chunk's start: one script (hnq.jobs.store)
        verdict, at, started = store.claim_and_start(task.job_id, task.chunk, token, lease_s)
        if verdict == "done":
            log.info("chunk %s/%d was completed by an earlier attempt: delivery acknowledged, nothing "
                     "fetched", task.job_id, task.chunk)
            metrics.CHUNKS.labels("duplicate").inc()
            if is_complete_unfinished(store, task.job_id):
                self.job_complete(task.job_id)
            return None
        if verdict == "busy":
            wait = max(1.0, at - time.time()) + random.uniform(0.0, 1.0)
            log.info("chunk %s/%d is being run by another attempt: this delivery checks again in %.0fs "
                     "(when that attempt's lease would expire)", task.job_id, task.chunk, wait)
            metrics.CHUNKS.labels("deferred").inc()
            raise retry(countdown=wait)
        if verdict != "ok":
            return self._run(store, task, retry)          # cancelled, or a job Redis lost
        self.leases.hold(task.job_id, task.chunk, token, lease_s)
        lease = _Lease(token)
        try:
            return self._run(store, task, retry, started, lease)
        finally:
            # released already when the chunk's completion did it (JobStore.complete_chunk)
            self.leases.drop(task.job_id, task.chunk, token, release=not lease.released)

    def _run(self, store: JobStore, task: ChunkTask, retry: Callable[..., BaseException],
             started: tuple[str, int, bool] | None = None, lease: "_Lease | None" = None) -> dict | None:
        """``started``: (state before, delivery number, whether records were kept) when the claim
        started the chunk (JobStore.claim_and_start), else None (started here); ``lease``: the
        attempt's lease, released by the chunk's completion."""
        settings = self.settings
        if started is None:
            state, attempt = store.start_chunk(task.job_id, task.chunk)
            any_kept = True          # not known: read them
        else:
            state, attempt, any_kept = started
        if state == "cancelled":
            log.info("chunk %s/%d dropped: job cancelled", task.job_id, task.chunk)
            metrics.CHUNKS.labels("cancelled").inc()
            return None
        if state == "missing":
            log.warning("job %s unknown to Redis (state lost?): labelling chunk %d anyway", task.job_id, task.chunk)
        if attempt > settings.max_attempts:
            # Delivered again after max_attempts: the earlier deliveries failed or killed the worker.
            err = store.last_error(task.job_id, task.chunk) or "the worker died while processing it (killed, crashed or out of memory)"
            self.dead_letter(store, task, err, attempt - 1)
            return None

        log.info("chunk %s/%d attempt %d started: %d URIs", task.job_id, task.chunk, attempt, task.count)
        t0 = time.monotonic()
        raw: list[ResultRecord] | None = None       # the chunk's records before the job's options
        try:
            entries = load_chunk_entries(store, task, settings.output_policy())
            note_credentials(task.dest, task.job_id, entries)   # inputs with credentials: deleted at the end
            opts = task.opts
            if opts.format != "jsonl" and not task.dest:
                raise ConfigError(f"{opts.format} parts need a destination; this message has none")
            if opts.format == "parquet":
                parts.require_pyarrow()   # a worker without pyarrow: a configuration error, before any labelling
            # records an earlier attempt finished (hnq.jobs.parts.keep_records): not fetched again
            kept = (parts.kept_records(store, task.job_id, task.chunk, lambda: [entry_uri(e) for e in entries])
                    if state != "missing" and any_kept else {})
            todo = [i for i in range(len(entries)) if i not in kept] if kept else range(len(entries))
            clf = None
            summary = f"{len(kept)} records kept from an earlier attempt, nothing fetched"
            fresh: list | None = []
            if todo:
                if kept:
                    log.info("chunk %s/%d: %d records kept from an earlier attempt, %d to label",
                             task.job_id, task.chunk, len(kept), len(todo))

                def keep(partial: list) -> None:   # storage down: keep what the engine finished
                    if state != "missing":
                        fetch_pos = [i for i in todo if isinstance(entries[i], str)]
                        parts.keep_records(store, task.job_id, task.chunk,
                                           {fetch_pos[j]: r for j, r in enumerate(partial) if r is not None})

                with self.context().lease(task.model, opts.weights) as engine:
                    # precoded entries (archived / 0-byte objects, hnq.objects) get their record unfetched
                    fresh = with_precoded([entries[i] for i in todo] if kept else entries, task.model, task.job_id,
                                          lambda uris: run_in_engine(engine, store, task, uris,
                                                                     watch=state != "missing", keep=keep),
                                          weights=engine.classifier.weights)
                    clf, summary = engine.classifier, engine.summary()   # the engine may be swapped out after
            if fresh is None:
                log.info("chunk %s/%d dropped in flight: job cancelled", task.job_id, task.chunk)
                metrics.CHUNKS.labels("cancelled").inc()
                return None
            if kept:
                got = dict(zip(todo, fresh))
                raw = [kept[i] if i in kept else got[i] for i in range(len(entries))]
            else:
                raw = fresh     # in the entries' order (PrecodedRecords for a chunk of archived objects)
            records = finish_records(raw, opts, tag_threads=settings.tag_threads,
                                     name=f"{task.job_id}/{task.chunk}",
                                     tag_buckets=settings.fetch_policy().source_buckets)
            # conditional: a complete part another attempt wrote stands, and is what gets counted
            records = write_part(store, task.dest, task.job_id, task.chunk, records, task.options)
            extras = outcome_extras(records)
            ok = extras.pop("ok")
            log.info("chunk %s/%d done: ok=%d failed=%d rss=%.0fMiB %s", task.job_id, task.chunk, ok,
                     len(records) - ok, rss_mb(), summary)
            if state != "missing" and clf is not None:
                note_weights_once(store, task.job_id, clf.weights, clf.weights_sha256)
            # The last chunk hands the job to the finaliser (worker.lifecycle: its own leased
            # step, outside this chunk's message). The same script drops the kept records (the
            # part is written) and releases this attempt's lease.
            if state != "missing":
                done = store.complete_chunk(task.job_id, task.chunk, ok, len(records) - ok, **extras,
                                            drop_kept=True, lease=lease.token if lease else None)
                if lease is not None:
                    lease.released = True
                if done:
                    self.job_complete(task.job_id)
            metrics.CHUNKS.labels("done").inc()
            metrics.CHUNK_SECONDS.observe(time.monotonic() - t0)
        except shutdown.HandedBack as e:
            # the worker is stopping and its grace is over (worker.shutdown): run_in_engine kept the
            # finished records; the attempt does not count, and the message goes back to the queue
            log.warning("chunk %s/%d: %s", task.job_id, task.chunk, e.reason)
            if state != "missing":
                store.uncount_attempt(task.job_id, task.chunk)
                store.mark_sent(task.job_id, [task.chunk])
            metrics.CHUNKS.labels("handed_back").inc()
            raise
        except Exception as e:  # noqa: BLE001
            err = f"{type(e).__name__}: {e}"
            if state != "missing":
                store.note_error(task.job_id, task.chunk, err)
                if raw is not None:     # labelled, then the write failed: the retry only writes
                    parts.keep_records(store, task.job_id, task.chunk, dict(enumerate(raw)))
            if attempt >= settings.max_attempts or isinstance(e, ConfigError):  # config: no retry
                if state != "missing":
                    self.dead_letter(store, task, err, attempt)
                return None
            delay = min(settings.retry_backoff_max, 2 ** attempt) * random.uniform(0.5, 1.0)
            level = logging.WARNING if isinstance(e, TransientError) else logging.ERROR
            log.log(level, "chunk %s/%d attempt %d failed (%s); retrying in %.1fs",
                    task.job_id, task.chunk, attempt, err, delay)
            metrics.CHUNKS.labels("retried").inc()
            if state != "missing":
                store.mark_retry(task.job_id, task.chunk, time.time() + delay)
            raise retry(exc=e, countdown=delay)
        return {"ok": ok, "failed": len(records) - ok}


def run_in_engine(engine, store: JobStore, task: ChunkTask, uris: list[str], *,
                  watch: bool, keep: Callable[[list], None] | None = None) -> list[ResultRecord] | None:
    """Hand the chunk's URIs to the engine and wait for one record per URI, in order. Returns None
    when the job is cancelled meanwhile (its remaining images are dropped from the engine).
    StorageDown (a TransientError) propagates: the whole chunk is retried, after ``keep`` was given
    the records finished so far (None where an image has none), so the retry fetches only the rest."""
    chunk = engine.submit(uris, job_id=task.job_id, name=f"{task.job_id}/{task.chunk}", top_k=task.opts.top_k)
    try:
        while not chunk.wait(CANCEL_POLL_S):
            if shutdown.due():      # the worker is stopping, its grace is over (worker.shutdown)
                chunk.cancel()
                done = list(chunk.records)
                if keep is not None:
                    keep(done)
                raise shutdown.HandedBack(
                    f"handed back to the queue with {sum(r is not None for r in done)} of {len(uris)} "
                    "images labelled (kept for the next attempt): the worker is stopping")
            if watch and store.job_state(task.job_id) == "cancelled":
                chunk.cancel()
                return None
        if isinstance(chunk.error, TransientError) and keep is not None:
            keep(list(chunk.records))
        return chunk.result()
    finally:
        if not chunk.wait(0):
            chunk.cancel()   # an exception here (e.g. Redis down while polling): stop its images


def write_part(store: JobStore, dest: str | None, job_id: str, chunk: int, records: list[ResultRecord],
               options: JobOptions | None = None) -> list[ResultRecord]:
    """Store the chunk's part (hnq.jobs.parts.write_part: conditional, a complete part stands),
    then count its records (hardnet_images_total counts what was written, the chunk_failed records
    of a dead letter included) and the write's time. Returns the records the part holds."""
    return parts.write_part(store, dest, job_id, chunk, records, options, observe=metrics.part_written)


class _Lease:
    """One attempt's chunk lease: its token, and whether the chunk's completion released it."""
    __slots__ = ("token", "released")

    def __init__(self, token: str):
        self.token, self.released = token, False


class Leases:
    """The chunk leases this process holds (hnq:job:ID:lease), renewed by one daemon thread every
    third of their length while their chunks run; a lease that is no longer ours (it expired and
    another attempt took it) is logged and no longer renewed (the conditional part write keeps a
    complete part safe either way)."""

    def __init__(self, store: Callable[[], JobStore]):
        self._store = store
        self._held: dict[tuple[str, int], tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, job_id: str, chunk: int, token: str, lease_s: float) -> None:
        with self._lock:
            self._held[(job_id, chunk)] = (token, lease_s)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True, name="hardnet-leases")
                self._thread.start()

    def drop(self, job_id: str, chunk: int, token: str, release: bool = True) -> None:
        """No longer renewed; and released in Redis unless ``release`` is False (the chunk's
        completion released it)."""
        with self._lock:
            if self._held.get((job_id, chunk), ("",))[0] == token:
                del self._held[(job_id, chunk)]
        if not release:
            return
        try:
            self._store().release_chunk_lease(job_id, chunk, token)
        except Exception as e:  # noqa: BLE001 - it expires by itself
            log.warning("could not release the lease of chunk %s/%d: %s", job_id, chunk, e)

    def _loop(self) -> None:
        while True:
            with self._lock:
                held = dict(self._held)
            period = min((ls for _, ls in held.values()), default=30.0) / 3
            self._wake.wait(period)
            for (job, chunk), (token, lease_s) in held.items():
                try:
                    if not self._store().renew_chunk_lease(job, chunk, token, lease_s):
                        with self._lock:
                            if self._held.get((job, chunk), ("",))[0] == token:
                                del self._held[(job, chunk)]
                                log.warning("chunk %s/%d: its lease was lost (expired and taken by "
                                            "another attempt)", job, chunk)
                except Exception as e:  # noqa: BLE001 - Redis restarting: try again next period
                    log.warning("could not renew the lease of chunk %s/%d: %s", job, chunk, e)


# --- what a job's options (hnq.options) do to a chunk's records between the engine and the part --
def name_labels(records: list[ResultRecord], top_k: int) -> list[ResultRecord]:
    """Records carry their labels as ``top5`` for the default k, as ``topk`` for any other (a
    ``top5`` of 3 labels would be a lie, and readers of today's ``top5`` keep working)."""
    if top_k == TOP_K_DEFAULT:
        return records
    return [r.model_copy(update={"topk": r.top5, "top5": None}) if r.top5 is not None else r
            for r in records]


def finish_records(records: list[ResultRecord], options: JobOptions, *, tag_threads: int = 16,
                   name: str = "", tag_buckets: tuple[str, ...] | None = None) -> list[ResultRecord]:
    """The top-k field name, then the S3 tag write-back (``--tag``; only objects of
    ``tag_buckets``, HARDNET_SOURCE_BUCKETS, None = any). Records of precoded entries only (a chunk
    of archived objects: error records, no labels) are left as they are."""
    if isinstance(records, PrecodedRecords):
        return records
    records = name_labels(records, options.top_k)
    if options.tag:
        records, counts = tag_records(records, threads=tag_threads, buckets=tag_buckets)
        log.info("chunk %s tags: %s", name, counts)
    return records


def outcome_extras(records: list[ResultRecord]) -> dict:
    """The keyword arguments of JobStore.complete_chunk beyond ok/failed: error records per code
    and the weights the records were made with; and ``ok``, the records labelled."""
    if isinstance(records, PrecodedRecords):   # all error records: counted from their entries
        return {"codes": dict(records.codes()), "weights": records.weights or None, "ok": 0}
    codes = Counter(r.error.code for r in records if r.error is not None)
    codes.update(r.tag_error.code for r in records if r.tag_error is not None)
    weights = next((r.weights for r in records if r.weights), None)
    return {"codes": {str(getattr(k, "value", k)): n for k, n in codes.items()}, "weights": weights,
            "ok": sum(r.status == "ok" for r in records)}


# --- the manifest's weights_sha256, noted once ---------------------------------------------------
_noted: dict[tuple[str, str, str], None] = {}   # insertion-ordered: the oldest go first
_noted_lock = threading.Lock()


def note_weights_once(store: JobStore, job_id: str, weights: str, sha256: str) -> None:
    """The manifest's weights_sha256: one Redis write per job and checkpoint in this process, not
    one per chunk (the last 1,024 remembered)."""
    key = (job_id, weights, sha256)
    with _noted_lock:
        if key in _noted:
            return
    store.note_weights_sha256(job_id, weights, sha256)
    with _noted_lock:
        _noted[key] = None
        while len(_noted) > 1024:
            del _noted[next(iter(_noted))]


def release_freed_memory() -> None:
    """Give the memory that building an engine freed back to the kernel: a collection, then
    glibc's ``malloc_trim(0)``. The `hardnet` torch commands raise glibc's trim threshold so that
    a batch's activation buffers stay in the process (worker/commands.py), which also kept the
    weights' loading temporaries and the trace's (55 and 8 MiB of hardnet39ds here) resident for
    the worker's life; and each came before the next step's allocations, so the worker's peak
    RSS held both. Nothing where the C library has no malloc_trim (not glibc)."""
    gc.collect()
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def rss_mb() -> float:
    """This process's resident memory in MiB (chunk log lines, the memory guard)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
