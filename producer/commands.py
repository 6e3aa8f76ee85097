"""The job commands: submit, wait, status, results, cancel, resume, sweep, redrive. They talk to
Redis and the destination only; nothing here imports torch. The progress display they share with
the demo is :mod:`producer.progress`; `hardnet report` is :mod:`producer.report`.

producer.submit and producer.resume are imported inside the commands that use them: they load
Celery, and every `hardnet` invocation builds this parser (the worker's and `hardnet status`'s too)."""
from __future__ import annotations

import argparse
import json
import sys
import time

from hnq.console import (EXIT_JOB_FAILED, EXIT_OK, EXIT_SOME_FAILED, EXIT_TIMEOUT, STATE_EXIT, add_command,
                         err)
from hnq.errors import ConfigError
from hnq.jobs.liveness import abandon_zombies
from hnq.jobs.parts import part_jsonl_lines
from hnq.jobs.purge import purge_cancelled
from hnq.jobs.sweep import stalled_chunks, sweep
from hnq.options import JobOptions
from hnq.schema import FINAL_STATES, MODELS
from hnq.storage import check_writable, open_destination, validate_destination
from producer.args import check_output_file, int_range, job_id, job_id_type, setting_range, timeout_seconds
from producer.connect import job_store, settings
from producer.settings import ProducerSettings
from hnq.jobs.dispatch import DEFAULT_PRIORITY, PRIORITIES
from producer.intake import add_arguments as add_intake_options, intake
from producer.joboptions import add_arguments as add_job_options
from producer.joboptions import check_options, options_from_args, pyarrow_note
from producer.progress import wait_for
from producer.show import dropped, recent_lines, status_lines


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
    # Everything that can be checked is, before a job, a key or an object exists (the argument
    # types of `register`, then these): a bad one is exit 2 and leaves nothing behind.
    options = options_from_args(a)
    check_options(options, a.out, list(a.sources) + (["@"] if a.from_file else [])
                  + [f"inventory:{m}" for m in a.inventory or ()])
    if a.out and (a.skip_labelled or a.since):
        check_writable(validate_destination(a.out))   # before --skip-labelled reads (or indexes) it
    pyarrow_note(options)
    # the sources as a stream (listings, inventory reports), and the --skip-labelled filter
    it = intake(s, a, model=a.model or s.model, tag=options.tag)
    job = submit(s, it.items(), dest=a.out, model=a.model or s.model, chunk_size=a.chunk_size,
                 store=job_store(s), force=a.force, sources=it.sources, skip=it.skip, index=it.index,
                 extensions=it.extensions, options=options, priority=a.priority)
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
        weights = {r.job_id: store.weights_used(r.job_id) for r in rows}
        if a.json:
            print(json.dumps([{**r.model_dump(mode="json"), "weights": weights[r.job_id]} for r in rows]))
        elif rows:
            print("\n".join(recent_lines(rows, weights)))
        else:
            err("no jobs in this Redis yet (hardnet submit starts one)")
        return EXIT_OK
    info = store.info(a.job)
    if info is None:
        return lost(s, store, a.job, a.json)
    dead = store.dead_letters(a.job)
    stalled = stalled_chunks(store, a.job, s.visibility_timeout)
    weights = store.weights_used(a.job)
    if a.json:
        d = info.model_dump(mode="json")
        d["dead_letters"] = [{"chunk": x.chunk, "uris": x.count, "attempts": x.attempts, "error": x.error}
                             for x in dead]
        d["stalled_chunks"] = stalled
        d["weights"] = weights
        d["dropped"] = dropped(info)
        print(json.dumps(d))
    else:
        print("\n".join(status_lines(info, weights=weights, dead=dead, stalled=stalled,
                                     visibility_timeout=s.visibility_timeout, now=time.time())))
    if info.state == "abandoned":   # its submit died while listing: its own exit code
        err(f"job {a.job} is abandoned (its submit stopped listing): hardnet resume {a.job} seals and finishes it")
        return STATE_EXIT["abandoned"]
    return EXIT_OK


# ----------------------------------------------------------------------------------------- results
#: the states in which a job's results are all there (`results` without --partial)
FINISHED = ("done", "done_with_errors")


