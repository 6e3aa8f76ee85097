"""Issue 20, item 1 ("Preemption"), through the public CLI with real parts: a redis-server of the
test's own, moto's S3 server behind the fault proxy (which counts every GET per object), two real
`hardnet worker` processes and the DEFAULT visibility timeout (3600 s).

When the first chunk of a 480-image job is done, one worker gets SIGTERM, as Kubernetes sends it,
and SIGKILL 10 s later (a short grace, as GKE's node shutdown or a spot notice leaves), with
HARDNET_SHUTDOWN_GRACE=2 (grace + exit below the kill, as docs/reliability.md says to set it).
It must stop taking chunks, hand the chunks it still runs back to the queue with their finished
records kept, and exit before the SIGKILL; the other worker finishes the job. Without the hand-back
those chunks would sit unacked for the visibility timeout, an hour (measured before: 182 s after
the SIGTERM the job was still `running` at 336/480), so the job being `done` at all within the
wait below proves nothing was left to it. Prints MEASURED SIGTERM -> job done."""
from __future__ import annotations

import json
import re
import signal
import time
from collections import Counter

import pytest
import redis

from cluster import Worker, base_env, cli_json, image_bytes, read_jsonl, wait_state
from faultproxy import FaultProxy
from servers import s3_env

pytestmark = pytest.mark.slow

N, CHUNK = 480, 24
GRACE_S = 2         # HARDNET_SHUTDOWN_GRACE here: grace + the measured exit (~6 s) stay below the kill at 10 s
KILL_AFTER_S = 10
#: far below the visibility timeout (3600 s): a chunk left to it could not be done by then
DONE_WAIT_S = 240


@pytest.fixture
def proxy(s3, moto_server):
    with FaultProxy(moto_server.url) as p:
        yield p


def _gets(proxy: FaultProxy) -> Counter:
    return Counter({k.split(" ", 1)[1]: v for k, v in proxy.stats().get("paths", {}).items()
                    if k.startswith("GET /src-in/")})


