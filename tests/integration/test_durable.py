"""Durable jobs against the real parts (redis-server, moto S3 server, worker processes): the claim
check's Redis cost, resume after FLUSHALL, the sweeper after the queue list is deleted, truthful
end states and exit codes, and the failure paths that used to lose or hang work."""
from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
import redis

from cluster import wait_state as _wait_state, Worker, base_env, cli, cli_json, image_bytes, read_jsonl
from faultproxy import FaultProxy
from servers import free_port, s3_env

pytestmark = pytest.mark.slow

VT = 6


def _images(d: Path, n: int, size=(48, 40)) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (d / f"img-{i:04d}.jpg").write_bytes(image_bytes(i, "JPEG", size))
    return d




def _one_record_each(out: Path, job: str, n: int) -> tuple[list[dict], dict]:
    manifest = json.loads((out / job / "manifest.json").read_text())
    recs = [r for p in sorted((out / job).glob("part-*.jsonl")) for r in read_jsonl(p.read_text())]
    uris = [r["uri"] for r in recs]
    assert len(uris) == n and len(set(uris)) == n, f"{len(uris)} records, {len(set(uris))} distinct, want {n}"
    return recs, manifest


@pytest.fixture
def env(redis_url, tmp_path):
    return base_env(redis_url, HARDNET_FILE_ROOTS=str(tmp_path), HARDNET_OUTPUT_ROOTS=str(tmp_path),
                    HARDNET_VISIBILITY_TIMEOUT=str(VT), HARDNET_STATE_DIR=str(tmp_path / "state"),
                    HARDNET_SWEEP_INTERVAL="0")


