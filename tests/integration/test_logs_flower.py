"""Seeing a running worker: JSON log lines that parse and name the job, no credential in logs or
records, and Flower showing the worker and its tasks (events turned on with `hardnet worker -E`,
a Celery flag passed through). Real redis-server, a real worker process, a real Flower."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cluster import ROOT, Worker, base_env, cli, image_bytes
from servers import LoopbackWeb, without_proxies, free_port

pytestmark = pytest.mark.slow

SECRETS = ("hunter2", "AKIAEXAMPLESECRET", "0123456789abcdefsig", "FwoGZXIvYXdzTOKEN")


def _images() -> LoopbackWeb:
    """Any path is a JPEG, except paths containing 'missing' (404)."""
    body = image_bytes(5)
    return LoopbackWeb(lambda path: (404, b"") if "missing" in path else (200, body))


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def fleet(redis_server, tmp_path_factory):
    web = _images()
    logdir = tmp_path_factory.mktemp("obs-logs")
    env = base_env(redis_server.url, HARDNET_QUEUE="obs", HARDNET_LOG_FORMAT="json",
                   HARDNET_ALLOW_HTTP="true", HARDNET_HTTP_ALLOW_HOSTS="127.0.0.1",
                   HARDNET_ALLOW_PRIVATE_NETWORKS="true",
                   HARDNET_STATE_DIR=str(tmp_path_factory.mktemp("obs-state")))
    without_proxies(env)  # everything here stays on 127.0.0.1
    port = free_port()
    flower_log = open(logdir / "flower.log", "w")
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "--broker", redis_server.url, "flower", f"--port={port}",
         "--address=127.0.0.1"], env={**env, "FLOWER_UNAUTHENTICATED_API": "true"}, cwd=ROOT,
        stdout=flower_log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:  # Flower must listen before the worker sends its first events
        try:
            urllib.request.urlopen(base + "/healthcheck", timeout=2).read()
            break
        except OSError:
            if flower.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"flower did not start:\n{(logdir / 'flower.log').read_text()[-3000:]}")
            time.sleep(0.3)
    w = Worker(env, "obs", logdir, args=["-E"])  # -E: a Celery flag through `hardnet worker`
    try:
        w.wait_ready()
        yield {"env": env, "worker": w, "web": web, "flower": base, "name": f"obs@{socket.gethostname()}"}
    finally:
        w.stop()
        flower.terminate()
        flower.wait(20)
        flower_log.close()
        web.stop()


@pytest.fixture(scope="module")
def job(fleet, tmp_path_factory):
    """One job of 12 URIs in 3 chunks, with credentials in some of them."""
    port = fleet["web"].port
    uris = [f"http://127.0.0.1:{port}/img/{i}.jpg" for i in range(8)]
    uris += [
        f"http://alice:hunter2@127.0.0.1:{port}/img/with-password.jpg",
        f"http://127.0.0.1:{port}/img/presigned.jpg?X-Amz-Credential=AKIAEXAMPLESECRET%2Fx"
        f"&X-Amz-Security-Token=FwoGZXIvYXdzTOKEN&X-Amz-Signature=0123456789abcdefsig",
        f"http://127.0.0.1:{port}/img/missing.jpg?X-Amz-Signature=0123456789abcdefsig",
        f"http://alice:hunter2@127.0.0.1:{port}/img/missing-too.jpg",
    ]
    out = tmp_path_factory.mktemp("obs-out")
    p = cli(["submit", "--from-file", "-", "--out", str(out), "--chunk-size", "4", "--wait", "--json"],
            fleet["env"], stdin="\n".join(uris) + "\n")
    assert p.returncode == 3, p.stderr  # two 404s
    summary = json.loads(p.stdout.splitlines()[-1])
    job_id = summary["job_id"]
    records = [json.loads(x) for x in cli(["results", job_id], fleet["env"]).stdout.splitlines()]
    return {"id": job_id, "records": records, "out": out, "stderr": p.stderr}


def test_records_and_outputs_hold_no_credentials(job):
    recs = job["records"]
    assert len(recs) == 12
    by_name = {r["uri"].split("/img/")[1].split("?")[0]: r for r in recs}
    assert by_name["with-password.jpg"]["uri"].startswith("http://alice:***@127.0.0.1:")
    assert by_name["with-password.jpg"]["status"] == "ok"
    assert "X-Amz-Signature=***" in by_name["presigned.jpg"]["uri"]
    assert by_name["missing.jpg"]["error"]["code"] == "not_found"
    everything = json.dumps(recs) + job["stderr"]
    for path in Path(job["out"]).rglob("*"):
        if path.is_file() and "inputs" not in path.parts:  # the claim check needs the real URIs
            everything += path.read_bytes().decode("utf-8", "replace")
    for secret in SECRETS:
        assert secret not in everything, secret


def test_json_log_lines_parse_name_the_job_and_hold_no_credentials(fleet, job):
    text = fleet["worker"].log()
    lines = [x for x in text.splitlines() if x.strip()]
    parsed = [json.loads(x) for x in lines]  # every line, banner included: none is plain text
    assert all({"time", "level", "logger", "message"} <= set(d) for d in parsed)
    mine = [d for d in parsed if d.get("job") == job["id"]]
    assert {d["chunk"] for d in mine} == {0, 1, 2}
    assert all(d["worker"] == fleet["name"] for d in mine)
    assert any("done" in d["message"] for d in mine)
    for secret in SECRETS:
        assert secret not in text, secret


def test_flower_shows_the_worker_and_its_tasks(fleet, job):
    base = fleet["flower"]
    workers = _get_json(base + "/api/workers?refresh=1")  # answered by `celery inspect` (threads pool)
    assert fleet["name"] in workers
    from worker.settings import WorkerSettings

    # the threads pool is HARDNET_MAX_CHUNKS_IN_FLIGHT (worker.admission decides how many it uses)
    pool = WorkerSettings.model_fields["max_chunks_in_flight"].default
    assert workers[fleet["name"]]["stats"]["pool"]["max-concurrency"] == pool
    deadline = time.monotonic() + 30
    while True:
        tasks = _get_json(base + "/api/tasks")
        ours = [t for t in tasks.values() if t.get("name") == "hardnet.classify_chunk"]
        if len(ours) >= 3 and all(t["state"] == "SUCCESS" for t in ours) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(ours) == 3 and {t["state"] for t in ours} == {"SUCCESS"}
    assert {t["worker"] for t in ours} == {fleet["name"]}
