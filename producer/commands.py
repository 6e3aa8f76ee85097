"""The job commands: submit, wait, status, results, cancel, resume, sweep, redrive. They talk to
Redis and the destination only; nothing here imports torch. The progress display they share with
the demo is :mod:`producer.progress`; `hardnet report` is :mod:`producer.report`.

producer.submit and producer.resume are imported inside the commands that use them: they load
Celery, and every `hardnet` invocation builds this parser (the worker's and `hardnet status`'s too)."""
from __future__ import annotations

import argparse
import json
import sys

from hnq.console import EXIT_JOB_FAILED, EXIT_OK, EXIT_SOME_FAILED, add_command, err
from hnq.errors import ConfigError
from hnq.jobs.parts import part_jsonl_lines
from hnq.jobs.sweep import stalled_chunks, sweep
from hnq.options import JobOptions
from hnq.schema import MODELS
from hnq.storage import open_destination
from producer.connect import job_store, settings
from producer.intake import intake
from producer.joboptions import add_arguments as add_job_options
from producer.joboptions import options_from_args
from producer.progress import wait_for


def lost(s, st, job_id: str, json_out: bool) -> int:
    """Explain a job Redis does not know: never submitted here, or submitted and its state lost."""
    from producer.submit import LocalJobs

    known = LocalJobs(s).get(job_id)
    if known:
        try:
            run_id = st.r.info("server").get("run_id")
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
    err(msg)
    return EXIT_JOB_FAILED


def cmd_submit(a: argparse.Namespace) -> int:
    from producer.submit import submit

    s = settings()
    if not a.sources and not a.from_file and not a.inventory:
        raise ConfigError("nothing to submit: give SOURCE arguments, --from-file or --inventory")
    options = options_from_args(a)
    # the sources as a stream (listings, inventory reports), and the --skip-labelled filter
    it = intake(s, a, model=a.model or s.model)
    job = submit(s, it.items(), dest=a.out, model=a.model or s.model, chunk_size=a.chunk_size,
                 store=job_store(s), force=a.force, sources=it.sources, skip=it.skip, index=it.index,
                 options=options)
    it.report(job)
    if a.json:
        print(json.dumps({"job_id": job.job_id, "total": job.total, "chunks": job.chunks,
                          "dest": job.dest, "model": job.model, "skipped": job.skipped}), flush=True)
    else:
        print(job.job_id, flush=True)
        err(f"job {job.job_id}: {job.total} images in {job.chunks} chunks -> {job.dest or 'redis'}")
    if not a.wait:
        return EXIT_OK
    return wait_for(s, job.job_id, json_out=a.json, timeout=a.timeout)


def cmd_wait(a: argparse.Namespace) -> int:
    s = settings()
    store = job_store(s)
    if store.info(a.job) is None:
        return lost(s, store, a.job, a.json)
    return wait_for(s, a.job, json_out=a.json, timeout=a.timeout, store=store)


# ------------------------------------------------------------------------------------------ status
def cmd_status(a: argparse.Namespace) -> int:
    s = settings()
    store = job_store(s)
    if not a.job:
        rows = [store.info(j) for j in store.recent(a.limit)]
        rows = [r for r in rows if r]
        if a.json:
            print(json.dumps([r.model_dump(mode="json") for r in rows]))
        else:
            for r in rows:
                print(f"{r.job_id}  {r.state:9}  {r.succeeded + r.failed}/{r.total if r.total is not None else '?'}"
                      f"  failed={r.failed}" + (f"  skipped={r.skipped}" if r.skipped else "")
                      + f"  model={r.model}  dest={r.dest or 'redis'}")
        return EXIT_OK
    info = store.info(a.job)
    if info is None:
        return lost(s, store, a.job, a.json)
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


# ----------------------------------------------------------------------------------------- results
def cmd_results(a: argparse.Namespace) -> int:
    s = settings()
    store = job_store(s)
    info = store.info(a.job)
    if info is None:
        return lost(s, store, a.job, False)
    if info.chunks is None:
        raise ConfigError(f"job {a.job} is still being listed; try again shortly")
    fmt = JobOptions.from_json(store.raw(a.job).get("options")).format
    dest = open_destination(info.dest) if info.dest else None
    out = open(a.output, "w") if a.output else sys.stdout
    missing = 0
    try:
        for c in range(info.chunks):
            if dest:
                data = dest.get(dest.part_path(a.job, c, fmt))
                lines = part_jsonl_lines(data, fmt) if data is not None else None  # parquet: read back
            else:
                text = store.get_part(a.job, c)
                lines = text.splitlines() if text is not None else None
            if lines is None:
                missing += 1
                continue
            for line in lines:
                if a.failed_only and '"status":"ok"' in line:
                    continue
                out.write(line + "\n")
    finally:
        if a.output:
            out.close()
    if missing:
        err(f"{missing} of {info.chunks} chunks have no results yet (job {info.state})")
        return EXIT_SOME_FAILED if info.state == "done" else EXIT_OK
    return EXIT_OK


def cmd_cancel(a: argparse.Namespace) -> int:
    s = settings()
    state = job_store(s).cancel(a.job)
    if state == "missing":
        err(f"unknown job {a.job}")
        return EXIT_JOB_FAILED
    if state != "cancelled":
        err(f"job {a.job} already ended ({state}): nothing changed")
        return EXIT_OK
    err(f"job {a.job} cancelled: chunks not yet started will be dropped")
    return EXIT_OK


