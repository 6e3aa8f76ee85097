"""Issue 19 items 6 and 7 at the module level, with real parts (moto's S3 server behind a counting
proxy, a real redis-server, real files): a record's URI stays the object's exact name (only http(s)
credentials are redacted), HARDNET_SOURCE_BUCKETS is enforced before any request, a tag outside it
is refused with a reason, stored inputs with credentials go at the job's end, and the report's
thumbnails are fetched under a worker's confinement."""
from __future__ import annotations

import pytest

from cluster import image_bytes
from faultproxy import FaultProxy
from hnq import logs
from hnq.errors import ErrorCode, ImageError
from hnq.schema import ResultRecord
from hnq.storage import FetchPolicy, fetch, open_destination, reset_s3_client

# ----------------------------------------------------------------------------- redaction


@pytest.mark.parametrize("uri", [
    "s3://b/x&token=5/a.jpg", "s3://b/p/y?sig=abc&X-Amz-Signature=zz.jpg", "s3://b/u:pw@host/k.jpg",
    "/data/x&token=1.jpg", "file:///data/a?token=2&sig=3.jpg", "rel/dir/k=v&secret=1.png",
])
def test_s3_keys_and_paths_are_never_redacted_in_records(uri):
    assert logs.redact_uri(uri) == uri
    assert ResultRecord.failure(uri, ErrorCode.not_found, "x", "hardnet68").uri == uri
    assert ResultRecord(uri=uri, status="ok", model="hardnet68").uri == uri
    assert not logs.has_credentials(uri)


@pytest.mark.parametrize("uri, want", [
    ("https://h/a.jpg?X-Amz-Credential=AKIA1&X-Amz-Date=1&X-Amz-Signature=f00",
     "https://h/a.jpg?X-Amz-Credential=***&X-Amz-Date=1&X-Amz-Signature=***"),
    ("http://alice:pa55@h:81/a.jpg", "http://alice:***@h:81/a.jpg"),
    ("HTTPS://U:PW@H/p?SIG=1&w=2", "HTTPS://U:***@H/p?SIG=***&w=2"),
    ("https://h/c/a.png?sv=2022&sig=AzureSecret%3D&se=2027", "https://h/c/a.png?sv=2022&sig=***&se=2027"),
    # a path segment that looks like a parameter is part of the name: only the query is searched
    ("https://h/x&token=5/a.jpg?token=abc", "https://h/x&token=5/a.jpg?token=***"),
    ("https://h/a.jpg#access_token=t0k", "https://h/a.jpg#access_token=***"),
    ("https://h/p.jpg?w=200&key=photos/1", "https://h/p.jpg?w=200&key=photos/1"),
    ("https://user@h/a.jpg", "https://user@h/a.jpg"),            # a user alone names no secret
    ("ftp://bob:pw@h/a.jpg", "ftp://bob:***@h/a.jpg"),             # other schemes: as in logs
])
def test_http_credentials_are_redacted_in_records(uri, want):
    assert logs.redact_uri(uri) == want
    assert ResultRecord(uri=uri, status="ok", model="hardnet68").uri == want
    assert logs.has_credentials(uri) == (want != uri)


def test_log_lines_and_messages_are_still_redacted_as_text():
    # a log line is text: everything that looks like a credential goes, S3 keys included
    assert logs.redact("fetching s3://b/x&token=5/a.jpg") == "fetching s3://b/x&token=***"
    r = ResultRecord.failure("s3://b/x&token=5/a.jpg", ErrorCode.not_found,
                             "GET http://u:pw@h/a?sig=1 failed", "hardnet68")
    assert r.uri == "s3://b/x&token=5/a.jpg"
    assert r.error.message == "GET http://u:***@h/a?sig=*** failed"


# ----------------------------------------------------------------------------- source buckets
@pytest.fixture
def counted_s3(s3, moto_server, monkeypatch):
    """moto behind a proxy that counts every request; boto3 and obstore pointed at the proxy."""
    s3.create_bucket(Bucket="src")
    s3.create_bucket(Bucket="other")
    s3.put_object(Bucket="src", Key="a&token=1.jpg", Body=image_bytes(1))
    s3.put_object(Bucket="other", Key="b.jpg", Body=image_bytes(2))
    with FaultProxy(moto_server.url) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        reset_s3_client()
        yield s3, proxy
    reset_s3_client()


@pytest.mark.parametrize("client", ["boto3", "obstore"])
def test_a_bucket_outside_the_source_buckets_is_forbidden_before_any_request(counted_s3, client):
    if client == "obstore":
        pytest.importorskip("obstore")
    _, proxy = counted_s3
    policy = FetchPolicy(source_buckets=("src",), s3_client=client)
    proxy.reset_stats()
    with pytest.raises(ImageError) as e:
        fetch("s3://other/b.jpg", policy)
    assert e.value.code == ErrorCode.forbidden and "HARDNET_SOURCE_BUCKETS" in str(e.value)
    assert proxy.requests == 0
    with pytest.raises(ImageError) as e:
        fetch("s3://src/a&token=1.jpg", FetchPolicy(source_buckets=(), s3_client=client))
    assert e.value.code == ErrorCode.forbidden and proxy.requests == 0
    got = fetch("s3://src/a&token=1.jpg", policy)          # the exact key, inside the list
    assert got.data == image_bytes(1) and proxy.requests >= 1
    assert fetch("s3://other/b.jpg", FetchPolicy(s3_client=client)).data == image_bytes(2)  # unset: any


