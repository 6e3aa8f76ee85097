"""Celery tasks: thin wrappers that validate the message and hand the chunk to the pipeline.

Reliability rules (docs/reliability.md): acks_late + reject_on_worker_lost + prefetch 1, so a chunk
is acknowledged only once its part is written; deliveries are counted in Redis, so a chunk that
keeps failing (or keeps killing its worker) goes to the dead-letter list after `max_attempts`
instead of being redelivered forever (celery#8969)."""
from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time

from celery import signals
from pydantic import ValidationError

from hnq.errors import ConfigError, TransientError
from hnq.jobs.inputs import load_chunk_entries
from hnq.jobs.store import JobStore
from hnq.objects import with_precoded
from hnq.schema import ChunkTask, ResultRecord
from hnq.settings import TASK_CLASSIFY, TASK_FINALIZE
from worker import metrics
from worker.admission import BATCHES_IN_FLIGHT
from worker.app import admission, app, settings
from worker.settings import WorkerSettings

log = logging.getLogger("hardnet.worker")


class Context:
    """Per-process state, built lazily (never in a fork parent: CUDA): the engines
    (worker/engine_pool.py: one per model and weights that jobs ask for, at most HARDNET_MAX_ENGINES,
    loaded on first use), shared by every chunk in flight (the threads pool runs
    `chunks_in_flight` tasks at once). The configured model is loaded at start-up; a job that asks
    for another variant or checkpoint gets it loaded on first use, so `hardnet submit --model /
    --weights` is always honoured."""

    def __init__(self, s: WorkerSettings):
        import torch

        from worker.engine_pool import EnginePool

        self.s = s
        self.store = JobStore(s.broker_url, s.results_ttl_days)
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
            f"torch_threads={torch.get_num_threads()}")

    def weights_for(self, model: str, job_weights: str | None) -> str | None:
        """The weights a chunk of ``model`` is labelled with (ConfigError when the job names a
        checkpoint this worker may not load)."""
        from worker.engine_pool import check_job_weights, resolve_job_weights

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
        from worker.engine import build_engine
        from worker.engine.classifier import Classifier

        s = self.s
        t0 = time.monotonic()
        clf = Classifier(model, weights, device=s.device, batch_size=s.batch_size or None,
                         amp=s.amp, fast_jpeg=s.fast_jpeg, max_pixels=s.max_pixels)
        eng = build_engine(clf, s.fetch_policy(), fetch_threads=s.fetch_threads,
                           decode_threads=s.decode_threads, batch_wait_s=s.batch_wait_ms / 1000,
                           retry=s.retry_policy(), compile=s.compile, cuda_graphs=s.cuda_graphs,
                           torchscript=s.torchscript,
                           decode=s.decode, gc_threshold=s.gc_threshold, torch_threads=s.torch_threads,
                           warm_up=clf.device.type == "cuda" or s.compile)
        metrics.instrument(eng, model)
        metrics.engine_loaded(model, clf.device, time.monotonic() - t0)
        log.info("engine for %s: weights=%s sha256=%s", model, clf.weights, clf.weights_sha256)
        return eng

    @staticmethod
    def _close(engine) -> None:
        engine.close()
        engine.classifier = None
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass


_ctx: Context | None = None
_ctx_lock = threading.Lock()


def context() -> Context:
    global _ctx
    with _ctx_lock:
        if _ctx is None:
            _ctx = Context(settings)
        return _ctx


_plain_store: JobStore | None = None


def _store() -> JobStore:
    # The job store alone (no model): enough to drop cancelled chunks without loading weights.
    global _plain_store
    if _ctx is not None:
        return _ctx.store
    if _plain_store is None:
        _plain_store = JobStore(settings.broker_url, settings.results_ttl_days)
    return _plain_store


def _dead_letter(store: JobStore, task: ChunkTask, error: str, attempts: int) -> None:
    """Give up on a chunk (worker/write.py: dead_letter): never over a part that an earlier
    attempt completed; otherwise chunk_failed records, a dead letter for `hardnet redrive`, and the
    job finalised if this was its last chunk."""
    from worker.write import dead_letter

    if dead_letter(store, task, None, error, attempts, settings.output_policy()) == "dead":
        metrics.CHUNKS.labels("dead_lettered").inc()


def _finalize(store: JobStore, dest: str | None, job_id: str) -> None:
    from hnq.jobs.finish import finalize

    finalize(store, job_id, settings.output_policy())


