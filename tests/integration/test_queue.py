"""The product end to end: `hardnet submit` -> real Redis -> two real Celery worker processes ->
records in a real S3 endpoint (moto server), local files, or Redis; plus status/results/cancel."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cluster import Worker, bad_images, base_env, cli, cli_json, image_bytes, read_jsonl

pytestmark = pytest.mark.slow

N_GOOD = 300        # images under the S3 prefix
N_NOISE = 750       # non-image keys under the same prefix: the listing spans two pages (>1000 keys)


@pytest.fixture(scope="module")
def cluster(redis_server, moto_server, tmp_path_factory):
    """Two worker processes on the module's Redis and S3; tests flush Redis and reset S3 freely."""
    from servers import s3_env

    logdir = tmp_path_factory.mktemp("logs")
    roots = tmp_path_factory.mktemp("local-images")
    env = base_env(redis_server.url, HARDNET_FILE_ROOTS=str(roots),
                   HARDNET_OUTPUT_ROOTS=str(tmp_path_factory.getbasetemp()), **s3_env(moto_server.url))
    workers = [Worker(env, f"w{i}", logdir) for i in range(2)]
    try:
        for w in workers:
            w.wait_ready()
        yield {"env": env, "workers": workers, "roots": roots, "logdir": logdir}
    finally:
        for w in workers:
            w.stop()


def _fill_bucket(s3) -> tuple[list[str], dict[str, bytes]]:
    s3.create_bucket(Bucket="photos")
    s3.create_bucket(Bucket="labels")
    objs = {f"2026/img-{i:04d}.{'jpg' if i % 3 else 'png'}": image_bytes(i, "JPEG" if i % 3 else "PNG")
            for i in range(N_GOOD)}
    objs.update({f"2026/{k}": v for k, v in bad_images().items()})
    objs.update({f"2026/meta/note-{i:04d}.txt": b"not an image" for i in range(N_NOISE)})
    with ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda kv: s3.put_object(Bucket="photos", Key=kv[0], Body=kv[1]), objs.items()))
    images = sorted(f"s3://photos/{k}" for k in objs if not k.endswith(".txt"))
    return images, objs