def cmd_results(a: argparse.Namespace) -> int:
    s = settings()
    store = job_store(s)
    info = store.info(a.job)
    if info is None:
        return lost(s, store, a.job, False)
    if info.state not in FINISHED and not a.partial:
        # Nothing printed: a pipeline must not take part of a job for all of it.
        ended = info.state in STATE_EXIT        # failed, cancelled, ...: exit 4; not ended: 5
        err(f"job {a.job} is {info.state if info.chunks is not None else 'still being listed'} "
            f"({info.chunks_done}/{info.chunks if info.chunks is not None else '?'} chunks done): its "
            "results are incomplete; " + ("" if ended else f"wait for the end (hardnet wait {a.job}), or ")
            + "give --partial for the records that exist")
        return STATE_EXIT[info.state] if ended else EXIT_TIMEOUT
    if a.output:
        check_output_file(a.output)
    fmt = JobOptions.from_json(store.raw(a.job).get("options")).format
    dest = open_destination(info.dest) if info.dest else None
    # still listing (--partial): the chunks done so far; else every chunk the job has
    chunks = range(info.chunks) if info.chunks is not None else sorted(store.done_chunks(a.job))
    out = open(a.output, "w") if a.output else sys.stdout
    missing = 0
    try:
        for c in chunks:
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
    if info.chunks is None:
        err(f"job {a.job} is still being listed: the records of its {len(chunks)} chunks done so far")
    elif missing:
        if info.state in FINAL_STATES:
            err(f"{missing} of {info.chunks} chunks have no records: {missing_why(info)}")
        else:
            err(f"{missing} of {info.chunks} chunks have no results yet (job {info.state})")
        return EXIT_OK if a.partial else EXIT_SOME_FAILED
    return EXIT_OK


def missing_why(info) -> str:
    """Why chunks of a job that ended have no part, in the words of its state."""
    j = info.job_id
    if info.state == "cancelled":
        return "the job was cancelled before they started (they were dropped)"
    if info.state == "failed":
        return f"the job failed: dead-lettered chunks or parts lost (hardnet status {j})"
    if info.state == "abandoned":
        return f"its submit stopped while listing (hardnet resume {j} finishes it)"
    return f"the job ended ({info.state}) but their parts are missing from {info.dest or 'Redis'}"


