"""Prometheus metrics against real components: a real redis-server, a real `hardnet worker` process
with HARDNET_METRICS_PORT set, a real job of local files (some broken, some missing, some with URIs
a worker refuses), and `hardnet exporter` as its own process. /metrics is scraped over HTTP with
urllib and parsed with prometheus_client's own parser; every figure is compared with what the job
wrote (the part files), with the worker's own log, or with Redis."""
from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from cluster import ROOT, Worker, base_env, bad_images, cli_json, image_bytes, read_jsonl, wait_state
from servers import LoopbackWeb, without_proxies, free_port

pytestmark = pytest.mark.slow

MODEL = "hardnet39ds"   # base_env's model


def scrape(port: int, timeout: float = 10) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} of http://127.0.0.1:PORT/metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        assert r.status == 200
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples, name: str, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def with_name(samples, name: str) -> dict[frozenset, float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def wait_scrape(port: int, proc: subprocess.Popen | None = None, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return scrape(port, timeout=5)
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process exited {proc.returncode} before serving /metrics")
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class _SlowImage(LoopbackWeb):
    """One JPEG held back until released: a chunk stays in flight for as long as the test needs
    to scrape the worker mid-job."""

    def __init__(self, body: bytes):
        import threading

        self.requested, self.release = threading.Event(), threading.Event()

        def respond(path):
            self.requested.set()
            self.release.wait(60)
            return 200, body

        super().__init__(respond)
        self.url += "/slow.jpg"

    def stop(self):
        self.release.set()
        super().stop()


def test_worker_metrics_match_the_records_written(redis_url, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    good = [src / f"img-{i:03d}.jpg" for i in range(30)]
    for i, p in enumerate(good):
        p.write_bytes(image_bytes(i, "JPEG", (160, 120)))
    bad = []
    for name, data in bad_images().items():        # empty, and three decode errors
        p = src / name.replace("/", "-")
        p.write_bytes(data)
        bad.append(p)
    lines = [str(p) for p in good + bad]
    lines += [str(src / "missing-1.jpg"), str(src / "missing-2.jpg"),    # not_found
              "ftp://example.org/a.jpg",                                  # unsupported_scheme
              "s3://"]                                                    # invalid_uri
    slow = _SlowImage(image_bytes(99, "JPEG", (160, 120)))
    lines.insert(3, slow.url)                                             # ok, once released
    uri_list = tmp_path / "uris.txt"
    uri_list.write_text("\n".join(lines) + "\n")
    n_uris = len(lines)

    port = free_port()
    env = base_env(redis_url, HARDNET_FILE_ROOTS=str(tmp_path), HARDNET_METRICS_PORT=str(port),
                   HARDNET_STATE_DIR=str(tmp_path / "state"), HARDNET_ALLOW_HTTP="true",
                   HARDNET_HTTP_ALLOW_HOSTS="127.0.0.1", HARDNET_ALLOW_PRIVATE_NETWORKS="true")
    without_proxies(env)  # everything here stays on 127.0.0.1
    w = Worker(env, "metrics", tmp_path)
    try:
        w.wait_ready()
        assert f"metrics on http://0.0.0.0:{port}/metrics" in w.log()
        before = scrape(port)
        rc, sub = cli_json(["submit", "--from-file", str(uri_list), "--out", str(tmp_path / "out"),
                            "--chunk-size", "8", "--json"], env, timeout=60)
        assert rc == 0
        # -- during the job: chunk 0 waits for the held image; the others finish around it --
        assert slow.requested.wait(60)
        deadline = time.monotonic() + 60
        while True:
            during = scrape(port)
            if value(during, "hardnet_chunks_total", outcome="done") == 4 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        slow.release.set()
        st = wait_state(env, sub["job_id"], states=("done_with_errors", "done", "failed"))
        after = scrape(port)
        log = w.log()
    finally:
        w.stop()
        slow.stop()
    job = st["job_id"]
    assert st["state"] == "done_with_errors", st

    # -- the records the job wrote --
    recs = []
    parts = sorted((tmp_path / "out" / job).glob("part-*.jsonl"))
    for part in parts:
        recs += read_jsonl(part.read_text())
    assert len(recs) == n_uris and len(parts) == st["chunks"] == 5
    written = Counter((r["status"], r["error"]["code"] if r["status"] == "error" else "") for r in recs)
    assert written[("ok", "")] == 31
    assert {c for s, c in written if s == "error"} >= {"empty", "decode_error", "not_found",
                                                       "unsupported_scheme", "invalid_uri"}, written

    # -- before the job: the process is described, nothing counted --
    assert with_name(before, "hardnet_images_total") == {}
    info = with_name(before, "hardnet_build_info")
    (labels,) = info
    assert dict(labels)["model"] == MODEL and dict(labels)["device"] == "cpu" and info[labels] == 1
    assert dict(labels)["torch"] and dict(labels)["version"]
    assert value(before, "hardnet_model_load_seconds", model=MODEL) > 0
    assert value(before, "hardnet_batch_capacity_images", model=MODEL) == 16
    assert value(before, "hardnet_chunks_in_flight") == 0

    # -- hardnet_images_total equals the records written, per status and code --
    counted = {(dict(l)["status"], dict(l)["code"]): v
               for l, v in with_name(after, "hardnet_images_total").items() if dict(l)["model"] == MODEL}
    assert counted == dict(written)

    # -- every stage was timed, and the counts are the work done --
    fetched = n_uris                                   # one attempt each (local files: no retries)
    decoded = len(good) + len(bad) + 1                 # the ones whose bytes were read
    assert value(after, "hardnet_stage_seconds_count", stage="fetch") == fetched
    assert value(after, "hardnet_stage_seconds_count", stage="decode") == decoded
    assert value(after, "hardnet_stage_seconds_count", stage="write") == len(parts)
    assert value(after, "hardnet_stage_seconds_count", stage="gpu_decode") == 0   # CPU decode
    for stage in ("fetch", "decode", "device", "write"):
        assert value(after, "hardnet_stage_seconds_sum", stage=stage) > 0, stage
        assert value(after, "hardnet_stage_seconds_bucket", stage=stage, le="+Inf") == \
            value(after, "hardnet_stage_seconds_count", stage=stage)
    assert value(after, "hardnet_chunk_seconds_count") == len(parts)
    assert value(after, "hardnet_chunk_seconds_sum") > 0

    # -- batches: the images that reached the device are the ok records; their number is the
    # engine's own count (its last summary line in the log) --
    batches = max(int(b) for b in re.findall(r"engine: batches=(\d+)", log))
    assert value(after, "hardnet_batch_size_count", model=MODEL) == batches
    assert value(after, "hardnet_stage_seconds_count", stage="device") == batches
    assert value(after, "hardnet_batch_size_sum", model=MODEL) == written[("ok", "")]
    assert value(after, "hardnet_batch_size_bucket", model=MODEL, le="16.0") == batches   # batch size 16

    # -- mid-job: one chunk (the held image's) in flight, the other four counted --
    assert value(during, "hardnet_chunks_total", outcome="done") == 4
    assert value(during, "hardnet_chunks_in_flight") == 1
    assert value(during, "hardnet_images_in_flight", model=MODEL) >= 1
    counted_during = sum(v for l, v in with_name(during, "hardnet_images_total").items())
    assert counted_during == n_uris - 8           # every record but chunk 0's
    assert value(during, "hardnet_stage_seconds_count", stage="write") == 4

    # -- outcomes and gauges once the job is over --
    assert value(after, "hardnet_chunks_total", outcome="done") == len(parts)
    assert value(after, "hardnet_chunks_total", outcome="retried") == 0
    assert value(after, "hardnet_chunks_total", outcome="dead_lettered") == 0
    assert value(after, "hardnet_chunks_in_flight") == 0
    assert value(after, "hardnet_images_in_flight", model=MODEL) == 0
    assert 1 <= value(after, "hardnet_fetch_threads", model=MODEL) <= 8     # HARDNET_FETCH_THREADS=8
    # a CPU worker describes the GPU gauges but has no samples for them
    assert with_name(after, "hardnet_gpu_memory_allocated_bytes") == {}


def test_metrics_port_in_use_stops_the_worker_with_a_clear_message(redis_url, tmp_path):
    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        held.listen()
        port = held.getsockname()[1]
        env = base_env(redis_url, HARDNET_METRICS_PORT=str(port))
        w = Worker(env, "busyport", tmp_path)
        try:
            rc = w.proc.wait(120)
        finally:
            w.stop()
    log = w.log()
    assert rc == 78, log[-3000:]
    assert f"HARDNET_METRICS_PORT={port}" in log and "cannot serve metrics" in log, log[-3000:]
    assert "ready." not in log


def _exporter(env, port: int, logdir: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    log_path = logdir / f"exporter-{port}.log"
    proc = subprocess.Popen([sys.executable, "-m", "producer.exporter", "--port", str(port),
                             "--addr", "127.0.0.1", *args], env=env, cwd=ROOT,
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    return proc, log_path


def test_exporter_reports_queue_depth_and_job_progress(redis_url, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(20):
        (src / f"img-{i:03d}.jpg").write_bytes(image_bytes(i))
    env = base_env(redis_url, HARDNET_STATE_DIR=str(tmp_path / "state"))
    # No worker runs: every chunk stays in the queue.
    rc, sub = cli_json(["submit", str(src), "--out", str(tmp_path / "out"), "--chunk-size", "6",
                        "--json"], env)
    assert rc == 0, sub
    job = sub["job_id"]
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    queued = r.llen("hardnet")
    assert queued == 4    # 20 URIs in chunks of 6

    # Two messages "taken by a worker" (entries of kombu's unacked hash) and one dead letter: what a
    # fleet leaves in Redis, written with the store's own API.
    r.hset("unacked", mapping={"tag-a": "[]", "tag-b": "[]"})
    from hnq.jobs.store import JobStore

    JobStore(redis_url).complete_dead(job, 3, 2, "test: gave up", 5)

    port = free_port()
    proc, log_path = _exporter(env, port, tmp_path)
    try:
        got = wait_scrape(port, proc)
        assert proc.poll() is None
    finally:
        proc.terminate()
        rc = proc.wait(30)
    assert rc == 0, log_path.read_text()      # SIGTERM: a clean stop
    assert f"exporter on http://127.0.0.1:{port}/metrics" in log_path.read_text()

    assert value(got, "hardnet_exporter_redis_up") == 1
    assert value(got, "hardnet_queue_messages", queue="hardnet") == queued == r.llen("hardnet")
    assert value(got, "hardnet_queue_unacked_messages") == 2 == r.hlen("unacked")
    assert value(got, "hardnet_dead_letter_chunks") == 1
    assert value(got, "hardnet_job_images", job_id=job, state="ok") == 0
    assert value(got, "hardnet_job_images", job_id=job, state="error") == 2      # the dead chunk's
    assert value(got, "hardnet_job_images", job_id=job, state="pending") == 18
    assert value(got, "hardnet_job_chunks", job_id=job, state="done") == 0
    assert value(got, "hardnet_job_chunks", job_id=job, state="dead") == 1
    assert value(got, "hardnet_job_chunks", job_id=job, state="pending") == 3
    assert value(got, "hardnet_job_info", job_id=job, model=sub.get("model", "hardnet68"),
                 state="queued") == 1
    assert value(got, "hardnet_jobs", state="queued") == 1


def test_exporter_port_in_use_is_a_usage_error(redis_url, tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        proc, log_path = _exporter(base_env(redis_url), port, tmp_path)
        rc = proc.wait(60)
    out = log_path.read_text()
    assert rc == 2 and f"--port {port}: cannot listen on 127.0.0.1:{port}" in out, out


def test_metrics_port_is_served_again_after_the_memory_guard_recycles_the_worker(redis_url, tmp_path):
    """The memory guard re-executes `hardnet worker` in the same process: the new image must bind
    HARDNET_METRICS_PORT again (the old socket is closed on exec), not stop on 'port in use'."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(16):
        (src / f"img-{i:03d}.jpg").write_bytes(image_bytes(i))
    port = free_port()
    env = base_env(redis_url, HARDNET_FILE_ROOTS=str(tmp_path), HARDNET_METRICS_PORT=str(port),
                   HARDNET_MAX_MEMORY_PER_CHILD_MB="100", HARDNET_CHUNKS_IN_FLIGHT="1",
                   HARDNET_MAX_CHUNKS_IN_FLIGHT="1",   # one chunk per process image
                   HARDNET_STATE_DIR=str(tmp_path / "state"))
    w = Worker(env, "recycled", tmp_path)
    try:
        w.wait_ready()
        scrape(port)           # a client connected to the first process's server
        rc, st = cli_json(["submit", str(src), "--out", str(tmp_path / "out"), "--chunk-size", "8",
                           "--wait", "--json"], env, timeout=300)
        # the last recycle may still be starting up: wait for its endpoint
        deadline = time.monotonic() + 120
        while w.log().count(f"metrics on http://0.0.0.0:{port}/metrics") <= w.log().count(
                "restarting the worker (memory guard)"):
            assert w.proc.poll() is None and time.monotonic() < deadline, w.log()[-3000:]
            time.sleep(0.2)
        after = wait_scrape(port, w.proc)
        log = w.log()
    finally:
        w.stop()
    assert rc == 0 and st["succeeded"] == 16
    assert log.count("restarting the worker (memory guard)") >= 2
    assert "cannot serve metrics" not in log
    # a new process image counts from zero (Prometheus's rate() handles the reset)
    assert sum(with_name(after, "hardnet_images_total").values()) < 16
