"""The progress display of `hardnet submit --wait`, `hardnet wait` and `hardnet resume --wait` (and
the demo): one line redrawn in place on a terminal (one line per change otherwise) until the job
ends, then a summary; the exit code follows the job's final state."""
from __future__ import annotations

import json
import sys
import time

from hnq.console import EXIT_JOB_FAILED, EXIT_TIMEOUT, STATE_EXIT, err
from hnq.schema import FINAL_STATES, JobInfo
from producer.connect import job_store


def wait_for(s, job_id: str, *, json_out: bool = False, timeout: float | None = None, store=None) -> int:
    """Progress until the job ends; the exit code follows its final state (STATE_EXIT)."""
    store = store or job_store(s)
    start = time.monotonic()
    tty = sys.stderr.isatty()
    last = ""
    while True:
        info = store.info(job_id)
        if info is None:
            err(f"job {job_id}: state lost (Redis no longer knows it; was it restarted without persistence?)")
            return EXIT_JOB_FAILED
        line = progress_line(info)
        if line != last:
            print(("\r" if tty else "") + line + ("" if tty else "\n"), end="", file=sys.stderr, flush=True)
            last = line
        if info.state in FINAL_STATES:
            break
        if timeout and time.monotonic() - start > timeout:
            err(f"\ngave up waiting after {timeout:.0f}s; the job goes on (hardnet wait {job_id})")
            return EXIT_TIMEOUT
        time.sleep(s.poll_interval)
    if tty:
        print(file=sys.stderr)
    summary = info.model_dump(mode="json")
    if json_out:
        print(json.dumps(summary), flush=True)
    else:
        codes = ", ".join(f"{k}={v}" for k, v in info.error_codes.items())
        err(f"job {job_id} {info.state}: {info.succeeded} labelled, {info.failed} failed of {info.total}"
             + (f" ({codes})" if codes else "")
             + (f", {info.skipped} skipped (labelled by an earlier job)" if info.skipped else "")
             + (f", {info.dead_chunks} dead-lettered chunks (hardnet redrive {job_id})" if info.dead_chunks else "")
             + (f"; {info.error}" if info.error else ""))
    return STATE_EXIT.get(info.state, EXIT_JOB_FAILED)


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
    rate = f"{info.rate:.1f} img/s" if info.rate else "- img/s"
    eta = f"ETA {info.eta_s:.0f}s" if info.eta_s is not None else ""
    return (f"[{bar}] {pct} {info.state} ok={info.succeeded} failed={info.failed} "
            f"total={total if total is not None else '?'} {rate} {eta}").rstrip()