def cmd_resume(a: argparse.Namespace) -> int:
    from producer.resume import resume

    s = settings()
    r = resume(s, job_store(s), a.job, dest=a.out)
    err(f"job {a.job}: {r['rebuilt'] and 'state rebuilt from storage; ' or ''}{r['complete']} chunks "
         f"complete, {len(r['sent'])} sent again" + (f" {r['sent'][:20]}" if r['sent'] else "")
         + (f"; {r['note']}" if r.get("note") else ""))
    if a.wait:
        return wait_for(s, a.job, timeout=a.timeout)
    return EXIT_OK


def cmd_sweep(a: argparse.Namespace) -> int:
    from producer.submit import sender

    s = settings()
    store = job_store(s)
    sent = sweep(store, sender(s), s.visibility_timeout, jobs=[a.job] if a.job else None)
    for job, chunks in sent.items():
        print(f"{job}: re-sent {len(chunks)} stalled chunk(s) {chunks[:50]}")
    if not sent:
        err("no stalled chunks")
    return EXIT_OK


def cmd_redrive(a: argparse.Namespace) -> int:
    from producer.submit import requeue_dead

    s = settings()
    n = requeue_dead(s, job_store(s), a.job, a.chunk)
    err(f"re-sent {n} dead-lettered chunk(s) of job {a.job}")
    return EXIT_OK if n else EXIT_SOME_FAILED


def register(sub) -> None:
    s = add_command(sub, "submit", "enqueue a job for the workers", cmd_submit)
    s.add_argument("sources", nargs="*", metavar="SOURCE",
                   help="file, directory, file://, s3://bucket/key, s3://bucket/prefix/, http(s)://")
    s.add_argument("--from-file", metavar="F", help="a file of URIs, one per line ('-' = stdin)")
    s.add_argument("--inventory", action="append", metavar="MANIFEST",
                   help="an S3 Inventory report (CSV, or Parquet with hardnet-queue[parquet]): its "
                   "s3://…/manifest.json, or the configuration's folder s3://…/SOURCE-BUCKET/CONFIG-ID/ "
                   "for its latest report; repeatable")
    s.add_argument("--list-threads", type=int, metavar="N",
                   help="concurrent listing requests for an s3:// prefix, fanned out over its folders "
                   "(no fixed key order); 1 = one sorted stream; unset: HARDNET_LIST_THREADS (8)")
    s.add_argument("--list-depth", type=int, metavar="N",
                   help="levels of folders below the prefix the listing fans out over; unset: "
                   "HARDNET_LIST_DEPTH (2)")
    s.add_argument("--skip-labelled", action="store_true",
                   help="do not fetch objects that the latest earlier job under --out with the same "
                   "model and sources labelled (same key and ETag); they count as skipped")
    s.add_argument("--since", metavar="JOB",
                   help="like --skip-labelled, with JOB (under --out) as the earlier job")
    s.add_argument("--index", action="store_true",
                   help="index this job's labelled objects when it ends, for later --skip-labelled "
                   "runs (implied by --skip-labelled and --since)")
    s.add_argument("--out", metavar="DEST",
                   help="s3://bucket/prefix/, file:///dir/ or a directory; unset: results kept in Redis")
    s.add_argument("--model", choices=MODELS, help="the model the workers run; unset: HARDNET_MODEL")
    s.add_argument("--chunk-size", type=int, metavar="N",
                   help="URIs per chunk (one queue message); unset: HARDNET_CHUNK_SIZE")
    s.add_argument("--wait", action="store_true", help="show progress and wait for the end")
    s.add_argument("--timeout", type=float, metavar="S", help="with --wait: give up waiting after S seconds (exit 5)")
    s.add_argument("--force", action="store_true",
                   help="allow a job above HARDNET_REDIS_RESULTS_MAX images without --out (results kept in Redis)")
    s.add_argument("--json", action="store_true", help="print the job (and with --wait its summary) as JSON")
    add_job_options(s)   # --format, --top-k, --weights, --tag

    wt = add_command(sub, "wait", "show a job's progress until it ends; exit code as submit --wait", cmd_wait)
    wt.add_argument("job", help="job id")
    wt.add_argument("--timeout", type=float, metavar="S", help="give up waiting after S seconds (exit 5)")
    wt.add_argument("--json", action="store_true", help="print the final summary as JSON")

    rs = add_command(sub, "resume", "finish a job from its stored inputs and parts (e.g. after Redis lost it)",
                     cmd_resume)
    rs.add_argument("job", help="job id")
    rs.add_argument("--out", metavar="DEST", help="the job's destination (needed when Redis no longer knows the job)")
    rs.add_argument("--wait", action="store_true", help="then wait for the end, as submit --wait")
    rs.add_argument("--timeout", type=float, metavar="S", help="with --wait: give up after S seconds (exit 5)")

    sw = add_command(sub, "sweep", "re-send chunks of live jobs that are neither queued, in flight nor done",
                     cmd_sweep)
    sw.add_argument("job", nargs="?", help="only this job; unset: the recent live jobs")

    st = add_command(sub, "status", "a job's state, or the recent jobs", cmd_status)
    st.add_argument("job", nargs="?", help="job id; unset: list the recent jobs")
    st.add_argument("--limit", type=int, default=20, help="how many recent jobs to list")
    st.add_argument("--json", action="store_true", help="machine-readable output")

    r = add_command(sub, "results", "a job's records as JSON Lines", cmd_results)
    r.add_argument("job", help="job id")
    r.add_argument("-o", "--output", metavar="FILE", help="write to FILE; unset: standard output")
    r.add_argument("--failed-only", action="store_true", help="only the records of images that failed")

    k = add_command(sub, "cancel", "drop a job's chunks that have not started", cmd_cancel)
    k.add_argument("job", help="job id")

    rd = add_command(sub, "redrive", "send a job's dead-lettered chunks again", cmd_redrive)
    rd.add_argument("job", help="job id")
    rd.add_argument("--chunk", type=int, help="only this chunk; unset: all of the job's dead letters")
