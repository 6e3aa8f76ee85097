"""Fair share between jobs, and priorities (issue 20, item 2), with real processes: `hardnet submit`
of three jobs while no worker runs — a big one first, then a small one, then a small one with
``--priority high`` — then one real `hardnet worker`.

Expected by the rule (hnq.jobs.dispatch, docs/operations.md "Several jobs at once"): the high job's
chunks go first; the small normal job is served in turn with the big one, so it ends long before
the big job is half done. When each chunk was written is read from the job's Redis state
(``hnq:job:ID:done``: chunk -> "ok failed time"), so the order is exact, not sampled."""
from __future__ import annotations

import json

import pytest

from cluster import Worker, base_env, cli, cli_json, image_bytes, wait_state

pytestmark = pytest.mark.slow

CHUNK = 8
BIG, SMALL, HIGH = 40, 2, 2      # chunks of each job


def _images(root, name: str, n: int) -> str:
    d = root / name
    d.mkdir()
    for i in range(n):
        (d / f"{i:04d}.jpg").write_bytes(image_bytes(i))
    return str(d)


def _submit(env, src: str, out: str, *extra: str) -> str:
    rc, got = cli_json(["submit", src, "--out", out, "--chunk-size", str(CHUNK), "--json", *extra], env)
    assert rc == 0, got
    return got["job_id"]


def test_small_and_high_jobs_are_not_stuck_behind_a_big_one(redis_server, redis_url, tmp_path):
    from hnq.jobs.store import JobStore

    roots = tmp_path / "images"
    roots.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    env = base_env(redis_url, HARDNET_FILE_ROOTS=str(roots), HARDNET_OUTPUT_ROOTS=str(out),
                   HARDNET_STATE_DIR=str(tmp_path / "state"), HARDNET_CHECK_WORKERS="0",
                   # a worker that holds 2 chunks at a time, as a GPU worker does with big chunks
                   HARDNET_CHUNKS_IN_FLIGHT="2", HARDNET_IMAGES_IN_FLIGHT=str(2 * CHUNK))
    big = _submit(env, _images(roots, "big", BIG * CHUNK), f"file://{out}/")
    small = _submit(env, _images(roots, "small", SMALL * CHUNK), f"file://{out}/")
    high = _submit(env, _images(roots, "high", HIGH * CHUNK), f"file://{out}/", "--priority", "high")

    # before any worker: the queue holds HARDNET_DISPATCH_AHEAD (4) of the big job's chunks, the
    # rest waits in each job's ready list; `status` shows the priority
    store = JobStore(redis_url)
    assert store.r.llen("hardnet") == 4
    assert store.r.llen(store.key(big, "ready")) == BIG - 4
    assert store.r.llen(store.key(small, "ready")) == SMALL
    st = cli(["status", high], env)
    assert st.returncode == 0 and "priority   high" in st.stdout.splitlines(), st.stdout
    _, info = cli_json(["status", small, "--json"], env)
    assert info["priority"] == "normal" and info["state"] == "queued"

    w = Worker(env, "fair", tmp_path)
    try:
        w.wait_ready()
        for job in (high, small, big):
            wait_state(env, job, ("done",), timeout=300)
    finally:
        w.stop()

    def done_times(job: str) -> list[float]:
        return sorted(store.done_times(job).values())

    big_t, small_t, high_t = done_times(big), done_times(small), done_times(high)
    assert len(big_t) == BIG and len(small_t) == SMALL and len(high_t) == HIGH
    small_end, high_end = small_t[-1], high_t[-1]
    big_before_small = sum(t <= small_end for t in big_t)
    big_before_high = sum(t <= high_end for t in big_t)
    print(f"\nMEASURED fair share: big job {big_before_small}/{BIG} chunks done when the small job "
          f"ended, {big_before_high}/{BIG} when the high-priority job ended")
    # the small job was served in turn: it ended before the big job was half done
    assert big_before_small < BIG / 2, (big_before_small, BIG)
    # the high job went ahead of both normal jobs: only the chunks already in the queue and held by
    # the worker before it (4 dispatched at submit + 2 held) may have finished before it
    assert high_end <= small_end
    assert big_before_high <= 4 + 2, big_before_high
    # one record per image, each job's own
    for job, n in ((big, BIG), (small, SMALL), (high, HIGH)):
        recs = [json.loads(line) for p in sorted((out / job).glob("part-*.jsonl"))
                for line in p.read_text().splitlines() if line.strip()]
        assert len(recs) == n * CHUNK and len({r["uri"] for r in recs}) == n * CHUNK


def test_bad_priority_is_refused_before_anything_exists(redis_server, redis_url, tmp_path):
    from hnq.jobs.store import JobStore

    roots = tmp_path / "images"
    roots.mkdir()
    env = base_env(redis_url, HARDNET_FILE_ROOTS=str(roots), HARDNET_STATE_DIR=str(tmp_path / "state"),
                   HARDNET_CHECK_WORKERS="0")
    p = cli(["submit", _images(roots, "a", 2), "--priority", "urgent"], env)
    assert p.returncode == 2 and "--priority" in p.stderr and "high" in p.stderr, p.stderr
    assert JobStore(redis_url).recent() == []
