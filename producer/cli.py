"""`hardnet` — the command line. The producer commands never import torch; `classify`, `worker`
and `demo` import the worker side lazily."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from hnq.errors import ConfigError, HardnetError
from hnq.schema import MODELS

# Exit codes (documented in the README).
EXIT_OK = 0
EXIT_ERROR = 1            # unexpected failure
EXIT_USAGE = 2            # bad arguments or configuration
EXIT_SOME_FAILED = 3      # the job/command finished, but some images could not be labelled
EXIT_JOB_FAILED = 4       # the job itself failed, was cancelled, or its state was lost
EXIT_TIMEOUT = 5          # `wait`/`submit --wait --timeout`: gave up waiting; the job goes on

#: exit code of a job that ended in this state
STATE_EXIT = {"done": EXIT_OK, "done_with_errors": EXIT_SOME_FAILED, "failed": EXIT_JOB_FAILED,
              "cancelled": EXIT_JOB_FAILED, "lost": EXIT_JOB_FAILED}


class BrokerUnreachable(Exception):
    """First contact with Redis failed within seconds (the CLI does not wait minutes)."""



def _err(msg: str) -> None:
    print(f"hardnet: {msg}", file=sys.stderr)


# ---------------------------------------------------------------------------------------- classify
def cmd_classify(a: argparse.Namespace) -> int:
    from collections import deque

    from hnq.storage import FetchPolicy
    from producer.sources import expand_sources
    from worker.engine import build_engine
    from worker.model.weights import weights_from_env
    from worker.pipeline.predict import Classifier

    weights = a.weights or weights_from_env()
    clf = Classifier(a.model, weights, device=a.device, batch_size=a.batch_size, fast_jpeg=a.fast_jpeg)
    # A local command for the user's own files: local paths anywhere, http(s) to any host.
    policy = FetchPolicy(allow_http=True, http_allow_hosts=("*",), allow_private_networks=True,
                         file_roots=None)
    engine = build_engine(clf, policy, fetch_threads=32)
    emit = (lambda r: print(r.to_json(), flush=True)) if a.json else _print_human
    failed = 0
    group: list[str] = []
    in_flight: deque = deque()   # groups handed to the engine, printed in order as they finish

    def drain(keep: int) -> None:
        nonlocal failed
        while len(in_flight) > keep:
            # No chunk-level retry here: an image whose storage kept failing gets its own record.
            for rec in in_flight.popleft().result():
                failed += rec.status != "ok"
                emit(rec)

    def send() -> None:
        if group:
            in_flight.append(engine.submit(list(group), storage_down_retry=False))
            group.clear()
            drain(keep=3)

    try:
        for src in a.inputs:
            try:
                for uri in expand_sources([src]):
                    group.append(uri)
                    if len(group) >= max(64, 2 * clf.batch_size):
                        send()
            except ConfigError:
                # Not expandable (missing, malformed, unknown scheme): fetching it as it is gives
                # the input its record with the same stable code a worker would give it.
                group.append(src)
        send()
        drain(keep=0)
    finally:
        engine.close()
    return EXIT_SOME_FAILED if failed else EXIT_OK


def _print_human(rec) -> None:
    print(rec.uri + ("  [random weights: labels meaningless]" if rec.weights == "random" else ""))
    if rec.status == "ok":
        for t in rec.top5:
            print(f"  {t.score:8.4f}  {t.label}")
    else:
        print(f"  ERROR {rec.error.code}: {rec.error.message}")
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------ submit
def _settings():
    from producer.settings import ProducerSettings

    return ProducerSettings()


def _store(s):
    """The job store, once Redis has answered (within about 8 s, or BrokerUnreachable). After that
    first contact the store rides out a Redis restart with its long backoff (`--wait`)."""
    import redis

    from hnq.jobs import JobStore

    store = JobStore(s.broker_url, s.results_ttl_days)
    try:
        store.ping_fast(8.0)
    except redis.AuthenticationError:
        raise
    except (redis.ConnectionError, redis.TimeoutError) as e:
        raise BrokerUnreachable(str(e)) from None
    return store


def cmd_submit(a: argparse.Namespace) -> int:
    from producer.sources import expand_sources, read_uri_list
    from producer.submit import submit

    s = _settings()
    if not a.sources and not a.from_file:
        raise ConfigError("nothing to submit: give SOURCE arguments or --from-file")

    def uris():
        if a.sources:
            yield from expand_sources(a.sources)
        if a.from_file:
            yield from read_uri_list(a.from_file)

    sources = list(a.sources) + ([f"@{a.from_file}"] if a.from_file else [])
    job = submit(s, uris(), dest=a.out, model=a.model or s.model, chunk_size=a.chunk_size,
                 store=_store(s), force=a.force, sources=sources)
    if a.json:
        print(json.dumps({"job_id": job.job_id, "total": job.total, "chunks": job.chunks,
                          "dest": job.dest, "model": job.model}), flush=True)
    else:
        print(job.job_id, flush=True)
        _err(f"job {job.job_id}: {job.total} images in {job.chunks} chunks -> {job.dest or 'redis'}")
    if not a.wait:
        return EXIT_OK
    return wait_for(s, job.job_id, json_out=a.json, timeout=a.timeout)


def cmd_wait(a: argparse.Namespace) -> int:
    s = _settings()
    store = _store(s)
    if store.info(a.job) is None:
        return _lost(s, store, a.job, a.json)
    return wait_for(s, a.job, json_out=a.json, timeout=a.timeout, store=store)


def wait_for(s, job_id: str, *, json_out: bool = False, timeout: float | None = None, store=None) -> int:
    """Progress until the job ends; the exit code follows its final state (STATE_EXIT)."""
    from hnq.schema import FINAL_STATES

    store = store or _store(s)
    start = time.monotonic()
    tty = sys.stderr.isatty()
    last = ""
    while True:
        info = store.info(job_id)
        if info is None:
            _err(f"job {job_id}: state lost (Redis no longer knows it; was it restarted without persistence?)")
            return EXIT_JOB_FAILED
        line = _progress_line(info)
        if line != last:
            print(("\r" if tty else "") + line + ("" if tty else "\n"), end="", file=sys.stderr, flush=True)
            last = line
        if info.state in FINAL_STATES:
            break
        if timeout and time.monotonic() - start > timeout:
            _err(f"\ngave up waiting after {timeout:.0f}s; the job goes on (hardnet wait {job_id})")
            return EXIT_TIMEOUT
        time.sleep(s.poll_interval)
    if tty:
        print(file=sys.stderr)
    summary = info.model_dump(mode="json")
    if json_out:
        print(json.dumps(summary), flush=True)
    else:
        codes = ", ".join(f"{k}={v}" for k, v in info.error_codes.items())
        _err(f"job {job_id} {info.state}: {info.succeeded} labelled, {info.failed} failed of {info.total}"
             + (f" ({codes})" if codes else "")
             + (f", {info.dead_chunks} dead-lettered chunks (hardnet redrive {job_id})" if info.dead_chunks else "")
             + (f"; {info.error}" if info.error else ""))
    return STATE_EXIT.get(info.state, EXIT_JOB_FAILED)


def _progress_line(info) -> str:
    done = info.succeeded + info.failed
    total = info.total
    if total:
        width = 30
        fill = int(width * done / total)
        bar = "#" * fill + "-" * (width - fill)
        pct = f"{100 * done / total:5.1f}%"
    else:
        bar, pct = "listing...", ""
    rate = f"{info.rate:.1f} img/s" if info.rate else "- img/s"
    eta = f"ETA {info.eta_s:.0f}s" if info.eta_s is not None else ""
    return (f"[{bar}] {pct} {info.state} ok={info.succeeded} failed={info.failed} "
            f"total={total if total is not None else '?'} {rate} {eta}").rstrip()


# ------------------------------------------------------------------------------------------ status
def cmd_status(a: argparse.Namespace) -> int:
    s = _settings()
    store = _store(s)
    if not a.job:
        rows = [store.info(j) for j in store.recent(a.limit)]
        rows = [r for r in rows if r]
        if a.json:
            print(json.dumps([r.model_dump(mode="json") for r in rows]))
        else:
            for r in rows:
                print(f"{r.job_id}  {r.state:9}  {r.succeeded + r.failed}/{r.total if r.total is not None else '?'}"
                      f"  failed={r.failed}  model={r.model}  dest={r.dest or 'redis'}")
        return EXIT_OK
    info = store.info(a.job)
    if info is None:
        return _lost(s, store, a.job, a.json)
    from hnq.sweep import stalled_chunks

    dead = store.dead_letters(a.job)
    stalled = stalled_chunks(store, a.job, s.visibility_timeout)
    if a.json:
        d = info.model_dump(mode="json")
        d["dead_letters"] = [{"chunk": x.chunk, "uris": x.count, "attempts": x.attempts, "error": x.error}
                             for x in dead]
        d["stalled_chunks"] = stalled
        print(json.dumps(d))
    else:
        for k, v in info.model_dump(mode="json").items():
            if v is not None:
                print(f"{k:13} {v}")
        for x in dead:
            print(f"dead chunk {x.chunk}: {x.count} URIs, {x.attempts} attempts, last error: {x.error}")
        if dead:
            print(f"re-drive with: hardnet redrive {a.job}")
        if stalled:
            print(f"stalled chunks ({len(stalled)}: neither queued, in flight nor done for over "
                  f"{s.visibility_timeout}s): {stalled[:50]}; the workers' sweeper re-sends them, or "
                  "run: hardnet sweep")
    return EXIT_OK


def _lost(s, store, job_id: str, json_out: bool) -> int:
    from producer.submit import LocalJobs

    known = LocalJobs(s).get(job_id)
    if known:
        try:
            run_id = store.r.info("server").get("run_id")
        except Exception:  # noqa: BLE001
            run_id = None
        why = ("Redis was restarted since (run id changed) and kept no data: turn persistence on "
               "(appendonly yes)" if run_id and known.get("run_id") and run_id != known["run_id"]
               else "Redis no longer has it (flushed, expired or restarted without persistence)")
        msg = f"job {job_id} was submitted from here but its state is lost: {why}"
        state = "lost"
    else:
        msg = f"unknown job {job_id} (never submitted to this Redis, expired, or its state was lost)"
        state = "unknown"
    if json_out:
        print(json.dumps({"job_id": job_id, "state": state, "error": msg}))
    _err(msg)
    return EXIT_JOB_FAILED


# ----------------------------------------------------------------------------------------- results
def cmd_results(a: argparse.Namespace) -> int:
    from hnq.storage import open_destination

    s = _settings()
    store = _store(s)
    info = store.info(a.job)
    if info is None:
        return _lost(s, store, a.job, False)
    if info.chunks is None:
        raise ConfigError(f"job {a.job} is still being listed; try again shortly")
    dest = open_destination(info.dest) if info.dest else None
    out = open(a.output, "w") if a.output else sys.stdout
    missing = 0
    try:
        for c in range(info.chunks):
            if dest:
                data = dest.get(dest.part_path(a.job, c))
                text = data.decode() if data is not None else None
            else:
                text = store.get_part(a.job, c)
            if text is None:
                missing += 1
                continue
            for line in text.splitlines():
                if a.failed_only and '"status":"ok"' in line:
                    continue
                out.write(line + "\n")
    finally:
        if a.output:
            out.close()
    if missing:
        _err(f"{missing} of {info.chunks} chunks have no results yet (job {info.state})")
        return EXIT_SOME_FAILED if info.state == "done" else EXIT_OK
    return EXIT_OK


def cmd_cancel(a: argparse.Namespace) -> int:
    s = _settings()
    state = _store(s).cancel(a.job)
    if state == "missing":
        _err(f"unknown job {a.job}")
        return EXIT_JOB_FAILED
    if state != "cancelled":
        _err(f"job {a.job} already ended ({state}): nothing changed")
        return EXIT_OK
    _err(f"job {a.job} cancelled: chunks not yet started will be dropped")
    return EXIT_OK


def cmd_resume(a: argparse.Namespace) -> int:
    from producer.resume import resume

    s = _settings()
    r = resume(s, _store(s), a.job, dest=a.out)
    _err(f"job {a.job}: {r['rebuilt'] and 'state rebuilt from storage; ' or ''}{r['complete']} chunks "
         f"complete, {len(r['sent'])} sent again" + (f" {r['sent'][:20]}" if r['sent'] else "")
         + (f"; {r['note']}" if r.get("note") else ""))
    if a.wait:
        return wait_for(s, a.job, timeout=a.timeout)
    return EXIT_OK


def cmd_sweep(a: argparse.Namespace) -> int:
    from hnq.sweep import sweep
    from producer.submit import sender

    s = _settings()
    store = _store(s)
    sent = sweep(store, sender(s), s.visibility_timeout, jobs=[a.job] if a.job else None)
    for job, chunks in sent.items():
        print(f"{job}: re-sent {len(chunks)} stalled chunk(s) {chunks[:50]}")
    if not sent:
        _err("no stalled chunks")
    return EXIT_OK


def cmd_redrive(a: argparse.Namespace) -> int:
    from producer.submit import requeue_dead

    s = _settings()
    n = requeue_dead(s, _store(s), a.job, a.chunk)
    _err(f"re-sent {n} dead-lettered chunk(s) of job {a.job}")
    return EXIT_OK if n else EXIT_SOME_FAILED


# ------------------------------------------------------------------------------------------ worker
def _export_worker_options(a: argparse.Namespace) -> None:
    """CLI options become HARDNET_* variables so `celery -A worker.app` and we read one config."""
    for opt, env in (("model", "HARDNET_MODEL"), ("weights", "HARDNET_WEIGHTS"), ("device", "HARDNET_DEVICE"),
                     ("batch_size", "HARDNET_BATCH_SIZE"), ("chunks_in_flight", "HARDNET_CHUNKS_IN_FLIGHT")):
        v = getattr(a, opt, None)
        if v is not None:
            os.environ[env] = str(v)


def cmd_worker(a: argparse.Namespace) -> int:
    _export_worker_options(a)
    from worker import tasks
    from worker.app import app, settings

    argv = ["worker", "--pool=threads", f"--concurrency={settings.chunks_in_flight}", "-Q", settings.queue,
            f"--loglevel={a.loglevel}", "--without-gossip", "--without-mingle"]
    if a.hostname:
        argv.append(f"--hostname={a.hostname}")
    argv += a.celery_args
    app.worker_main(argv)
    if tasks.recycle_requested.is_set():
        # Memory guard tripped: start afresh in a new process image (same arguments).
        _err("restarting the worker (memory guard)")
        os.execv(sys.executable, [sys.executable, "-m", "producer.cli", *sys.argv[1:]])
    return EXIT_OK


# -------------------------------------------------------------------------------------------- demo
def cmd_demo(a: argparse.Namespace) -> int:
    from producer.demo import run_demo

    return run_demo(a)


# ---------------------------------------------------------------------------------------- argparse
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hardnet", description="Label images with HarDNet, locally or on a worker fleet.")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("classify", help="label local files, directories or URIs right here")
    c.add_argument("inputs", nargs="+", metavar="PATH_OR_URI")
    c.add_argument("--model", default="hardnet68", choices=MODELS)
    c.add_argument("--weights", help="path, file:// or http(s):// checkpoint, or 'random' (default: official)")
    c.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    c.add_argument("--batch-size", type=int, help="default: 256 on a GPU, 32 on the CPU")
    c.add_argument("--fast-jpeg", action="store_true", help="faster, very slightly different decode of big JPEGs")
    c.add_argument("--json", action="store_true", help="one JSON object per image")
    c.set_defaults(fn=cmd_classify)

    s = sub.add_parser("submit", help="enqueue a job for the workers")
    s.add_argument("sources", nargs="*", metavar="SOURCE",
                   help="file, directory, file://, s3://bucket/key, s3://bucket/prefix/, http(s)://")
    s.add_argument("--from-file", metavar="F", help="one URI per line ('-' = stdin)")
    s.add_argument("--out", metavar="DEST", help="s3://bucket/prefix/, file:///dir/ or a directory (default: Redis)")
    s.add_argument("--model", choices=MODELS)
    s.add_argument("--chunk-size", type=int)
    s.add_argument("--wait", action="store_true", help="show progress and wait for the end")
    s.add_argument("--timeout", type=float, metavar="S", help="with --wait: give up waiting after S seconds (exit 5)")
    s.add_argument("--force", action="store_true",
                   help="allow a job above HARDNET_REDIS_RESULTS_MAX images without --out (results kept in Redis)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_submit)

    wt = sub.add_parser("wait", help="show a job's progress until it ends; exit code as submit --wait")
    wt.add_argument("job")
    wt.add_argument("--timeout", type=float, metavar="S", help="give up waiting after S seconds (exit 5)")
    wt.add_argument("--json", action="store_true", help="print the final summary as JSON")
    wt.set_defaults(fn=cmd_wait)

    rs = sub.add_parser("resume", help="finish a job from its stored inputs and parts (e.g. after Redis lost it)")
    rs.add_argument("job")
    rs.add_argument("--out", metavar="DEST", help="the job's destination (needed when Redis no longer knows the job)")
    rs.add_argument("--wait", action="store_true", help="then wait for the end, as submit --wait")
    rs.add_argument("--timeout", type=float, metavar="S", help="with --wait: give up after S seconds (exit 5)")
    rs.set_defaults(fn=cmd_resume)

    sw = sub.add_parser("sweep", help="re-send chunks of live jobs that are neither queued, in flight nor done")
    sw.add_argument("job", nargs="?", help="only this job (default: the recent live jobs)")
    sw.set_defaults(fn=cmd_sweep)

    st = sub.add_parser("status", help="a job's state, or the recent jobs")
    st.add_argument("job", nargs="?")
    st.add_argument("--limit", type=int, default=20)
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=cmd_status)

    r = sub.add_parser("results", help="a job's records as JSON Lines")
    r.add_argument("job")
    r.add_argument("-o", "--output", metavar="FILE")
    r.add_argument("--failed-only", action="store_true")
    r.set_defaults(fn=cmd_results)

    k = sub.add_parser("cancel", help="drop a job's chunks that have not started")
    k.add_argument("job")
    k.set_defaults(fn=cmd_cancel)

    rd = sub.add_parser("redrive", help="send a job's dead-lettered chunks again")
    rd.add_argument("job")
    rd.add_argument("--chunk", type=int, help="only this chunk")
    rd.set_defaults(fn=cmd_redrive)

    w = sub.add_parser("worker", help="run a Celery worker (one per GPU); extra args go to celery")
    w.add_argument("--model", choices=MODELS)
    w.add_argument("--weights")
    w.add_argument("--device")
    w.add_argument("--batch-size", type=int)
    w.add_argument("--chunks-in-flight", type=int, help="chunks worked on at once (threads pool size)")
    w.add_argument("--hostname")
    w.add_argument("--loglevel", default="INFO")
    w.add_argument("celery_args", nargs=argparse.REMAINDER)
    w.set_defaults(fn=cmd_worker)

    d = sub.add_parser("demo", help="set up a local Redis + worker and label the bundled samples")
    d.add_argument("--model", default="hardnet68", choices=MODELS)
    d.add_argument("--weights", help="default: official, falling back to random if they cannot be downloaded")
    d.add_argument("inputs", nargs="*", help="images or directories (default: the bundled samples)")
    d.set_defaults(fn=cmd_demo)
    return p


def _is_broker_error(e: BaseException) -> bool:
    import kombu.exceptions
    import redis

    return isinstance(e, (redis.exceptions.RedisError, kombu.exceptions.OperationalError))


#: glibc returns the model's large activation buffers to the kernel after every batch by default
#: (thousands of page faults per image on the CPU). Raising these thresholds keeps them in the
#: process: measured 1.3-1.6x more images/s for hardnet39ds on the CPU (docs/performance.md), same
#: RSS. glibc reads them only at process start, hence the re-exec.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4000000000", "MALLOC_TRIM_THRESHOLD_": "4000000000"}
_TORCH_COMMANDS = {"classify", "worker", "demo"}


def _cpu_only() -> bool:
    """Will the torch command run on the CPU? (Without importing torch: HARDNET_DEVICE / --device
    cpu, or no NVIDIA driver on this machine.)"""
    dev = os.environ.get("HARDNET_DEVICE", "auto")
    argv = sys.argv[1:]
    if "--device" in argv and argv.index("--device") + 1 < len(argv):
        dev = argv[argv.index("--device") + 1]
    return dev == "cpu" or (dev == "auto" and not os.path.exists("/proc/driver/nvidia"))


def _maybe_reexec_with_malloc_tuning(argv: list[str]) -> None:
    cmd = next((x for x in argv if not x.startswith("-")), None)
    if (cmd not in _TORCH_COMMANDS or os.environ.get("HARDNET_TUNE_MALLOC", "1") == "0"
            or all(k in os.environ for k in _MALLOC_ENV)):
        return
    env = {**os.environ, **{k: v for k, v in _MALLOC_ENV.items() if k not in os.environ}}
    if _cpu_only():
        # The engine runs the model in its own thread, and glibc gives a non-main thread its own
        # arena, whose heaps are at most 64 MiB: a batch's activations do not fit, go to mmap, and
        # fault their pages in again on every batch (measured: 82,000 page faults per batch,
        # hardnet39ds at 41 img/s in a thread against 72 in the main thread). One arena for the
        # whole process keeps them. Only on the CPU: a GPU worker's many fetch threads would
        # contend for that one arena's lock, and its activations live on the GPU anyway.
        env.setdefault("MALLOC_ARENA_MAX", "1")
    os.execve(sys.executable, [sys.executable, "-m", "producer.cli", *argv], env)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        _maybe_reexec_with_malloc_tuning(sys.argv[1:])
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return a.fn(a)
    except ConfigError as e:
        _err(str(e))
        return EXIT_USAGE
    except HardnetError as e:
        _err(f"{e.code.value}: {e}")
        return EXIT_ERROR
    except BrokerUnreachable as e:
        from hnq.settings import CommonSettings, redact_url

        _err(f"cannot reach Redis at {redact_url(CommonSettings().broker_url)} (gave up after about 8 s: {e}); "
             "is it running? is HARDNET_BROKER_URL right, password and TLS included?")
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001
        if not _is_broker_error(e):
            raise
        from hnq.settings import CommonSettings, redact_url

        _err(f"cannot use Redis at {redact_url(CommonSettings().broker_url)}: {type(e).__name__}: {e} "
             "(is it running? is HARDNET_BROKER_URL right, password and TLS included?)")
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