def test_sigterm_hands_chunks_back_and_the_job_ends_within_a_minute(redis_url, s3, proxy, tmp_path):
    s3.create_bucket(Bucket="src-in")
    s3.create_bucket(Bucket="dst-out")
    for i in range(N):
        s3.put_object(Bucket="src-in", Key=f"p/{i:03d}.jpg", Body=image_bytes(i, "JPEG", (64, 64)))
    env = base_env(redis_url, HARDNET_STATE_DIR=str(tmp_path / "state"), HARDNET_SWEEP_INTERVAL="0",
                   HARDNET_SHUTDOWN_GRACE=str(GRACE_S), HARDNET_BATCH_SIZE="8", HARDNET_FETCH_THREADS="4",
                   **s3_env(proxy.url))
    env.pop("HARDNET_VISIBILITY_TIMEOUT")              # the default: 3600 s
    # every image GET slow (a far store) and at most 4 fetchers per worker: the chunks a worker holds
    # share them, so whatever the CPU's speed, the chunks still running at the SIGTERM need longer
    # than the 2 s grace (24 images x 0.25 s / 4 fetchers = 1.5 s per chunk, one after the other)
    proxy.set_fault("slow", delay=0.25, method="GET", path="/src-in/")
    victim, survivor = Worker(env, "victim", tmp_path), Worker(env, "survivor", tmp_path)
    try:
        victim.wait_ready(); survivor.wait_ready()
        rc, sub = cli_json(["submit", "s3://src-in/p/", "--out", "s3://dst-out/r/", "--chunk-size", str(CHUNK),
                            "--json"], env)
        assert rc == 0, sub
        job = sub["job_id"]
        victim.wait_log(f"chunk {job}/", timeout=180)
        deadline = time.monotonic() + 180
        while not re.search(rf"chunk {job}/\d+ done", victim.log()):
            assert time.monotonic() < deadline, victim.log()[-3000:]
            time.sleep(0.1)
        victim.proc.send_signal(signal.SIGTERM)
        t_term = time.monotonic()
        try:
            victim.proc.wait(KILL_AFTER_S)
        except Exception:   # noqa: BLE001 - still alive at the platform's kill
            pass
        exited_s = time.monotonic() - t_term if victim.proc.poll() is not None else None
        victim.kill()                                   # SIGKILL (a no-op when it exited by itself)
        st = wait_state(env, job, states=("done", "done_with_errors", "failed"), timeout=DONE_WAIT_S)
        done_s = time.monotonic() - t_term
        vlog, slog = victim.log(), survivor.log()
        gets = _gets(proxy)
        unacked = redis.Redis.from_url(redis_url).hlen("unacked")
    finally:
        victim.stop(); survivor.stop()
    handed = {int(c): int(k) for c, k in re.findall(
        rf"chunk {job}/(\d+): handed back to the queue with (\d+) of {CHUNK} images labelled", vlog)}
    unstarted = {int(c) for c in re.findall(rf"chunk {job}/(\d+) handed back unstarted", vlog)}
    kept = {int(c): (int(k), int(t)) for c, k, t in re.findall(
        rf"chunk {job}/(\d+): (\d+) records kept from an earlier attempt, (\d+) to label", slog)}
    print(f"\nMEASURED preemption: SIGTERM -> job done {done_s:.1f}s (HARDNET_SHUTDOWN_GRACE={GRACE_S}, "
          f"SIGKILL at {KILL_AFTER_S}s, visibility timeout 3600s); victim exited by itself "
          f"{exited_s if exited_s is None else round(exited_s, 1)}s after the SIGTERM (rc "
          f"{victim.proc.returncode}); chunks handed back {dict(sorted(handed.items()))} (chunk: images "
          f"labelled and kept), unstarted {sorted(unstarted)}; the survivor kept {dict(sorted(kept.items()))}; "
          f"{sum(gets.values())} image GETs for {N} images")

    # the victim stopped by itself, before the SIGKILL, and left nothing unacked behind
    assert exited_s is not None and victim.proc.returncode == 0, vlog[-3000:]
    assert "stopping: no new chunks" in vlog, vlog[-3000:]
    assert handed, f"the victim had no chunk to hand back at the end of its grace:\n{vlog[-3000:]}"
    assert unacked == 0
    # the job ended on its own, far inside the visibility timeout: no chunk waited for it
    assert st["state"] == "done" and st["succeeded"] == N and st["failed"] == 0, st
    assert st["dead_chunks"] == 0
    # exactly one record per URI
    uris, parts = [], {}
    for obj in s3.list_objects_v2(Bucket="dst-out", Prefix=f"r/{job}/part-")["Contents"]:
        recs = read_jsonl(s3.get_object(Bucket="dst-out", Key=obj["Key"])["Body"].read().decode())
        parts[int(re.search(r"part-(\d+)", obj["Key"]).group(1))] = [r["uri"] for r in recs]
        uris += [r["uri"] for r in recs]
    assert len(uris) == N and len(set(uris)) == N, (len(uris), len(set(uris)))
    manifest = json.loads(s3.get_object(Bucket="dst-out", Key=f"r/{job}/manifest.json")["Body"].read())
    assert manifest["state"] == "done" and manifest["succeeded"] == N
    # every image fetched at least once; a partly done chunk was not fetched again in full: its
    # kept images once, only the others again
    assert all(gets.get(u.removeprefix("s3:/"), 0) >= 1 for u in uris), "an image was never fetched"
    partial = {c: k for c, k in handed.items() if k > 0}
    assert partial, f"no chunk was partly labelled when the grace ended: {handed}"
    for c, k in partial.items():
        assert kept.get(c) == (k, CHUNK - k), (c, k, kept.get(c))
        fetched = sum(gets[u.removeprefix("s3:/")] for u in parts[c])
        assert fetched <= 2 * CHUNK - k, f"chunk {c}: {fetched} GETs for {CHUNK} images, {k} of them kept"
    # the hand-back did not count as an attempt: every chunk's attempts are 1 (done by one
    # attempt) or 1 for the survivor's run of a handed-back chunk
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    attempts = {int(c): int(n) for c, n in r.hgetall(f"hnq:job:{{{job}}}:attempts").items()}
    assert set(attempts.values()) <= {1}, attempts