# ------------------------------------------------------------------------------ claim check
def test_redis_bytes_per_queued_uri_at_the_default_chunk_size(env, redis_url, tmp_path):
    """100,000 URIs submitted with no worker: what Redis holds is a few small messages, the job's
    ready list (about 40 bytes per chunk: hnq.jobs.dispatch) and a few hashes, not the URIs.
    Asserted as a size: <= 4 bytes per queued URI (issue 19; 5.3 before the ready lists)."""
    n = 100_000
    listing = tmp_path / "uris.txt"
    listing.write_text("".join(f"s3://photos-archive/2026/05/17/camera-{i % 97:02d}/IMG_{i:08d}.jpg\n"
                               for i in range(n)))
    r = redis.Redis.from_url(redis_url)
    before = r.info("memory")["used_memory"]
    rc, sub = cli_json(["submit", "--from-file", str(listing), "--out", str(tmp_path / "out"), "--json"], env,
                       timeout=300)
    assert rc == 0 and sub["total"] == n
    after = r.info("memory")["used_memory"]
    queue = r.memory_usage("hardnet", samples=0)
    keys = {k.decode(): r.memory_usage(k, samples=0) for k in r.scan_iter(count=1000)}
    chunks = sub["chunks"]
    ready = r.memory_usage(f"hnq:job:{{{sub['job_id']}}}:ready", samples=0)
    print(f"\nMEASURED {n} URIs in {chunks} chunks: queue list {queue} B = {queue / n:.2f} B/URI; "
          f"ready list {ready} B; "
          f"all keys {sum(keys.values())} B = {sum(keys.values()) / n:.2f} B/URI ({len(keys)} keys); "
          f"used_memory delta {after - before} B (includes fixed costs: clients, scripts)")
    # HARDNET_DISPATCH_AHEAD (4) messages in the Celery queue, the rest on the job's ready list
    assert chunks == -(-n // 512)
    assert r.llen("hardnet") == 4 and r.llen(f"hnq:job:{{{sub['job_id']}}}:ready") == chunks - 4
    assert queue / n <= 4.0 and sum(keys.values()) / n <= 4.0, keys
    # the message is a claim check: no URI in it, and it verifies against the stored list
    msg = json.loads(r.lindex("hardnet", 0))
    body = json.loads(base64.b64decode(msg["body"]))
    payload = body[0][0]
    assert set(payload) == {"v", "job_id", "chunk", "count", "digest", "model", "dest"}, payload
    assert "photos-archive" not in json.dumps(msg)
    from hnq.jobs.inputs import decode_uris

    c = payload["chunk"]
    stored = (tmp_path / "out" / sub["job_id"] / "inputs" / f"chunk-{c:05d}.jsonl.gz").read_bytes()
    uris, digest = decode_uris(stored)
    assert digest == payload["digest"] and len(uris) == payload["count"]
    assert uris[0] == f"s3://photos-archive/2026/05/17/camera-{(c * 512) % 97:02d}/IMG_{c * 512:08d}.jpg"


# ------------------------------------------------------------------------------ lost state / messages
def test_flushall_mid_job_then_resume_from_storage(env, redis_url, tmp_path):
    n = 120
    _images(tmp_path / "in", n)
    out = tmp_path / "out"
    w = Worker(env, "flush", tmp_path)
    try:
        w.wait_ready()
        rc, sub = cli_json(["submit", str(tmp_path / "in"), "--out", str(out), "--chunk-size", "8", "--json"], env)
        job = sub["job_id"]
        w.wait_log(f"chunk {job}/2 done", timeout=180)
        redis.Redis.from_url(redis_url).flushall()
        p = cli(["status", job], env)
        assert p.returncode == 4 and "lost" in p.stderr
        p = cli(["resume", job, "--out", str(out), "--wait", "--timeout", "240"], env, timeout=300)
        log = w.log()
    finally:
        w.stop()
    assert p.returncode == 0, p.stderr[-3000:] + log[-3000:]
    assert "state rebuilt from storage" in p.stderr
    recs, manifest = _one_record_each(out, job, n)
    assert all(r["status"] == "ok" for r in recs)
    assert manifest["state"] == "done" and manifest["total"] == n and manifest["succeeded"] == n
    assert manifest["parts"] == [f"part-{c:05d}.jsonl" for c in range(15)] and manifest["missing_parts"] == []


def test_queue_list_deleted_mid_job_sweeper_heals_it(env, redis_url, tmp_path):
    n = 96
    _images(tmp_path / "in", n)
    out = tmp_path / "out"
    # 24 chunks of 4, at most 4 held (worker.admission would take all the small ones): the rest wait
    # in the Celery list (HARDNET_DISPATCH_AHEAD above the job's chunks: all of them are dispatched)
    env = dict(env, HARDNET_SWEEP_INTERVAL="2", HARDNET_MAX_CHUNKS_IN_FLIGHT="4", HARDNET_DISPATCH_AHEAD="100")
    w = Worker(env, "sweeper", tmp_path)
    try:
        w.wait_ready()
        rc, sub = cli_json(["submit", str(tmp_path / "in"), "--out", str(out), "--chunk-size", "4", "--json"], env)
        job = sub["job_id"]
        # right after its first chunk starts (the worker holds at most 4; on a quiet machine the
        # whole job takes ~3 s, and which chunk ends first is not fixed)
        w.wait_log(f"chunk {job}/", timeout=180)
        r = redis.Redis.from_url(redis_url)
        # the chunks no worker took: a few messages in the Celery list, the rest on the job's ready
        # list (hnq.jobs.dispatch); both lists are lost
        ready = f"hnq:job:{{{job}}}:ready"
        with r.pipeline() as p:
            p.llen("hardnet")
            p.llen(ready)
            p.delete("hardnet", ready)
            in_queue, waiting, _ = p.execute()
        lost = in_queue + waiting
        assert lost >= 3, (in_queue, waiting)
        deleted_at = time.monotonic()
        # status shows the lost chunks as stalled once they have been quiet for the visibility timeout
        st = {}
        while time.monotonic() - deleted_at < 60:
            _, st = cli_json(["status", job, "--json"], dict(env, HARDNET_VISIBILITY_TIMEOUT="2"))
            if st.get("stalled_chunks") or st.get("state") != "running":
                break
            time.sleep(0.2)
        st_final = _wait_state(env, job, ("done", "done_with_errors", "failed"), timeout=300)
        log = w.log()
    finally:
        w.stop()
    print(f"\nMEASURED queue and ready lists deleted with {in_queue}+{waiting} chunks in them: job {st_final['state']} "
          f"{time.monotonic() - deleted_at:.1f}s later")
    assert st.get("stalled_chunks"), st
    assert "re-sent" in log
    assert st_final["state"] == "done" and st_final["succeeded"] == n
    _, manifest = _one_record_each(out, job, n)
    assert manifest["succeeded"] == n


# ------------------------------------------------------------------------------ failure paths
def test_dead_letter_after_completion_keeps_the_part(env, redis_url, tmp_path):
    """A chunk completed, then delivered again past max attempts (an ack lost after the part was
    written): the late delivery must not replace the completed part with chunk_failed records."""
    _images(tmp_path / "in", 8)
    out = tmp_path / "out"
    w = Worker(env, "race", tmp_path)
    try:
        w.wait_ready()
        rc, sub = cli_json(["submit", str(tmp_path / "in"), "--out", str(out), "--wait", "--json"], env, timeout=180)
        assert rc == 0 and sub["state"] == "done"
        job = sub["job_id"]
        part = (out / job / "part-00000.jsonl").read_bytes()
        r = redis.Redis.from_url(redis_url)
        r.hset(f"hnq:job:{{{job}}}:attempts", 0, 5)          # as if five deliveries had been made
        from hnq.jobs.store import JobStore
        from hnq.jobs.sweep import resend_chunk

        assert resend_chunk(JobStore(redis_url), "hardnet", job, 0, "hardnet39ds", f"file://{out}/")
        w.wait_log("was completed by an earlier attempt", timeout=60)
        rc2, st = cli_json(["status", job, "--json"], env)
    finally:
        w.stop()
    assert (out / job / "part-00000.jsonl").read_bytes() == part
    assert st["state"] == "done" and st["dead_chunks"] == 0 and st["succeeded"] == 8


def test_output_outside_the_workers_roots_fails_at_once(env, tmp_path):
    """The destination in a message is checked by the worker: outside HARDNET_OUTPUT_ROOTS it is
    refused without a single retry; the job is `failed`, `hardnet wait` exits 4, no part written."""
    _images(tmp_path / "in", 10)
    out = tmp_path / "out"
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    wenv = dict(env, HARDNET_OUTPUT_ROOTS=str(allowed))
    w = Worker(wenv, "roots", tmp_path)
    try:
        w.wait_ready()
        # submit's own check would refuse this job (exit 2, hnq.fleet): sent anyway, for the worker's check
        rc, sub = cli_json(["submit", str(tmp_path / "in"), "--out", str(out), "--chunk-size", "5", "--json"],
                           dict(env, HARDNET_CHECK_WORKERS="false"))
        p = cli(["wait", sub["job_id"], "--timeout", "120"], env, timeout=180)
        rc2, st = cli_json(["status", sub["job_id"], "--json"], env)
        log = w.log()
    finally:
        w.stop()
    assert p.returncode == 4, p.stderr
    assert st["state"] == "failed" and st["dead_chunks"] == 2
    assert all(d["attempts"] == 1 and "HARDNET_OUTPUT_ROOTS" in d["error"] for d in st["dead_letters"]), st
    assert not list((out / sub["job_id"]).glob("part-*")) and not (out / sub["job_id"] / "manifest.json").exists()
    assert "attempt 2" not in log


def test_missing_bucket_exit_2_and_unwritable_output_failed_exit_4(redis_url, s3, moto_server, tmp_path):
    env = base_env(redis_url, HARDNET_STATE_DIR=str(tmp_path / "state"), HARDNET_SWEEP_INTERVAL="0",
                   **s3_env(moto_server.url))
    s3.create_bucket(Bucket="src-in")
    for i in range(6):
        s3.put_object(Bucket="src-in", Key=f"p/{i}.jpg", Body=image_bytes(i))
    p = cli(["submit", "s3://src-in/p/", "--out", "s3://no-such-bucket/r/"], env)
    assert p.returncode == 2 and "no-such-bucket" in p.stderr and "does not exist" in p.stderr, p.stderr

    # The output becomes unwritable after submit: every PUT of a part is refused (403).
    s3.create_bucket(Bucket="dst-out")
    with FaultProxy(moto_server.url) as proxy:
        penv = dict(env, **s3_env(proxy.url))
        proxy.set_fault("403", method="PUT", path="part-")
        w = Worker(penv, "unwritable", tmp_path)
        try:
            w.wait_ready()
            p = cli(["submit", "s3://src-in/p/", "--out", "s3://dst-out/r/", "--chunk-size", "3", "--wait",
                     "--timeout", "120", "--json"], penv, timeout=180)
        finally:
            w.stop()
    assert p.returncode == 4, p.stderr[-2000:]
    summary = json.loads(p.stdout.splitlines()[-1])
    assert summary["state"] == "failed" and summary["dead_chunks"] == 2 and summary["failed"] == 6
    manifest = json.loads(s3.get_object(Bucket="dst-out", Key=f"r/{summary['job_id']}/manifest.json")["Body"].read())
    assert manifest["state"] == "failed" and manifest["parts"] == [] and manifest["missing_parts"] == [0, 1]
    assert [d["chunk"] for d in manifest["dead_chunks"]] == [0, 1]


def test_redis_destination_size_limit_cancel_and_redrive_rules(env, redis_url, tmp_path):
    _images(tmp_path / "in", 12, size=(16, 16))
    small = dict(env, HARDNET_REDIS_RESULTS_MAX="10")
    p = cli(["submit", str(tmp_path / "in")], small)
    assert p.returncode == 2 and "--out" in p.stderr and "HARDNET_REDIS_RESULTS_MAX=10" in p.stderr, p.stderr
    rc, sub = cli_json(["submit", str(tmp_path / "in"), "--force", "--json"], small)
    assert rc == 0 and sub["total"] == 12
    # cancel, then redrive is refused; cancel of a finished job changes nothing
    assert cli(["cancel", sub["job_id"]], env).returncode == 0
    p = cli(["redrive", sub["job_id"]], env)
    assert p.returncode == 2 and "cancelled" in p.stderr
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    r.hset(f"hnq:job:{{{sub['job_id']}}}", mapping={"state": "done", "finished_at": "1"})
    before = r.hgetall(f"hnq:job:{{{sub['job_id']}}}")
    p = cli(["cancel", sub["job_id"]], env)
    assert p.returncode == 0 and "already ended (done)" in p.stderr
    assert r.hgetall(f"hnq:job:{{{sub['job_id']}}}") == before


def test_unreachable_broker_cli_gives_up_within_10s(tmp_path):
    env = base_env(f"redis://127.0.0.1:{free_port()}/0", HARDNET_STATE_DIR=str(tmp_path / "state"))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(image_bytes(1))
    for args in (["status"], ["submit", str(tmp_path / "in")], ["wait", "some-job"]):
        t0 = time.monotonic()
        p = cli(args, env, timeout=60)
        took = time.monotonic() - t0
        print(f"\nMEASURED hardnet {args[0]} on an unreachable broker: exit {p.returncode} after {took:.1f}s")
        assert took < 10, took
        assert p.returncode == 1 and "cannot reach Redis" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_finalisation_that_fails_marks_the_job_failed(redis_url, tmp_path):
    """No worker needed: the manifest cannot be written (its path is a directory)."""
    from hnq.jobs.finish import finalize_or_fail
    from hnq.jobs.store import JobStore

    out = tmp_path / "out"
    store = JobStore(redis_url)
    store.create("jf", model="hardnet39ds", dest=f"file://{out}/")
    (out / "jf" / "manifest.json").mkdir(parents=True)
    (out / "jf" / "part-00000.jsonl").write_text('{"uri": "a", "status": "ok", "model": "m"}\n')
    store.seal("jf", total=1, chunks=1)
    assert store.complete_chunk("jf", 0, 1, 0)
    assert finalize_or_fail(store, "jf") == "failed"
    info = store.info("jf")
    assert info.state == "failed" and "manifest could not be written" in info.error
