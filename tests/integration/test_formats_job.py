"""Every photo format through the queue (issue 21, item 5): a real worker process, real Redis and
moto's S3 server. A prefix of HEIC (made with pillow-heif), JPEG 2000, TGA, AVIF and JPEG keys in
mixed case, a content-addressed key without an extension and a text file: by default the images
are labelled ok and the job's manifest and `hardnet status --json` count the two keys the listing
skipped (`skipped_by_extension`, per extension); with `--extensions any` every key is taken, the
extension-less JPEG is labelled ok and the text file gets a decode_error record."""
from __future__ import annotations

import json

import pytest

from cluster import Worker, base_env, cli, cli_json, image_bytes, read_jsonl
from image_samples import MAKERS, heic_bytes

pytestmark = pytest.mark.slow

OBJECTS = {
    "pics/a.jpg": lambda: image_bytes(1),
    "pics/IMG_0001.HEIC": heic_bytes,
    "pics/scan.JP2": MAKERS["JPEG2000"],
    "pics/old.tga": MAKERS["TGA"],
    "pics/new.avif": MAKERS["AVIF"],
    "pics/sha/0a1b2c3d": lambda: image_bytes(2),       # a JPEG under a key without an extension
    "pics/notes.txt": lambda: b"not an image",
}
IMAGES = ["pics/IMG_0001.HEIC", "pics/a.jpg", "pics/new.avif", "pics/old.tga", "pics/scan.JP2"]


@pytest.fixture(scope="module")
def worker(redis_server, moto_server, tmp_path_factory):
    from servers import s3_env

    env = base_env(redis_server.url, HARDNET_STATE_DIR=str(tmp_path_factory.mktemp("state")),
                   **s3_env(moto_server.url))
    w = Worker(env, "fmt", tmp_path_factory.mktemp("logs"))
    try:
        w.wait_ready()
        yield env
    finally:
        w.stop()


def _manifest(s3, prefix: str, job: str) -> dict:
    return json.loads(s3.get_object(Bucket="labels", Key=f"{prefix}/{job}/manifest.json")["Body"].read())


def test_every_format_labelled_and_skipped_keys_counted(worker, s3, redis_url):
    env = worker
    s3.create_bucket(Bucket="photos")
    s3.create_bucket(Bucket="labels")
    for k, make in OBJECTS.items():
        s3.put_object(Bucket="photos", Key=k, Body=make())

    rc, summary = cli_json(["submit", "s3://photos/pics/", "--out", "s3://labels/run/", "--wait", "--json"],
                           env, timeout=600)
    assert rc == 0, summary
    job = summary["job_id"]
    assert summary["state"] == "done" and summary["total"] == len(IMAGES) and summary["succeeded"] == len(IMAGES)
    m = _manifest(s3, "run", job)
    assert m["total"] == len(IMAGES) and m["succeeded"] == len(IMAGES)
    assert m["skipped_by_extension"] == 2 and m["skipped_extensions"] == {"(none)": 1, ".txt": 1}
    rc, st = cli_json(["status", job, "--json"], env)
    assert st["skipped_by_extension"] == 2 and st["skipped_extensions"] == {"(none)": 1, ".txt": 1}
    p = cli(["results", job], env)
    recs = {r["uri"]: r for r in read_jsonl(p.stdout)}
    assert sorted(recs) == [f"s3://photos/{k}" for k in IMAGES]
    assert all(r["status"] == "ok" and len(r["top5"]) == 5 for r in recs.values()), recs

    rc, summary = cli_json(["submit", "s3://photos/pics/", "--out", "s3://labels/any/", "--extensions", "any",
                            "--wait", "--json"], env, timeout=600)
    assert rc == 3, summary                           # the text file: done_with_errors
    job = summary["job_id"]
    m = _manifest(s3, "any", job)
    assert m["total"] == len(OBJECTS) and m["succeeded"] == len(OBJECTS) - 1 and m["failed"] == 1
    assert m["skipped_by_extension"] == 0 and m["skipped_extensions"] == {}
    recs = {r["uri"]: r for r in read_jsonl(cli(["results", job], env).stdout)}
    assert recs["s3://photos/pics/sha/0a1b2c3d"]["status"] == "ok"
    assert recs["s3://photos/pics/notes.txt"]["error"]["code"] == "decode_error"