def test_worker_settings_read_the_source_buckets(monkeypatch):
    from worker.settings import WorkerSettings

    monkeypatch.setenv("HARDNET_SOURCE_BUCKETS", "a-bucket, b-bucket")
    assert WorkerSettings().fetch_policy().source_buckets == ("a-bucket", "b-bucket")
    monkeypatch.delenv("HARDNET_SOURCE_BUCKETS")
    assert WorkerSettings().fetch_policy().source_buckets is None


def test_tags_only_in_the_source_buckets_and_a_refusal_is_a_tag_error(counted_s3):
    from hnq.schema import Label
    from hnq.storage.s3.tags import tag_records

    s3, proxy = counted_s3
    top = [Label(index=258, label="Samoyed", score=0.9)]
    recs = [ResultRecord(uri="s3://src/a&token=1.jpg", status="ok", model="hardnet68", top5=top),
            ResultRecord(uri="s3://other/b.jpg", status="ok", model="hardnet68", top5=top)]
    proxy.set_fault("slow", delay=0.0, path="/other/")      # counts what reaches bucket "other"
    out, counts = tag_records(recs, threads=2, buckets=("src",))
    assert proxy.stats()["by_mode"].get("slow", 0) == 0
    proxy.clear()
    assert counts == {"tagged": 1, "unchanged": 0, "failed": 1}
    assert out[0].tag_error is None
    tags = {t["Key"]: t["Value"] for t in s3.get_object_tagging(Bucket="src", Key="a&token=1.jpg")["TagSet"]}
    assert tags["hardnet:label"] == "Samoyed"
    assert out[1].tag_error.code == "tag_error" and out[1].tag_error.message.startswith("forbidden:")
    assert "'other'" in out[1].tag_error.message and "HARDNET_SOURCE_BUCKETS" in out[1].tag_error.message
    assert s3.get_object_tagging(Bucket="other", Key="b.jpg")["TagSet"] == []


# ----------------------------------------------------------------------------- stored inputs
def _stored(dest, job, n, uris):
    from hnq.jobs.inputs import store_chunk_uris

    for c in range(n):
        store_chunk_uris(None, dest, job, c, uris)


def test_inputs_with_credentials_go_at_the_end_except_what_redrive_needs(tmp_path, redis_url):
    from hnq.jobs.purge import marker_relpath, note_credentials, purge_inputs
    from hnq.jobs.store import JobStore

    store = JobStore(redis_url)
    dest = open_destination(str(tmp_path / "out"))
    plain = ["s3://b/x&token=5/a.jpg"]
    secret = ["https://h/a.jpg?X-Amz-Signature=f00"]
    _stored(dest, "j1", 3, plain)
    assert not note_credentials(dest.dest, "j1", plain)
    assert purge_inputs(store, "j1", dest.dest, 3, set()) == 0     # no credentials: kept
    assert len(dest.list("j1/inputs/")) == 3

    _stored(dest, "j2", 3, secret)
    assert note_credentials(dest.dest, "j2", secret) and dest.exists(marker_relpath("j2"))
    assert purge_inputs(store, "j2", dest.dest, 3, {1}) == 2       # chunk 1 dead-lettered: kept
    assert dest.list("j2/inputs/") == ["j2/inputs/CREDENTIALS", "j2/inputs/chunk-00001.jsonl.gz"]
    assert purge_inputs(store, "j2", dest.dest, 3, set()) == 1     # redriven, ended again
    assert dest.list("j2/inputs/") == []


def test_cancel_deletes_the_inputs_that_hold_credentials(tmp_path, redis_url, monkeypatch):
    """A cancelled job is never finalised: `hardnet cancel` deletes its inputs (issue 19, item 7),
    those of a job still being listed included; a job without credentials keeps them."""
    from hnq.jobs.purge import marker_relpath, note_credentials
    from hnq.jobs.store import JobStore
    from producer.cli import main

    store = JobStore(redis_url)
    dest = open_destination(str(tmp_path / "out"))
    secret = ["https://h/a.jpg?X-Amz-Signature=f00"]
    for job, sealed in (("c1", True), ("c2", False)):
        store.create(job, model="hardnet68", dest=dest.dest)
        _stored(dest, job, 3, secret)
        if sealed:
            store.seal(job, 3, 3)
        assert note_credentials(dest.dest, job, secret) and dest.exists(marker_relpath(job))
    store.create("c3", model="hardnet68", dest=dest.dest)
    _stored(dest, "c3", 2, ["s3://b/k.jpg"])
    monkeypatch.setenv("HARDNET_BROKER_URL", redis_url)
    for job in ("c1", "c2", "c3"):
        assert main(["cancel", job]) == 0
    assert dest.list("c1/inputs/") == [] and dest.list("c2/inputs/") == []
    assert len(dest.list("c3/inputs/")) == 2


