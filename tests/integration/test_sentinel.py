"""Issue 20, item 3 ("Redis Sentinel"), with real processes: a Redis master, a replica
(`--replicaof`) and three sentinels (`redis-server CONF --sentinel`, down-after 1 s) on free
loopback ports, passwords on the data nodes (in the URL) and on the sentinels
(HARDNET_SENTINEL_PASSWORD); a real `hardnet worker` and `hardnet submit ... --wait` whose
HARDNET_BROKER_URL is `sentinel://...;sentinel://...;sentinel://...` with HARDNET_SENTINEL_MASTER.

A third of the way through the job the master gets SIGKILL. The sentinels promote the replica;
Celery (kombu's SentinelChannel), the worker's job store, the sweeper and the waiting `submit`
(redis-py's master_for) must all follow it: the job ends `done` on its own, with one record per
URI, and `hardnet status JOB` answers through Sentinel right after the kill and at the end.
Prints MEASURED master lost -> job done."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from redis.sentinel import Sentinel

from cluster import ROOT, Worker, base_env, cli, image_bytes, read_jsonl
from servers import free_port, wait_port

pytestmark = pytest.mark.slow

N, CHUNK = 240, 8
MASTER = "hnqmaster"
PW, SPW = "data-pw", "sentinel-pw"


class Node:
    """One redis-server (data node or sentinel) in the foreground, so that SIGKILL is ours."""

    def __init__(self, workdir: Path, name: str, args: list[str], conf: str | None = None):
        self.port = free_port()
        self.log_path = workdir / f"{name}.log"
        argv = ["redis-server"]
        if conf is not None:
            path = workdir / f"{name}.conf"
            path.write_text(conf.replace("PORT", str(self.port)))
            argv.append(str(path))
        argv += ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(workdir),
                 "--logfile", str(self.log_path), *args]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_port(self.port)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def sentinels(tmp_path):
    """master + replica + 3 sentinels; yields (master, replica, [sentinels])."""
    work = tmp_path / "redis"
    work.mkdir()
    data = ["--save", "", "--appendonly", "no", "--requirepass", PW, "--masterauth", PW]
    master = Node(work, "master", data)
    replica = Node(work, "replica", data + ["--replicaof", "127.0.0.1", str(master.port)])
    conf = (f"sentinel monitor {MASTER} 127.0.0.1 {master.port} 2\n"
            f"sentinel auth-pass {MASTER} {PW}\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\n"
            f"sentinel failover-timeout {MASTER} 5000\n"
            f"sentinel parallel-syncs {MASTER} 1\n"
            f"requirepass {SPW}\nsentinel sentinel-pass {SPW}\n")
    sents = [Node(work, f"sentinel{i}", ["--sentinel"], conf=conf) for i in range(3)]
    nodes = [master, replica, *sents]
    try:
        # ready: the replica in sync, and every sentinel knows the replica and the other two
        r = redis.Redis(port=replica.port, password=PW, decode_responses=True)
        deadline = time.monotonic() + 60
        while True:
            ok = r.info("replication").get("master_link_status") == "up"
            for s in sents:
                c = redis.Redis(port=s.port, password=SPW, decode_responses=True)
                m = c.sentinel_master(MASTER)
                ok = ok and int(m.get("num-slaves", 0)) >= 1 and int(m.get("num-other-sentinels", 0)) >= 2
            if ok:
                break
            assert time.monotonic() < deadline, "the sentinels never saw the replica and each other"
            time.sleep(0.2)
        yield master, replica, sents
    finally:
        for n in nodes:
            n.kill()


def _status(env: dict, job: str) -> tuple[int, dict | None, str]:
    p = cli(["status", job, "--json"], env, timeout=120)
    lines = [l for l in p.stdout.splitlines() if l.strip()]
    try:
        return p.returncode, json.loads(lines[-1]) if lines else None, p.stderr
    except ValueError:
        return p.returncode, None, p.stderr


def test_master_killed_a_third_of_the_way_through(sentinels, tmp_path):
    master, replica, sents = sentinels
    url = ";".join(f"sentinel://:{PW}@127.0.0.1:{s.port}/0" for s in sents)
    src, out = tmp_path / "images", tmp_path / "out"
    src.mkdir()
    for i in range(N):
        (src / f"{i:03d}.jpg").write_bytes(image_bytes(i))
    env = base_env(url, HARDNET_SENTINEL_MASTER=MASTER, HARDNET_SENTINEL_PASSWORD=SPW,
                   HARDNET_FILE_ROOTS=str(src), HARDNET_STATE_DIR=str(tmp_path / "state"),
                   HARDNET_SWEEP_INTERVAL="2", HARDNET_BATCH_SIZE="8", HARDNET_CHUNKS_IN_FLIGHT="1",
                   HARDNET_OUTPUT_ROOTS=str(tmp_path))
    # the test's own view, through the same sentinels
    watch = Sentinel([("127.0.0.1", s.port) for s in sents], sentinel_kwargs={"password": SPW},
                     socket_timeout=2).master_for(MASTER, password=PW, decode_responses=True)
    worker = Worker(env, "w", tmp_path)
    submit = None
    try:
        worker.wait_ready()
        submit = subprocess.Popen(
            [sys.executable, "-m", "producer.cli", "submit", str(src), "--out", f"file://{out}/",
             "--chunk-size", str(CHUNK), "--wait", "--json"],
            env=env, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # the job id, then a third of the chunks done
        deadline = time.monotonic() + 240
        job = None
        while True:
            assert time.monotonic() < deadline, worker.log()[-3000:]
            assert submit.poll() is None, submit.communicate()
            ids = watch.zrevrange("hnq:jobs", 0, 0)
            job = ids[0] if ids else None
            if job and int(watch.hget(f"hnq:job:{{{job}}}", "chunks_done") or 0) >= N // CHUNK // 3:
                break
            time.sleep(0.1)
        done_at_kill = int(watch.hget(f"hnq:job:{{{job}}}", "chunks_done"))
        master.kill()
        t_kill = time.monotonic()

        # `hardnet status` through Sentinel while the sentinels fail over (it retries inside)
        rc, during, err = _status(env, job)
        status_during_s = time.monotonic() - t_kill
        assert rc == 0 and during and during["job_id"] == job, (rc, during, err)
        assert during["state"] in ("queued", "running", "done"), during

        out_s, err_s = submit.communicate(timeout=300)
        t_done = time.monotonic()
        assert submit.returncode == 0, (submit.returncode, out_s[-2000:], err_s[-3000:])
        summary = json.loads([l for l in out_s.splitlines() if l.strip()][-1])
        rc, after, err = _status(env, job)
        new_master = Sentinel([("127.0.0.1", s.port) for s in sents], sentinel_kwargs={"password": SPW}
                              ).discover_master(MASTER)
    finally:
        if submit is not None and submit.poll() is None:
            submit.kill()
        worker.stop()
    print(f"\nMEASURED Redis failover: master SIGKILLed at {done_at_kill}/{N // CHUNK} chunks -> job done "
          f"{t_done - t_kill:.1f}s later (`submit --wait` exit; down-after 1 s, failover-timeout 5 s, "
          f"{N} images, chunk {CHUNK}, 1 worker); `hardnet status` answered {status_during_s:.1f}s after the "
          f"kill; new master {new_master}")

    assert new_master == ("127.0.0.1", replica.port), new_master
    assert summary["state"] == "done" and summary["succeeded"] == N and summary["failed"] == 0, summary
    assert rc == 0 and after["state"] == "done" and after["succeeded"] == N, (rc, after, err)
    # one record per URI, in the parts the manifest lists
    manifest = json.loads((out / job / "manifest.json").read_text())
    assert manifest["state"] == "done" and manifest["succeeded"] == N
    recs = [r for part in manifest["parts"] for r in read_jsonl((out / job / part).read_text())]
    uris = [r["uri"] for r in recs]
    assert len(uris) == N and len(set(uris)) == N, (len(uris), len(set(uris)))
    assert all(r["status"] == "ok" for r in recs)


def test_a_command_waiting_on_the_killed_master_follows_the_new_one(sentinels):
    """hnq.redis_conn.FollowingConnection: a BLPOP waiting on the master when it is killed (what
    `hardnet wait` does between polls) is retried on the master the sentinels promote. redis-py's own
    Sentinel connection retried it on the old address (redis/redis-py#3874): every attempt
    refused until the retry policy gave up (the job store's: ~3 minutes)."""
    import threading

    from redis.backoff import ConstantBackoff
    from redis.retry import Retry

    from hnq.redis_conn import SentinelOptions, client

    master, replica, sents = sentinels
    url = ";".join(f"sentinel://:{PW}@127.0.0.1:{s.port}/0" for s in sents)
    # 60 tries 0.5 s apart: far more than a failover takes, and all of them refused without the fix
    c = client(url, SentinelOptions(master=MASTER, password=SPW), decode_responses=True,
               socket_timeout=30, socket_connect_timeout=2, retry=Retry(ConstantBackoff(0.5), 60),
               retry_on_error=[redis.ConnectionError, redis.TimeoutError])
    c.ping()
    got: list = []

    def wait() -> None:
        try:
            got.append(c.blpop(["hnq:test:ended"], timeout=20))
        except Exception as e:  # noqa: BLE001
            got.append(e)

    t = threading.Thread(target=wait, daemon=True)
    t.start()
    time.sleep(0.5)                                  # the BLPOP is waiting on the master
    master.kill()
    watch = Sentinel([("127.0.0.1", s.port) for s in sents], sentinel_kwargs={"password": SPW},
                     socket_timeout=2)
    deadline = time.monotonic() + 60
    while True:                                      # the failover, seen by the sentinels
        try:
            if watch.discover_master(MASTER) == ("127.0.0.1", replica.port):
                break
        except redis.ConnectionError:
            pass
        assert time.monotonic() < deadline, "the sentinels did not promote the replica"
        time.sleep(0.2)
    new = watch.master_for(MASTER, password=PW, decode_responses=True)
    while t.is_alive() and not got:                  # until the retried BLPOP waits on the new master
        new.rpush("hnq:test:ended", "done")
        t.join(1)
        if t.is_alive():
            new.delete("hnq:test:ended")
        assert time.monotonic() < deadline + 60, "the BLPOP never came back"
    assert got == [("hnq:test:ended", "done")], got
