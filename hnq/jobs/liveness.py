"""No zombie jobs: a listing submit keeps a heartbeat, a job whose submit is gone becomes
``abandoned``, and `hardnet resume` seals an abandoned job from what was stored.

* **Heartbeat** (:class:`Heartbeat`): while `hardnet submit` lists and enqueues, it refreshes
  ``hnq:job:ID:hb`` every ``HARDNET_HEARTBEAT_INTERVAL`` seconds; the key expires after
  :data:`HB_INTERVALS` intervals without a refresh (the process killed, the machine gone). The
  job hash's ``hb`` field says the job has one (jobs of older producers are never judged).
* **Abandoned** (:func:`abandon_zombies`, run by the workers' sweeper): a queued or running job
  that is not sealed and whose heartbeat expired is set to ``abandoned`` (atomically, in Lua:
  a seal or a heartbeat arriving meanwhile wins). `hardnet status/wait` show it with exit code 6.
  Its chunks already queued are still labelled; nothing finalises it.
* **Sealed from storage** (:func:`seal_abandoned`, `hardnet resume JOB`): messages go out in chunk
  order and each only after its inputs are stored, so the chunks that belong to the job are the
  unbroken run 0..N-1 of stored inputs (a later stored chunk was never sent and is left out). The
  job is sealed with those N chunks (the total: N-1 full chunks plus the last one's URIs, read
  back), chunks stored but never sent are sent, and the job runs again to its end.
"""
from __future__ import annotations

import logging
import re
import threading

from hnq.jobs.inputs import read_chunk_uris
from hnq.jobs.store import JobStore
from hnq.storage import open_destination

log = logging.getLogger("hardnet.liveness")

#: the heartbeat key lives this many intervals without a refresh
HB_INTERVALS = 6
_INPUT_RE = re.compile(r"/inputs/chunk-(\d+)\.jsonl\.gz$")


class Heartbeat:
    """``with Heartbeat(store, job_id, interval):`` refresh the job's heartbeat on a daemon thread."""

    def __init__(self, store: JobStore, job_id: str, interval_s: float):
        self.store, self.job_id, self.interval = store, job_id, interval_s
        self.ttl = max(2.0, HB_INTERVALS * interval_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Heartbeat":
        self.store.heartbeat(self.job_id, self.ttl)
        self._thread = threading.Thread(target=self._loop, daemon=True, name="hardnet-heartbeat")
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.store.heartbeat(self.job_id, self.ttl)
            except Exception as e:  # noqa: BLE001 - Redis trouble: try again next interval
                log.warning("job %s: heartbeat not refreshed: %s", self.job_id, e)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        try:
            self.store.end_heartbeat(self.job_id)
        except Exception:  # noqa: BLE001 - it expires by itself
            pass


def abandon_zombies(store: JobStore, jobs: list[str] | None = None) -> list[str]:
    """Mark abandoned every recent job whose submit is gone (see the module). Returns them."""
    out = []
    for job in jobs if jobs is not None else store.recent(500):
        try:
            if store.abandon_if_gone(job):
                log.warning("job %s abandoned: its submit stopped listing (no heartbeat); "
                            "`hardnet resume %s` seals and finishes what was stored", job, job)
                out.append(job)
        except Exception as e:  # noqa: BLE001 - one job's trouble must not stop the sweep
            log.error("abandon check of job %s failed: %s", job, e)
    return out


def stored_chunks(store: JobStore, dest: str | None, job_id: str) -> set[int]:
    """The chunks whose inputs are stored."""
    if dest:
        d = open_destination(dest)
        return {int(m.group(1)) for p in d.list(f"{job_id}/inputs/chunk-") if (m := _INPUT_RE.search("/" + p))}
    prefix = store.key(job_id, "in") + ":"
    return {int(k[len(prefix):]) for k in store.r.scan_iter(match=prefix + "*", count=1000)
            if k[len(prefix):].isdigit()}


def seal_abandoned(store: JobStore, job_id: str) -> dict:
    """Seal an abandoned job from its stored inputs and make it run again. Returns ``total``,
    ``chunks``, ``unsent`` (chunks stored but never sent: the caller sends them) and
    ``complete`` (every chunk already done: the caller finalises)."""
    h = store.raw(job_id)
    if h.get("state") != "abandoned":
        raise ValueError(f"job {job_id} is {h.get('state')}, not abandoned")
    dest = h.get("dest") or None
    have = stored_chunks(store, dest, job_id)
    n = 0
    while n in have:
        n += 1
    total = 0
    if n:
        last = read_chunk_uris(store, dest, job_id, n - 1)
        total = (n - 1) * int(h.get("chunk_size") or 0) + (len(last[0]) if last else 0)
    if len(have) > n:
        log.warning("job %s: %d stored chunk(s) after chunk %d were never sent and are left out",
                    job_id, len(have) - n, n - 1)
    seen, done = store.seen(job_id), store.done_chunks(job_id)
    unsent = [c for c in range(n) if c not in seen and c not in done]
    store.seal(job_id, total, n)      # sealed first: the sweeper never abandons a sealed job
    store.reopen(job_id)
    info = store.info(job_id)
    complete = info is not None and info.chunks_done >= n
    return {"total": total, "chunks": n, "unsent": unsent, "complete": complete}


__all__ = ["HB_INTERVALS", "Heartbeat", "abandon_zombies", "stored_chunks", "seal_abandoned"]