def test_submit_marks_a_job_whose_uris_hold_credentials(tmp_path, redis_url, monkeypatch):
    """No worker has to load a chunk first: `submit` marks the job, so a cancel right after it
    deletes the inputs (through the real CLI entry point, in-process)."""
    from hnq.jobs.purge import marker_relpath
    from hnq.jobs.store import JobStore
    from producer.cli import main

    monkeypatch.setenv("HARDNET_BROKER_URL", redis_url)
    monkeypatch.setenv("HARDNET_CHECK_WORKERS", "0")
    monkeypatch.setenv("HARDNET_STATE_DIR", str(tmp_path / "state"))
    out = tmp_path / "out"
    listing = tmp_path / "uris.txt"
    listing.write_text("https://h.example/a.jpg?X-Amz-Signature=f00\nhttps://h.example/b.jpg\n")
    plain = tmp_path / "plain.txt"
    plain.write_text("https://h.example/c.jpg\n")
    assert main(["submit", "--from-file", str(listing), "--out", str(out)]) == 0
    assert main(["submit", "--from-file", str(plain), "--out", str(out)]) == 0
    secret_job, plain_job = JobStore(redis_url).recent()[1], JobStore(redis_url).recent()[0]
    dest = open_destination(str(out))
    assert dest.exists(marker_relpath(secret_job)) and not dest.exists(marker_relpath(plain_job))
    assert main(["cancel", secret_job]) == 0 and dest.list(f"{secret_job}/inputs/") == []


def test_inputs_on_s3_and_in_redis_are_deleted(s3, redis_url):
    from hnq.jobs.purge import note_credentials, purge_inputs
    from hnq.jobs.store import JobStore

    reset_s3_client()
    s3.create_bucket(Bucket="out")
    store = JobStore(redis_url)
    dest = open_destination("s3://out/run/")
    secret = ["http://u:pw@h/a.jpg"]
    _stored(dest, "j3", 2, secret)
    note_credentials(dest.dest, "j3", secret)
    assert purge_inputs(store, "j3", dest.dest, 2, set()) == 2
    assert s3.list_objects_v2(Bucket="out", Prefix="run/j3/").get("KeyCount") == 0
    # a job kept in Redis: the inputs of its completed chunks always go at its end
    for c in range(3):
        store.put_inputs("j4", c, b"x")
    assert purge_inputs(store, "j4", None, 3, {2}) == 2
    assert [store.get_inputs("j4", c) for c in range(3)] == [None, None, b"x"]


# ----------------------------------------------------------------------------- report thumbnails
def test_report_thumbnails_follow_the_worker_confinement(tmp_path, monkeypatch, counted_s3):
    pytest.importorskip("PIL")
    from PIL import Image

    from producer.report.thumbnails import thumbnail

    _, proxy = counted_s3
    pic = tmp_path / "in" / "a.jpg"
    pic.parent.mkdir()
    pic.write_bytes(image_bytes(3))
    for var in ("HARDNET_FILE_ROOTS", "HARDNET_SOURCE_BUCKETS", "HARDNET_ALLOW_HTTP"):
        monkeypatch.delenv(var, raising=False)
    src, why = thumbnail(str(pic), Image)                 # no HARDNET_FILE_ROOTS: no local file
    assert src is None and "HARDNET_FILE_ROOTS" in why, why
    monkeypatch.setenv("HARDNET_FILE_ROOTS", str(tmp_path / "elsewhere"))
    src, why = thumbnail(str(pic), Image)
    assert src is None and "outside the allowed file roots" in why, why
    monkeypatch.setenv("HARDNET_FILE_ROOTS", str(tmp_path / "in"))
    src, why = thumbnail(str(pic), Image)
    assert why is None and src.startswith("data:image/jpeg;base64,")
    # http is off unless HARDNET_ALLOW_HTTP, and private addresses stay refused
    src, why = thumbnail("http://127.0.0.1:9/a.jpg", Image)
    assert src is None and why
    monkeypatch.setenv("HARDNET_ALLOW_HTTP", "true")
    monkeypatch.setenv("HARDNET_HTTP_ALLOW_HOSTS", "*")
    src, why = thumbnail("http://169.254.169.254/latest/meta-data", Image)
    assert src is None and ("private" in why.lower() or "link-local" in why.lower()), why
    # S3 only from HARDNET_SOURCE_BUCKETS, refused before any request
    monkeypatch.setenv("HARDNET_SOURCE_BUCKETS", "src")
    proxy.reset_stats()
    src, why = thumbnail("s3://other/b.jpg", Image)
    assert src is None and "HARDNET_SOURCE_BUCKETS" in why and proxy.requests == 0
    src, why = thumbnail("s3://src/a&token=1.jpg", Image)
    assert why is None and src.startswith("data:image/jpeg;base64,")
