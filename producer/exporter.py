"""`hardnet exporter`: queue depth and job progress from Redis, as Prometheus metrics.

The workers export what happens inside them (worker.metrics); what lives only in Redis — chunks
waiting in the queue, chunks taken and not yet acknowledged, dead letters, each job's progress — is
read here, at scrape time, by one small torch-free process (run one; KEDA's prometheus trigger and
the dashboard read it). A scrape costs three Redis round trips whatever the fleet's size:
LLEN per queue + HLEN of kombu's ``unacked`` hash + ZREVRANGE of the recent jobs; one HMGET per
recent job and the active jobs of each queue; the LLEN of their ready lists (the backlog, summed
over the jobs: hnq.jobs.dispatch), pipelined. Jobs are bounded: the ``--jobs`` most recent ones (JobStore's
``hnq:jobs``), of which those queued, running, or finished less than ``--keep-finished`` seconds ago
get per-job series (so a job's final counts reach Prometheus even when it ended between scrapes).

Per-job series are labelled ``job_id``, not ``job``: Prometheus gives every scraped series a
``job`` label of its own (the scrape job) and would rename ours to ``exported_job``.

`hardnet exporter` is registered by producer.cli; ``python -m producer.exporter --port 9808`` runs
the same command without the rest of the CLI."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time

from hnq.console import add_command
from hnq.errors import ConfigError
from hnq.jobs.dispatch import active_key
from hnq.jobs.store import PREFIX, JobStore
from hnq.jobs.sweep import UNACKED_KEY
from hnq.settings import redact_url
from producer.settings import ProducerSettings

log = logging.getLogger("hardnet.exporter")

DEFAULT_PORT = 9808
LIVE_STATES = ("queued", "running")
_FIELDS = ("state", "model", "total", "chunks", "chunks_done", "succeeded", "failed", "dead_chunks",
           "finished_at")


def _int(v) -> int:
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return 0


class QueueCollector:
    """Reads the queue(s) and the recent jobs from Redis when Prometheus scrapes. A Redis that does
    not answer gives ``hardnet_exporter_redis_up 0`` and no other samples (never a failed scrape:
    Prometheus would then lose the ``up`` signal's meaning, and KEDA a clear null)."""

    def __init__(self, store: JobStore, queues: list[str], *, jobs: int = 50,
                 keep_finished_s: float = 600.0, clock=time.time):
        self.store = store
        self.queues = list(dict.fromkeys(queues))
        self.jobs = jobs
        self.keep_finished_s = keep_finished_s
        self.clock = clock

    @staticmethod
    def _families() -> dict:
        # prometheus_client is imported here, not with the module: every `hardnet` command loads
        # this module to register `exporter`, and the import is ~55 ms of each one's start-up
        from prometheus_client.core import GaugeMetricFamily

        f = [
            GaugeMetricFamily("hardnet_queue_messages", "Chunk messages waiting in the queue (LLEN of "
                              "the Celery queue's Redis list): started by no worker yet.",
                              labels=["queue"]),
            GaugeMetricFamily("hardnet_queue_backlog_chunks", "Chunks no worker has started yet: the "
                              "messages in the Celery queue plus the chunks waiting in the ready "
                              "lists of its jobs (fair share: hnq.jobs.dispatch). What KEDA scales on.",
                              labels=["queue"]),
            GaugeMetricFamily("hardnet_queue_ready_jobs", "Jobs with chunks waiting for their turn "
                              "in the queue (the fair-share rotation).", labels=["queue"]),
            GaugeMetricFamily("hardnet_queue_unacked_messages", "Messages taken by workers and not yet "
                              "acknowledged (HLEN of kombu's unacked hash): the chunks in flight, "
                              "fleet-wide."),
            GaugeMetricFamily("hardnet_dead_letter_chunks", "Dead-lettered chunks of the recent jobs "
                              "(waiting for `hardnet redrive`)."),
            GaugeMetricFamily("hardnet_jobs", "Recent jobs by state.", labels=["state"]),
            GaugeMetricFamily("hardnet_job_info", "Always 1 for each live or just-finished job; labels "
                              "give its model and state.", labels=["job_id", "model", "state"]),
            GaugeMetricFamily("hardnet_job_images", "A job's images: ok, error (error records) and "
                              "pending (not yet labelled; only once the job's total is known).",
                              labels=["job_id", "state"]),
            GaugeMetricFamily("hardnet_job_chunks", "A job's chunks: done (part written), dead "
                              "(dead-lettered) and pending; their sum is the job's chunk count once "
                              "it is known.", labels=["job_id", "state"]),
            GaugeMetricFamily("hardnet_exporter_redis_up", "1 if the last scrape could read Redis."),
            GaugeMetricFamily("hardnet_exporter_scrape_seconds", "Time the last scrape spent reading "
                              "Redis."),
        ]
        return {m.name: m for m in f}

    def describe(self):
        return list(self._families().values())

    def _read(self):
        r = self.store.r
        with r.pipeline(transaction=False) as p:
            for q in self.queues:
                p.llen(q)
            p.hlen(UNACKED_KEY)
            p.zrevrange(f"{PREFIX}:jobs", 0, self.jobs - 1)
            got = p.execute()
        lens = dict(zip(self.queues, got[:len(self.queues)]))
        unacked, job_ids = got[len(self.queues)], got[len(self.queues) + 1]
        with r.pipeline(transaction=False) as p:
            for j in job_ids:
                p.hmget(self.store.key(j), _FIELDS)
            for q in self.queues:
                p.zrange(active_key(q), 0, -1)
            got = p.execute()
        rows, active = got[:len(job_ids)], dict(zip(self.queues, got[len(job_ids):]))
        jobs = [(j, dict(zip(_FIELDS, row))) for j, row in zip(job_ids, rows) if row[0] is not None]
        # the chunks waiting in the ready lists of each queue's active jobs
        pairs = [(q, j) for q in self.queues for j in active[q]]
        with r.pipeline(transaction=False) as p:
            for _, j in pairs:
                p.llen(self.store.key(j, "ready"))
            waiting = p.execute() if pairs else []
        ready = {q: [0, len(active[q])] for q in self.queues}
        for (q, _), n in zip(pairs, waiting):
            ready[q][0] += int(n)
        return lens, ready, unacked, jobs

    def collect(self):
        m = self._families()
        t0 = time.monotonic()
        try:
            lens, ready, unacked, jobs = self._read()
        except Exception as e:  # noqa: BLE001 - redis errors, and anything odd in what it holds
            log.warning("scrape: cannot read Redis: %s: %s", type(e).__name__, e)
            m["hardnet_exporter_redis_up"].add_metric([], 0)
            m["hardnet_exporter_scrape_seconds"].add_metric([], time.monotonic() - t0)
            yield from m.values()
            return
        for q, n in lens.items():
            m["hardnet_queue_messages"].add_metric([q], n)
            m["hardnet_queue_backlog_chunks"].add_metric([q], n + ready[q][0])
            m["hardnet_queue_ready_jobs"].add_metric([q], ready[q][1])
        m["hardnet_queue_unacked_messages"].add_metric([], unacked)
        now = self.clock()
        dead_total = 0
        states: dict[str, int] = {}
        for job_id, h in jobs:
            state = h["state"]
            states[state] = states.get(state, 0) + 1
            dead = _int(h["dead_chunks"])
            dead_total += dead
            finished = h["finished_at"]
            if state not in LIVE_STATES and not (finished and now - float(finished) <= self.keep_finished_s):
                continue
            m["hardnet_job_info"].add_metric([job_id, h["model"] or "", state], 1)
            ok, err = _int(h["succeeded"]), _int(h["failed"])
            m["hardnet_job_images"].add_metric([job_id, "ok"], ok)
            m["hardnet_job_images"].add_metric([job_id, "error"], err)
            if h["total"]:                       # set when the producer sealed the job
                m["hardnet_job_images"].add_metric([job_id, "pending"], max(0, _int(h["total"]) - ok - err))
            done = _int(h["chunks_done"])        # dead-lettered chunks are counted in chunks_done
            m["hardnet_job_chunks"].add_metric([job_id, "done"], max(0, done - dead))
            m["hardnet_job_chunks"].add_metric([job_id, "dead"], dead)
            if h["chunks"]:
                m["hardnet_job_chunks"].add_metric([job_id, "pending"], max(0, _int(h["chunks"]) - done))
        m["hardnet_dead_letter_chunks"].add_metric([], dead_total)
        for state, n in sorted(states.items()):
            m["hardnet_jobs"].add_metric([state], n)
        m["hardnet_exporter_redis_up"].add_metric([], 1)
        m["hardnet_exporter_scrape_seconds"].add_metric([], time.monotonic() - t0)
        yield from m.values()


def make_store(broker_url: str, ttl_days: int = 14, sentinel=None) -> JobStore:
    """A JobStore whose client gives up in seconds: a scrape must answer (with redis_up 0) inside
    Prometheus's default 10 s scrape timeout, not ride out a Redis restart as the workers do. One
    retry, at once: a pooled connection that a Redis restart closed is replaced on the spot."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from hnq.redis_conn import client as redis_client

    # ``sentinel``: hnq.redis_conn.SentinelOptions for a sentinel:// URL
    client = redis_client(broker_url, sentinel, decode_responses=True, socket_timeout=3,
                          socket_connect_timeout=2, retry=Retry(NoBackoff(), 1))
    return JobStore(broker_url, ttl_days, client=client, sentinel=sentinel)


def build_registry(store: JobStore, queues: list[str], **kw):
    """A prometheus_client CollectorRegistry: its own registry: the exporter's scrape is about
    Redis, plus the process's own figures (process_*: its CPU and memory), without the default
    registry's Python GC/platform series."""
    from prometheus_client.process_collector import ProcessCollector
    from prometheus_client.registry import CollectorRegistry

    reg = CollectorRegistry()
    reg.register(QueueCollector(store, queues, **kw))
    ProcessCollector(registry=reg)
    return reg


# -- the command ----------------------------------------------------------------------------------
def register(subparsers) -> argparse.ArgumentParser:
    """Add `exporter` to the `hardnet` CLI's subparsers."""
    e = add_command(subparsers, "exporter", "serve queue depth and job progress from Redis as "
                    "Prometheus metrics", cmd_exporter)
    e.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port of /metrics")
    e.add_argument("--addr", default="0.0.0.0", help="address to listen on")
    e.add_argument("--queue", action="append", metavar="Q",
                   help="queue (Redis list) to report; repeatable; unset: HARDNET_QUEUE")
    e.add_argument("--jobs", type=int, default=50, metavar="N",
                   help="the N most recent jobs are looked at per scrape")
    e.add_argument("--keep-finished", type=float, default=600.0, metavar="S",
                   help="seconds a finished job keeps its per-job series")
    return e


def cmd_exporter(a: argparse.Namespace, *, ready: threading.Event | None = None,
                 stop: threading.Event | None = None) -> int:
    from prometheus_client import start_http_server

    if not 1 <= a.port <= 65535:
        raise ConfigError(f"--port {a.port}: not a TCP port (1-65535)")
    if a.jobs < 1:
        raise ConfigError(f"--jobs {a.jobs}: must be at least 1")
    if a.keep_finished < 0:
        raise ConfigError(f"--keep-finished {a.keep_finished}: must not be negative")
    s = ProducerSettings()
    queues = a.queue or [s.queue]
    reg = build_registry(make_store(s.broker_url, s.results_ttl_days, s.sentinel()), queues, jobs=a.jobs,
                         keep_finished_s=a.keep_finished)
    try:
        server, _ = start_http_server(a.port, addr=a.addr, registry=reg)
    except OSError as e:
        raise ConfigError(f"--port {a.port}: cannot listen on {a.addr}:{a.port} ({e.strerror or e})") from e
    print(f"hardnet: exporter on http://{a.addr}:{a.port}/metrics (Redis {redact_url(s.broker_url)}, "
          f"queues {', '.join(queues)})", file=sys.stderr, flush=True)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())   # k8s stops pods with SIGTERM
    if ready is not None:
        ready.set()
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    server.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hardnet")
    register(p.add_subparsers(dest="cmd", required=True))
    a = p.parse_args(["exporter", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return a.fn(a)
    except ConfigError as e:
        print(f"hardnet: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
