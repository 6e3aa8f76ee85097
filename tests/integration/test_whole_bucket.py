"""Whole-bucket labelling against the real parts (moto S3 server, redis-server, a worker process):
S3 Inventory reports (CSV and Parquet) as the source, archived and 0-byte objects recorded without
a fetch, and nightly incremental runs with --skip-labelled (new and overwritten objects labelled,
the rest skipped and pointed at)."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from cluster import Worker, base_env, cli, cli_json, image_bytes, read_jsonl
from inventories import Row, put_inventory, rows_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(redis_server, moto_server, tmp_path_factory):
    from servers import s3_env

    logdir = tmp_path_factory.mktemp("logs")
    env = base_env(redis_server.url, HARDNET_OUTPUT_ROOTS=str(tmp_path_factory.getbasetemp()),
                   HARDNET_SWEEP_INTERVAL="0", **s3_env(moto_server.url))
    w = Worker(env, "wb", logdir)
    try:
        w.wait_ready()
        yield {"env": env, "worker": w}
    finally:
        w.stop()


def _put_all(s3, bucket: str, objs: dict[str, tuple[bytes, str]]) -> None:
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda kv: s3.put_object(Bucket=bucket, Key=kv[0], Body=kv[1][0], StorageClass=kv[1][1]),
                    objs.items()))


def _s3_records(s3, bucket: str, prefix: str, manifest: dict) -> list[dict]:
    recs = []
    for p in manifest["parts"]:
        recs += read_jsonl(s3.get_object(Bucket=bucket, Key=f"{prefix}{p}")["Body"].read().decode())
    return recs


# ------------------------------------------------------------------------------ inventory reports
GOOD = [f"2026/cam {i % 3}/img+{i:03d} %.jpg" for i in range(18)] + ["2026/ünïcødé/ü.png", "2026/plain.jpeg"]


def _inventory_bucket(s3) -> tuple[list[Row], dict[str, tuple[bytes, str]]]:
    s3.create_bucket(Bucket="photos")
    s3.create_bucket(Bucket="labels")
    objs = {k: (image_bytes(i, "PNG" if k.endswith(".png") else "JPEG"), "STANDARD") for i, k in enumerate(GOOD)}
    objs["2026/instant.jpg"] = (image_bytes(100), "GLACIER_IR")            # instant retrieval: fetched
    objs["2026/cold.jpg"] = (image_bytes(101), "GLACIER")                  # a GET would fail (InvalidObjectState)
    objs["2026/deep.jpg"] = (image_bytes(102), "DEEP_ARCHIVE")
    objs["2026/tiered.jpg"] = (image_bytes(103), "INTELLIGENT_TIERING")    # the report says: archive tier
    objs["2026/zero.jpg"] = (b"", "STANDARD")
    objs["2026/notes.txt"] = (b"not an image", "STANDARD")
    _put_all(s3, "photos", objs)
    rows = rows_for(s3, "photos", sorted(objs))
    for r in rows:
        if r.key == "2026/tiered.jpg":
            r.tier = "DEEP_ARCHIVE_ACCESS"
    rows += [Row("2026/gone.jpg", None, None, delete_marker=True),                 # deleted: no record
             Row("2026/plain.jpeg", 7, "0ldversion0", is_latest=False, version="v0")]  # older version
    return rows, objs


def _check_inventory_job(records: list[dict], objs, s3, job: str) -> None:
    images = {f"s3://photos/{k}" for k in objs if not k.endswith(".txt")}
    assert sorted(r["uri"] for r in records) == sorted(images)          # one record each, nothing else
    for r in records:
        key = r["uri"][len("s3://photos/"):]
        head = s3.head_object(Bucket="photos", Key=key) if key != "2026/cold.jpg" else None
        assert r["job_id"] == job and r["model"] == "hardnet39ds"
        if key in ("2026/cold.jpg", "2026/deep.jpg", "2026/tiered.jpg"):
            sc = {"2026/cold.jpg": "GLACIER", "2026/deep.jpg": "DEEP_ARCHIVE",
                  "2026/tiered.jpg": "DEEP_ARCHIVE_ACCESS"}[key]
            assert r["status"] == "error" and r["error"]["code"] == "archived", r
            assert "not fetched" in r["error"]["message"] and sc in r["error"]["message"], r
            assert r["size"] == len(objs[key][0]) and r["etag"]
        elif key == "2026/zero.jpg":
            assert r["status"] == "error" and r["error"]["code"] == "empty" and r["size"] == 0, r
            assert "0 bytes" in r["error"]["message"]
        else:
            assert r["status"] == "ok" and len(r["top5"]) == 5 and r["weights"] == "random", r
            assert r["etag"] == head["ETag"].strip('"') and r["size"] == len(objs[key][0])


def test_csv_inventory_report_to_s3(cluster, s3, redis_url):
    env = cluster["env"]
    rows, objs = _inventory_bucket(s3)
    put_inventory(s3, source_bucket="photos", rows=rows, when="2026-11-30T00-00Z", files=1)   # an older one
    manifest_uri = put_inventory(s3, source_bucket="photos", rows=rows, files=2)
    rc, summary = cli_json(["submit", "--inventory", "s3://inv/inventories/photos/daily/", "--out",
                            "s3://labels/inv/", "--chunk-size", "8", "--wait", "--json"], env, timeout=600)
    n_ok = len(GOOD) + 1                      # + GLACIER_IR
    n_images = n_ok + 4                       # + cold, deep, tiered, zero
    assert rc == 3 and summary["state"] == "done_with_errors", summary
    assert summary["total"] == n_images and summary["succeeded"] == n_ok and summary["failed"] == 4
    assert summary["error_codes"] == {"archived": 3, "empty": 1}
    job = summary["job_id"]
    m = json.loads(s3.get_object(Bucket="labels", Key=f"inv/{job}/manifest.json")["Body"].read())
    assert m["sources"] == [f"inventory:{manifest_uri}"]       # the latest report of the folder
    assert m["error_codes"] == {"archived": 3, "empty": 1} and m["total"] == n_images and m["skipped"] == 0
    records = _s3_records(s3, "labels", f"inv/{job}/", m)
    _check_inventory_job(records, objs, s3, job)
    # the archived ones were never asked for: moto answers a GET of GLACIER with InvalidObjectState,
    # which would read "archived (InvalidObjectState ...)" in the record
    assert all("InvalidObjectState" not in json.dumps(r) for r in records)


def test_parquet_inventory_report_to_a_directory(cluster, s3, redis_url, tmp_path):
    pytest.importorskip("pyarrow")
    env = cluster["env"]
    rows, objs = _inventory_bucket(s3)
    manifest_uri = put_inventory(s3, source_bucket="photos", rows=rows, fmt="Parquet", files=2)
    out = tmp_path / "out"
    p = cli(["submit", "--inventory", manifest_uri, "--out", str(out), "--chunk-size", "8", "--wait", "--json"],
            env, timeout=600)
    assert p.returncode == 3, p.stderr[-3000:]
    assert (f"inventory {manifest_uri}: {len(rows)} rows in 2 files, {len(GOOD) + 5} images (skipped: "
            "1 not images, 1 delete markers, 1 older versions)") in p.stderr
    summary = json.loads(p.stdout.splitlines()[-1])
    job = summary["job_id"]
    m = json.loads((out / job / "manifest.json").read_text())
    assert m["error_codes"] == {"archived": 3, "empty": 1} and m["succeeded"] == len(GOOD) + 1
    records = [r for part in m["parts"] for r in read_jsonl((out / job / part).read_text())]
    _check_inventory_job(records, objs, s3, job)


def test_orc_report_is_refused_before_a_job_exists(cluster, s3, redis_url):
    uri = put_inventory(s3, source_bucket="photos", rows=[Row("a.jpg", 1, "e")], fmt="ORC")
    s3.create_bucket(Bucket="labels")
    p = cli(["submit", "--inventory", uri, "--out", "s3://labels/orc/"], cluster["env"])
    assert p.returncode == 2 and "ORC inventory reports are not supported" in p.stderr, p.stderr
    assert "Contents" not in s3.list_objects_v2(Bucket="labels", Prefix="orc/")


# ------------------------------------------------------------------------------ --skip-labelled
def test_nightly_runs_label_only_what_is_new(cluster, s3, redis_url):
    env = cluster["env"]
    s3.create_bucket(Bucket="cams")
    s3.create_bucket(Bucket="labels")
    n, m = 24, 6
    first = {f"site/{d}/cam{i % 4}/{i:04d}.jpg": (image_bytes(i), "STANDARD") for i, d in
             ((i, "2026-12-01" if i < 12 else "2026-12-02") for i in range(n))}
    first["site/cold/old.jpg"] = (image_bytes(999), "GLACIER")     # archived: listed, never fetched
    _put_all(s3, "cams", first)
    cmd = ["submit", "s3://cams/site/", "--out", "s3://labels/nightly/", "--chunk-size", "8", "--wait", "--json"]

    # night 1: a plain job (no index asked for)
    rc, s1 = cli_json(cmd, env, timeout=600)
    assert rc == 3 and s1["total"] == n + 1 and s1["succeeded"] == n and s1["error_codes"] == {"archived": 1}
    job1 = s1["job_id"]
    assert "Contents" not in s3.list_objects_v2(Bucket="labels", Prefix=f"nightly/{job1}/index/")

    # the day: M new images, one overwritten (new ETag)
    new = {f"site/2026-12-03/cam{i % 4}/{i:04d}.jpg": (image_bytes(1000 + i), "STANDARD") for i in range(m)}
    changed_key = "site/2026-12-01/cam1/0005.jpg"
    old_etag = s3.head_object(Bucket="cams", Key=changed_key)["ETag"].strip('"')
    _put_all(s3, "cams", {**new, changed_key: (image_bytes(5000), "STANDARD")})
    new_etag = s3.head_object(Bucket="cams", Key=changed_key)["ETag"].strip('"')
    assert new_etag != old_etag

    # night 2: --skip-labelled; job 1 has no index, so it is built from its parts first
    p = cli(cmd + ["--skip-labelled"], env, timeout=600)
    assert p.returncode == 3, p.stderr[-3000:]
    assert f"labelled by job {job1}" in p.stderr and "index just built from its parts" in p.stderr
    s2 = json.loads(p.stdout.splitlines()[-1])
    job2 = s2["job_id"]
    assert s2["total"] == m + 1 + 1 and s2["succeeded"] == m + 1 and s2["error_codes"] == {"archived": 1}
    assert s2["skipped"] == n - 1
    man2 = json.loads(s3.get_object(Bucket="labels", Key=f"nightly/{job2}/manifest.json")["Body"].read())
    recs2 = _s3_records(s3, "labels", f"nightly/{job2}/", man2)
    fetched = sorted(r["uri"] for r in recs2 if r["status"] == "ok")
    assert fetched == sorted([f"s3://cams/{k}" for k in new] + [f"s3://cams/{changed_key}"])   # exactly M + 1
    assert next(r for r in recs2 if r["uri"].endswith(changed_key))["etag"] == new_etag
    assert man2["skipped"] == n - 1 and man2["total"] == m + 2
    [reused] = man2["reused"]
    recs1 = _s3_records(s3, "labels", f"nightly/{job1}/",
                        json.loads(s3.get_object(Bucket="labels", Key=f"nightly/{job1}/manifest.json")["Body"].read()))
    parts_of_unchanged = sorted({f"part-{c:05d}.jsonl" for c in range(s1["chunks"])
                                 for r in read_jsonl(s3.get_object(Bucket="labels",
                                                                   Key=f"nightly/{job1}/part-{c:05d}.jsonl")["Body"].read().decode())
                                 if r["status"] == "ok" and not r["uri"].endswith(changed_key)})
    assert reused == {"job": job1, "records": n - 1, "parts": parts_of_unchanged}
    assert len(recs1) == n + 1
    meta1 = json.loads(s3.get_object(Bucket="labels", Key=f"nightly/{job1}/index/meta.json")["Body"].read())
    meta2 = json.loads(s3.get_object(Bucket="labels", Key=f"nightly/{job2}/index/meta.json")["Body"].read())
    assert meta1["count"] == n and meta2["count"] == n + m      # job 2's index is cumulative
    rc, st = cli_json(["status", job2, "--json"], env)
    assert st["skipped"] == n - 1 and st["state"] == "done_with_errors"
    assert re.search(rf"^images +.*, {n - 1} skipped \(labelled by an earlier job\)$",
                     cli(["status", job2], env).stdout, re.M)
    assert re.search(rf" {job2} +done_with_errors +\S+ +\d+ +{n - 1} ", cli(["status"], env).stdout, re.M)

    # night 3: nothing new (and the archived object is gone): no chunk at all, the job is done
    s3.delete_object(Bucket="cams", Key="site/cold/old.jpg")
    rc, s3_ = cli_json(cmd + ["--skip-labelled"], env, timeout=600)
    assert rc == 0 and s3_["state"] == "done" and s3_["total"] == 0 and s3_["skipped"] == n + m
    job3 = s3_["job_id"]
    man3 = json.loads(s3.get_object(Bucket="labels", Key=f"nightly/{job3}/manifest.json")["Body"].read())
    assert man3["parts"] == [] and man3["skipped"] == n + m
    assert {r["job"]: r["records"] for r in man3["reused"]} == {job1: n - 1, job2: m + 1}
    assert cluster["worker"].log().count(f"chunk {job3}/") == 0


def test_skip_labelled_needs_a_destination_and_a_known_job(cluster, s3, redis_url, tmp_path):
    env = cluster["env"]
    p = cli(["submit", "s3://cams/site/", "--skip-labelled"], env)
    assert p.returncode == 2 and "need --out DEST" in p.stderr, p.stderr
    p = cli(["submit", str(tmp_path), "--out", str(tmp_path / "out"), "--since", "20990101-000000-deadbeef"], env)
    assert p.returncode == 2 and "--since 20990101-000000-deadbeef: no such job" in p.stderr, p.stderr
    p = cli(["submit", "s3://cams/site/", "--list-threads", "0"], env)
    assert p.returncode == 2 and "--list-threads 0: out of range" in p.stderr, p.stderr   # checked at parse time (producer/args.py)