@app.task(name=TASK_CLASSIFY, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def classify_chunk(self, payload: dict) -> dict | None:
    try:
        task = ChunkTask.model_validate(payload)
    except ValidationError as e:
        # Nothing to retry: a malformed message would fail the same way every time.
        v = payload.get("v") if isinstance(payload, dict) else None
        if isinstance(v, int) and v > 3:
            log.error("rejected a chunk message of schema version %s: this worker reads versions 2 and 3 "
                      "(upgrade it); the sweeper re-sends the chunk for another worker", v)
        else:
            log.error("rejected a malformed chunk message: %s", e.errors(include_input=False))
        return None
    from hnq.logs import chunk_context

    with chunk_context(task.job_id, task.chunk):  # this thread's log lines name the job and chunk
        return _classify_chunk(self, task)


def _classify_chunk(self, task: ChunkTask) -> dict | None:
    store = _store()
    state, attempt = store.start_chunk(task.job_id, task.chunk)
    if state == "cancelled":
        log.info("chunk %s/%d dropped: job cancelled", task.job_id, task.chunk)
        metrics.CHUNKS.labels("cancelled").inc()
        return None
    if state == "missing":
        log.warning("job %s unknown to Redis (state lost?): labelling chunk %d anyway", task.job_id, task.chunk)
    if attempt > settings.max_attempts:
        # Delivered again after max_attempts: the earlier deliveries failed or killed the worker.
        err = store.last_error(task.job_id, task.chunk) or "the worker died while processing it (killed, crashed or out of memory)"
        _dead_letter(store, task, err, attempt - 1)
        return None

    from worker.write import outcome_extras, write_part

    log.info("chunk %s/%d attempt %d started: %d URIs", task.job_id, task.chunk, attempt, task.count)
    t0 = time.monotonic()
    try:
        entries = load_chunk_entries(store, task, settings.output_policy())
        opts = task.opts
        if opts.format != "jsonl" and not task.dest:
            raise ConfigError(f"{opts.format} parts need a destination; this message has none")
        if opts.format == "parquet":
            from hnq.jobs.parts import require_pyarrow

            require_pyarrow()   # a worker without pyarrow: a configuration error, before any labelling
        with context().lease(task.model, opts.weights) as engine:
            # precoded entries (archived / 0-byte objects, hnq.objects) get their record unfetched
            records = with_precoded(entries, task.model, task.job_id, lambda uris: _run_in_engine(
                engine, store, task, uris, watch=state != "missing"), weights=engine.classifier.weights)
            clf, summary = engine.classifier, engine.summary()   # the engine may be swapped out after
        if records is None:
            log.info("chunk %s/%d dropped in flight: job cancelled", task.job_id, task.chunk)
            metrics.CHUNKS.labels("cancelled").inc()
            return None
        from worker.outputs import finish_records

        records = finish_records(records, opts, tag_threads=settings.tag_threads,
                                 name=f"{task.job_id}/{task.chunk}")
        write_part(store, task.dest, task.job_id, task.chunk, records, task.options)
        ok = sum(r.status == "ok" for r in records)
        log.info("chunk %s/%d done: ok=%d failed=%d rss=%.0fMiB %s", task.job_id, task.chunk, ok,
                 len(records) - ok, _rss_mb(), summary)
        if state != "missing":
            _note_weights_once(store, task.job_id, clf.weights, clf.weights_sha256)
        # Inside the try: if the manifest can't be written the chunk is retried, and the retry
        # (idempotent) finds the job complete again and writes it then.
        if state != "missing" and store.complete_chunk(task.job_id, task.chunk, ok, len(records) - ok,
                                                        **outcome_extras(records)):
            _finalize(store, task.dest, task.job_id)
        metrics.CHUNKS.labels("done").inc()
        metrics.CHUNK_SECONDS.observe(time.monotonic() - t0)
    except Exception as e:  # noqa: BLE001
        err = f"{type(e).__name__}: {e}"
        if state != "missing":
            store.note_error(task.job_id, task.chunk, err)
        if attempt >= settings.max_attempts or isinstance(e, ConfigError):  # config: no retry
            if state != "missing":
                _dead_letter(store, task, err, attempt)
            return None
        delay = min(settings.retry_backoff_max, 2 ** attempt) * random.uniform(0.5, 1.0)
        level = logging.WARNING if isinstance(e, TransientError) else logging.ERROR
        log.log(level, "chunk %s/%d attempt %d failed (%s); retrying in %.1fs",
                 task.job_id, task.chunk, attempt, err, delay)
        metrics.CHUNKS.labels("retried").inc()
        raise self.retry(exc=e, countdown=delay)
    return {"ok": ok, "failed": len(records) - ok}


_noted: dict[tuple[str, str, str], None] = {}   # insertion-ordered: the oldest go first
_noted_lock = threading.Lock()


def _note_weights_once(store: JobStore, job_id: str, weights: str, sha256: str) -> None:
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


#: How often a task waiting on its chunk looks whether the job was cancelled meanwhile.
CANCEL_POLL_S = 1.0


def _run_in_engine(engine, store: JobStore, task: ChunkTask, uris: list[str], *,
                   watch: bool) -> list[ResultRecord] | None:
    """Hand the chunk's URIs to the engine and wait for one record per URI, in order. Returns None
    when the job is cancelled meanwhile (its remaining images are dropped from the engine).
    StorageDown (a TransientError) propagates: the whole chunk is retried."""
    chunk = engine.submit(uris, job_id=task.job_id, name=f"{task.job_id}/{task.chunk}", top_k=task.opts.top_k)
    try:
        while not chunk.wait(CANCEL_POLL_S):
            if watch and store.job_state(task.job_id) == "cancelled":
                chunk.cancel()
                return None
        return chunk.result()
    finally:
        if not chunk.wait(0):
            chunk.cancel()   # an exception here (e.g. Redis down while polling): stop its images


@app.task(name=TASK_FINALIZE, acks_late=True, reject_on_worker_lost=True)
def finalize_job(job_id: str, dest: str | None = None) -> None:
    """Sent by the producer when every chunk finished before it had counted them all."""
    from hnq.jobs.finish import finalize_or_fail

    finalize_or_fail(_store(), job_id, settings.output_policy())


# --- memory guard -------------------------------------------------------------------------------
#: Set when this process asked to be recycled; `hardnet worker` re-executes itself when it sees it.
recycle_requested = threading.Event()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@signals.task_postrun.connect
def _memory_guard(**_):
    limit = settings.max_memory_per_child_mb
    if not limit or recycle_requested.is_set():
        return
    rss = _rss_mb()
    if rss > limit:
        log.warning("worker RSS %.0f MiB exceeds HARDNET_MAX_MEMORY_PER_CHILD_MB=%d: restarting after this chunk",
                    rss, limit)
        recycle_requested.set()
        # Warm shutdown: the current chunk is already acknowledged; nothing in flight is lost.
        os.kill(os.getpid(), signal.SIGTERM)


@signals.worker_ready.connect
def _say_ready(**_):
    # Logged here, not at load time: Celery has set up its log handlers (and our format) by now.
    if _ctx is not None:
        log.info("worker ready: %s", _ctx.summary)


# --- metrics (worker.metrics; HARDNET_METRICS_PORT) ---------------------------------------------
def _live_engines() -> list:
    return _ctx.engines.live() if _ctx is not None else []


def _start_metrics(prefork: bool) -> None:
    """Serve /metrics, once per process, before the model loads (a port in use fails in seconds,
    not after the weights). Refused with a prefork pool: each forked child would count its own
    chunks in its own registry, and this process's endpoint would show none of them. (worker.app
    sets the threads pool, which even `celery worker --pool=prefork` does not override here, so
    this guard is for a changed configuration, as _preload's own prefork check is.)"""
    port = settings.metrics_port
    if port is None:
        return
    if prefork:
        raise ConfigError("HARDNET_METRICS_PORT needs the threads (or solo) pool: with prefork each "
                          "child process would count its own chunks and this endpoint would show "
                          "none of them (`hardnet worker` uses the threads pool)")
    metrics.register_runtime(_live_engines)
    metrics.serve(port)


@signals.worker_ready.connect
def _log_metrics(**_):
    # Logged here, not when the server starts (worker_init): Celery's logging is set up by now.
    url = metrics.served_at()
    if url:
        log.info("metrics on %s (HARDNET_METRICS_PORT)", url)


@signals.task_prerun.connect
def _chunk_started(sender=None, **_):
    if getattr(sender, "name", None) == TASK_CLASSIFY:
        metrics.CHUNKS_IN_FLIGHT.inc()


@signals.task_postrun.connect
def _chunk_ended(sender=None, **_):
    # Sent after every task run, returned, raised or retried (celery.app.trace).
    if getattr(sender, "name", None) == TASK_CLASSIFY:
        metrics.CHUNKS_IN_FLIGHT.dec()


@signals.worker_init.connect
def _preload(sender=None, **_):
    """Load the model before taking the first chunk: a worker whose weights can't be loaded stops
    here with the reason, instead of failing (and dead-lettering) every chunk it takes. Not in a
    prefork parent, where CUDA would then be unusable in the children. The metrics endpoint starts
    first."""
    prefork = "prefork" in str(getattr(sender, "pool_cls", "")).lower()
    try:
        _start_metrics(prefork)
    except ConfigError as e:
        log.critical("cannot start the worker: %s", e)
        raise SystemExit(78) from e  # EX_CONFIG
    if prefork:
        return
    try:
        context()
    except Exception as e:  # noqa: BLE001
        # A worker that cannot label must not take chunks: it would fail and dead-letter them all.
        # SystemExit is not swallowed by Celery's signal dispatch (it catches Exception).
        log.critical("cannot start the worker: %s", e)
        raise SystemExit(78) from e  # EX_CONFIG
