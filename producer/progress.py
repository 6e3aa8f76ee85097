"""The progress display of `hardnet submit --wait`, `hardnet wait` and `hardnet resume --wait` (and
the demo): one line redrawn in place on a terminal (one line per change otherwise) until the job
ends, then a summary; the exit code follows the job's final state.

Two things a person waiting must be told: Ctrl-C stops the waiting, not the job (the lines to
follow or cancel it, exit 130); and when the job has not moved for HARDNET_NO_WORKER_NOTICE seconds
and no live worker of its queue has a heartbeat (hnq.fleet), that nobody consumes it and how to
start one (once)."""
from __future__ import annotations

import json
import sys
import time

from hnq.fleet import consumers_of
from hnq.console import EXIT_INTERRUPTED, EXIT_JOB_FAILED, EXIT_TIMEOUT, STATE_EXIT, err
from hnq.schema import FINAL_STATES, JobInfo
from producer.connect import job_store
from producer.show import codes_text, dropped, duration, rate_text

def queue_consumers(store, queue: str) -> list[str] | None:
    """The live workers that consume ``queue``: their heartbeats in Redis (hnq.fleet, refreshed
    every 5 s by every worker, busy or not); None when they could not be read."""
    try:
        return sorted(f"{w.hostname}:{w.pid}" for w in consumers_of(store.r, queue))
    except Exception:  # noqa: BLE001 -- a notice, never a reason to stop waiting
        return None


class NoWorkerNotice:
    """Says once that no worker consumes the job's queue: after ``after`` seconds in which the job
    did not move (no chunk started or finished), when no live worker of its queue has a heartbeat.
    A live worker restarts the count (it may be busy with chunks of earlier jobs)."""

    def __init__(self, store, queue: str, after: float):
        self.store, self.queue, self.after = store, queue, after
        self.seen: tuple | None = None
        self.since = time.monotonic()
        self.said = False

    def check(self, info: JobInfo) -> str | None:
        if self.said or not self.after or info.state not in ("queued", "running"):
            return None
        now = time.monotonic()
        moved = (info.state, info.chunks_done, info.succeeded, info.failed, info.started_at)
        if moved != self.seen:
            self.seen, self.since = moved, now
            return None
        if now - self.since < self.after:
            return None
        consumers = queue_consumers(self.store, self.queue)
        self.since = time.monotonic()
        if consumers is None or consumers:
            return None
        self.said = True
        return (f"no worker consumes queue {self.queue!r} (the job has not moved for {self.after:.0f}s "
                "and no live worker of that queue has a heartbeat in Redis): start one with "
                "`hardnet worker` (same HARDNET_BROKER_URL"
                + (f", HARDNET_QUEUE={self.queue}" if self.queue != "hardnet" else "")
                + "); the job waits in the queue until then")


def wait_for(s, job_id: str, *, json_out: bool = False, timeout: float | None = None, store=None,
             follow: bool = True) -> int:
    """Progress until the job ends; the exit code follows its final state (STATE_EXIT). Ctrl-C:
    the job goes on, and (``follow``) the lines to follow or cancel it, exit 130; the demo, which
    stops its own worker, passes ``follow=False`` and the interrupt goes on up."""
    store = store or job_store(s)
    tty = sys.stderr.isatty()
    bar = {"open": False}     # a progress line drawn on the terminal without its newline yet

    def say(msg: str) -> None:
        if bar["open"]:
            print(file=sys.stderr)
            bar["open"] = False
        err(msg)

    try:
        return _wait(s, store, job_id, json_out=json_out, timeout=timeout, tty=tty, bar=bar, say=say)
    except KeyboardInterrupt:
        if not follow:
            raise
        say(f"stopped waiting; job {job_id} goes on (the workers keep labelling it)")
        err(f"  follow it:  hardnet wait {job_id}")
        err(f"  stop it:    hardnet cancel {job_id}")
        return EXIT_INTERRUPTED


def _wait(s, store, job_id: str, *, json_out: bool, timeout: float | None, tty: bool, bar: dict, say) -> int:
    start = time.monotonic()
    last = ""
    notice = NoWorkerNotice(store, store.raw(job_id).get("queue") or s.queue,
                            getattr(s, "no_worker_notice", 0.0))
    while True:
        info = store.info(job_id)
        if info is None:
            say(f"job {job_id}: state lost (Redis no longer knows it; was it restarted without persistence?)")
            return EXIT_JOB_FAILED
        line = progress_line(info)
        if line != last:
            bar["open"] = tty      # before the print: a Ctrl-C right after it still ends the line
            print(("\r" if tty else "") + line + ("" if tty else "\n"), end="", file=sys.stderr, flush=True)
            last = line
        if info.state in FINAL_STATES:
            break
        if timeout and time.monotonic() - start > timeout:
            say(f"gave up waiting after {duration(timeout)}; the job goes on (hardnet wait {job_id})")
            return EXIT_TIMEOUT
        msg = notice.check(info)
        if msg:
            say(msg)
            last = ""     # draw the bar again below the notice
        # the progress is redrawn every poll interval; the end is seen at once (the scripts that
        # end a job push its state: JobStore.wait_ended)
        left = s.poll_interval if not timeout else min(s.poll_interval, max(0.01, timeout - (time.monotonic() - start)))
        store.wait_ended(job_id, left)
    if bar["open"]:
        print(file=sys.stderr)
        bar["open"] = False
    if json_out:
        print(json.dumps(info.model_dump(mode="json")), flush=True)
    else:
        err(summary_line(info))
    return STATE_EXIT.get(info.state, EXIT_JOB_FAILED)


def summary_line(info: JobInfo) -> str:
    """The line a wait ends with: the state, the counts, codes as ``code=n``, what to do next."""
    j = info.job_id
    codes = codes_text(info.error_codes)
    took = ""
    if info.finished_at and (info.started_at or info.submitted_at):
        took = f" in {duration((info.finished_at - (info.started_at or info.submitted_at)).total_seconds())}"
    return (f"job {j} {info.state}: {info.succeeded} labelled, {info.failed} failed of {info.total}"
            + (f" ({codes})" if codes else "")
            + (f", {dropped(info)} dropped (not started when it was cancelled)" if dropped(info) else "")
            + (f", {info.skipped} skipped (labelled by an earlier job)" if info.skipped else "")
            + took + (f", {rate_text(info.rate)}" if info.rate else "")
            + (f", {info.dead_chunks} dead-lettered chunks (hardnet redrive {j})" if info.dead_chunks else "")
            + (f"; {info.error}" if info.error else ""))


def progress_line(info: JobInfo) -> str:
    """One line of progress: a bar, the counts, the rate and an ETA."""
    done = info.succeeded + info.failed
    total = info.total
    if total:
        width = 30
        fill = int(width * done / total)
        bar = "#" * fill + "-" * (width - fill)
        pct = f"{100 * done / total:5.1f}%"
    else:
        bar, pct = "listing...", ""
    eta = f"ETA {duration(info.eta_s)}" if info.eta_s is not None else ""
    return (f"[{bar}] {pct} {info.state} ok={info.succeeded} failed={info.failed} "
            f"total={total if total is not None else '?'} {rate_text(info.rate)} {eta}").rstrip()