def cmd_cancel(a: argparse.Namespace) -> int:
    s = settings()
    store = job_store(s)
    state = store.cancel(a.job)
    if state == "missing":
        err(f"unknown job {a.job}")
        return EXIT_JOB_FAILED
    if state != "cancelled":
        err(f"job {a.job} already ended ({state}): nothing changed")
        return EXIT_OK
    err(f"job {a.job} cancelled: chunks not yet started will be dropped")
    purge_cancelled(store, a.job)    # its stored inputs that may hold credentials (hnq.jobs.purge)
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
    s = settings()
    store = job_store(s)
    abandon_zombies(store, jobs=[a.job] if a.job else None)
    sent = sweep(store, s.visibility_timeout, jobs=[a.job] if a.job else None)
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
    s.add_argument("--list-threads", type=setting_range("--list-threads", ProducerSettings, "list_threads"), metavar="N",
                   help="concurrent listing requests for an s3:// prefix, fanned out over its folders "
                   "(no fixed key order); 1 = one sorted stream; unset: HARDNET_LIST_THREADS (8)")
    s.add_argument("--list-depth", type=setting_range("--list-depth", ProducerSettings, "list_depth"), metavar="N",
                   help="levels of folders below the prefix the listing fans out over; unset: "
                   "HARDNET_LIST_DEPTH (2)")
    s.add_argument("--skip-labelled", action="store_true",
                   help="do not fetch objects that the latest earlier job under --out with the same "
                   "model and sources labelled (same key and ETag); they count as skipped")
    s.add_argument("--since", type=job_id_type("--since"), metavar="JOB",
                   help="like --skip-labelled, with JOB (under --out) as the earlier job")
    s.add_argument("--index", action="store_true",
                   help="index this job's labelled objects when it ends, for later --skip-labelled "
                   "runs (implied by --skip-labelled and --since)")
    s.add_argument("--out", metavar="DEST",
                   help="s3://bucket/prefix/, file:///dir/ or a directory; unset: results kept in Redis")
    s.add_argument("--model", choices=MODELS, help="the model the workers run; unset: HARDNET_MODEL")
    s.add_argument("--chunk-size", type=setting_range("--chunk-size", ProducerSettings, "chunk_size"), metavar="N",
                   help="URIs per chunk (one queue message), 1..10000 as HARDNET_CHUNK_SIZE; unset: "
                   "HARDNET_CHUNK_SIZE")
    s.add_argument("--priority", choices=PRIORITIES, default=DEFAULT_PRIORITY,
                   help="the job's share of the fleet: jobs are served by priority first (high before "
                   "normal before low), and in turn between jobs of one priority (docs/operations.md, "
                   "'Several jobs at once'); default: normal")
    s.add_argument("--wait", action="store_true", help="show progress and wait for the end")
    s.add_argument("--timeout", type=timeout_seconds, metavar="S", help="with --wait: give up waiting after S seconds (exit 5)")
    s.add_argument("--force", action="store_true",
                   help="allow a job above HARDNET_REDIS_RESULTS_MAX images without --out (results kept in Redis)")
    s.add_argument("--json", action="store_true", help="print the job (and with --wait its summary) as JSON")
    add_job_options(s)   # --format, --top-k, --weights, --tag
    add_intake_options(s)   # --extensions

    wt = add_command(sub, "wait", "show a job's progress until it ends; exit code as submit --wait", cmd_wait)
    wt.add_argument("job", type=job_id, metavar="JOB", help="job id")
    wt.add_argument("--timeout", type=timeout_seconds, metavar="S", help="give up waiting after S seconds (exit 5)")
    wt.add_argument("--json", action="store_true", help="print the final summary as JSON")

    rs = add_command(sub, "resume", "finish a job from its stored inputs and parts (e.g. after Redis lost it)",
                     cmd_resume)
    rs.add_argument("job", type=job_id, metavar="JOB", help="job id")
    rs.add_argument("--out", metavar="DEST", help="the job's destination (needed when Redis no longer knows the job)")
    rs.add_argument("--wait", action="store_true", help="then wait for the end, as submit --wait")
    rs.add_argument("--timeout", type=timeout_seconds, metavar="S", help="with --wait: give up after S seconds (exit 5)")

    sw = add_command(sub, "sweep", "re-send chunks of live jobs that are neither queued, in flight nor done",
                     cmd_sweep)
    sw.add_argument("job", nargs="?", type=job_id, metavar="JOB", help="only this job; unset: the recent live jobs")

    st = add_command(sub, "status", "a job's state, or the recent jobs", cmd_status)
    st.add_argument("job", nargs="?", type=job_id, metavar="JOB", help="job id; unset: list the recent jobs")
    st.add_argument("--limit", type=int_range("--limit", 1), default=20, help="how many recent jobs to list")
    st.add_argument("--json", action="store_true", help="machine-readable output")

    r = add_command(sub, "results", "a finished job's records as JSON Lines (--partial: what a job "
                    "not finished has so far)", cmd_results)
    r.add_argument("job", type=job_id, metavar="JOB", help="job id")
    r.add_argument("-o", "--output", metavar="FILE", help="write to FILE; unset: standard output")
    r.add_argument("--failed-only", action="store_true", help="only the records of images that failed")
    r.add_argument("--partial", action="store_true",
                   help="print the records that exist of a job that has not finished (queued, running, "
                   "failed, cancelled) and exit 0; without it such a job prints nothing and exits 5 "
                   "(not ended yet) or 4 (failed, cancelled)")

    k = add_command(sub, "cancel", "drop a job's chunks that have not started", cmd_cancel)
    k.add_argument("job", type=job_id, metavar="JOB", help="job id")

    rd = add_command(sub, "redrive", "send a job's dead-lettered chunks again", cmd_redrive)
    rd.add_argument("job", type=job_id, metavar="JOB", help="job id")
    rd.add_argument("--chunk", type=int_range("--chunk", 0), help="only this chunk; unset: all of the job's dead letters")