def test_s3_prefix_to_s3_destination(cluster, s3, redis_url):
    env = cluster["env"]
    images, _ = _fill_bucket(s3)
    rc, summary = cli_json(["submit", "s3://photos/2026/", "--out", "s3://labels/run1/", "--chunk-size", "32",
                            "--wait", "--json"], env, timeout=600)
    n_bad = len(bad_images())
    assert rc == 3, "some images failed: exit code 3"
    assert summary["state"] == "done_with_errors"
    assert summary["total"] == len(images) == N_GOOD + n_bad
    assert summary["succeeded"] == N_GOOD and summary["failed"] == n_bad
    job = summary["job_id"]

    # Output layout: one deterministic part per chunk + manifest written by a worker.
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="labels", Prefix=f"run1/{job}/")["Contents"]]
    chunks = -(-len(images) // 32)
    # parts + manifest + the claim check: the job's description and each chunk's stored inputs
    assert sorted(keys) == sorted([f"run1/{job}/part-{c:05d}.jsonl" for c in range(chunks)]
                                  + [f"run1/{job}/inputs/chunk-{c:05d}.jsonl.gz" for c in range(chunks)]
                                  + [f"run1/{job}/manifest.json", f"run1/{job}/job.json"])
    manifest = json.loads(s3.get_object(Bucket="labels", Key=f"run1/{job}/manifest.json")["Body"].read())
    assert manifest["total"] == len(images) and manifest["succeeded"] == N_GOOD and manifest["failed"] == n_bad
    assert manifest["parts"] == [f"part-{c:05d}.jsonl" for c in range(chunks)]
    assert manifest["state"] == "done_with_errors" and manifest["dead_chunks"] == []
    assert sum(manifest["error_codes"].values()) == n_bad and set(manifest["error_codes"]) <= {"decode_error", "empty"}
    assert manifest["weights"] == ["random"] and manifest["sources"] == ["s3://photos/2026/"]
    head = s3.get_object_acl(Bucket="labels", Key=f"run1/{job}/manifest.json")
    assert all("AllUsers" not in json.dumps(g) for g in head["Grants"]), "results must not be public"

    # Exactly one record per URI, ok ones with 5 labels, bad ones with a stable code.
    records = []
    for c in range(chunks):
        records += read_jsonl(s3.get_object(Bucket="labels", Key=f"run1/{job}/part-{c:05d}.jsonl")["Body"].read().decode())
    assert sorted(r["uri"] for r in records) == images
    for r in records:
        assert r["job_id"] == job and r["model"] == "hardnet39ds" and r["weights"] == "random"
        if "/bad/" in r["uri"]:
            assert r["status"] == "error" and r["error"]["code"] in ("decode_error", "empty"), r
        else:
            assert r["status"] == "ok" and len(r["top5"]) == 5, r
            assert r["etag"] and r["size"] > 0
            scores = [t["score"] for t in r["top5"]]
            assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001

    # `status` and `results` read the same story back.
    rc, st = cli_json(["status", job, "--json"], env)
    assert rc == 0 and st["state"] == "done_with_errors" and st["succeeded"] == N_GOOD and st["failed"] == n_bad
    assert st["rate"] and st["finished_at"]
    p = cli(["results", job], env)
    assert p.returncode == 0, p.stderr
    assert sorted(r["uri"] for r in read_jsonl(p.stdout)) == images
    p = cli(["results", job, "--failed-only"], env)
    assert sorted(r["uri"] for r in read_jsonl(p.stdout)) == sorted(u for u in images if "/bad/" in u)
    p = cli(["status", "--json"], env)
    assert job in [j["job_id"] for j in json.loads(p.stdout)]


def test_local_dir_to_file_destination_and_from_file(cluster, redis_url, tmp_path):
    env = cluster["env"]
    src = Path(cluster["roots"]) / "set-a"
    (src / "sub dir").mkdir(parents=True, exist_ok=True)
    for i in range(40):
        (src / ("sub dir" if i % 2 else ".") / f"ph%oto {i}.jpg").write_bytes(image_bytes(i))
    (src / "readme.txt").write_text("skip me")
    out = tmp_path / "out"
    # --from-file with one missing file and one unsupported scheme on top of the directory.
    listing = tmp_path / "uris.txt"
    listing.write_text(f"# extra inputs\n{src}/missing.jpg\nftp://example.invalid/x.jpg\n\n")
    rc, summary = cli_json(["submit", str(src), "--from-file", str(listing), "--out", f"file://{out}/",
                            "--chunk-size", "16", "--wait", "--json"], env, timeout=300)
    assert rc == 3 and summary["total"] == 42 and summary["succeeded"] == 40 and summary["failed"] == 2
    job = summary["job_id"]
    manifest = json.loads((out / job / "manifest.json").read_text())
    assert manifest["total"] == 42 and len(manifest["parts"]) == 3
    recs = [r for part in manifest["parts"] for r in read_jsonl((out / job / part).read_text())]
    assert len(recs) == 42 and len({r["uri"] for r in recs}) == 42
    codes = {r["uri"].rsplit("/", 1)[-1]: r["error"]["code"] for r in recs if r["status"] == "error"}
    assert codes == {"missing.jpg": "not_found", "x.jpg": "unsupported_scheme"}


def test_redis_destination(cluster, redis_url, samples_dir, tmp_path):
    import shutil

    env = cluster["env"]
    src = Path(cluster["roots"]) / "samples"
    shutil.copytree(samples_dir, src, dirs_exist_ok=True)
    # the workers were started with hardnet39ds: a job asking for another variant still gets it
    rc, summary = cli_json(["submit", str(src), "--model", "hardnet68ds", "--wait", "--json"], env, timeout=300)
    assert rc == 0, summary
    assert summary["total"] == 6 and summary["succeeded"] == 6
    p = cli(["results", summary["job_id"], "-o", str(tmp_path / "r.jsonl")], env)
    assert p.returncode == 0, p.stderr
    recs = read_jsonl((tmp_path / "r.jsonl").read_text())
    assert sorted(Path(r["uri"]).name for r in recs) == sorted(p.name for p in samples_dir.glob("*.*g"))
    assert {r["model"] for r in recs} == {"hardnet68ds"}


def test_cancel_drops_chunks_not_started(cluster, redis_server, tmp_path):
    """Submit to a queue nobody consumes, cancel, then start a worker on it: every chunk is dropped."""
    env = dict(cluster["env"], HARDNET_QUEUE="hardnet-cancel-test")
    src = Path(cluster["roots"]) / "set-c"
    src.mkdir(exist_ok=True)
    for i in range(20):
        (src / f"{i}.png").write_bytes(image_bytes(i, "PNG"))
    rc, sub = cli_json(["submit", str(src), "--chunk-size", "5", "--json"], env)
    assert rc == 0 and sub["chunks"] == 4
    job = sub["job_id"]
    assert cli(["cancel", job], env).returncode == 0
    w = Worker(env, "canceller", cluster["logdir"])
    try:
        w.wait_log(f"chunk {job}/3 dropped: job cancelled", timeout=120)
    finally:
        w.stop()
    rc, st = cli_json(["status", job, "--json"], env)
    assert st["state"] == "cancelled" and st["succeeded"] == 0 and st["chunks_done"] == 0
    p = cli(["results", job], env)
    assert p.stdout == ""


def test_status_of_unknown_job_is_an_error(cluster, redis_url):
    p = cli(["status", "no-such-job"], cluster["env"])
    assert p.returncode == 4 and "unknown job" in p.stderr


def test_bare_celery_worker_command_works(cluster, redis_url, tmp_path):
    """`celery -A worker.app worker` (what `hardnet worker` wraps) serves the queue on its own."""
    import sys

    env = dict(cluster["env"], HARDNET_QUEUE="hardnet-bare")
    src = Path(cluster["roots"]) / "set-bare"
    src.mkdir(exist_ok=True)
    for i in range(5):
        (src / f"{i}.jpg").write_bytes(image_bytes(i))
    w = Worker(env, "bare", cluster["logdir"], cmd=[
        sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--pool=solo", "--concurrency=1",
        "-Q", "hardnet-bare", "--hostname", "bare@%h", "--loglevel=INFO"])
    try:
        w.wait_ready()
        rc, summary = cli_json(["submit", str(src), "--wait", "--json"], env, timeout=180)
    finally:
        w.stop()
    assert rc == 0 and summary["succeeded"] == 5
