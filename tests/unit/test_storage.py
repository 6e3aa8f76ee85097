"""Storage layer against a real moto S3 server and the local file system."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from hnq.errors import ConfigError, ErrorCode, ImageError, TransientError
from hnq.storage import (Destination, FetchPolicy, FileDestination, S3Destination, check_writable,
                         fetch, open_destination, reset_s3_client, s3_client,
                         validate_destination)
from hnq.storage.base import read_capped
from hnq.uris import path_to_file_uri

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KEYS = ["plain.jpg", "dir/with space.jpg", "100% sure.png", "a+b=c.jpg", "ünï cødé/猫.png",
        "q?x=1#frag.jpg", "semi;colon&amp.jpg", "tilde~star*.jpg"]


@pytest.fixture
def bucket(s3):
    s3.create_bucket(Bucket="imgs")
    return "imgs"


def _code(excinfo) -> ErrorCode:
    return excinfo.value.code


# ---------------------------------------------------------------- s3 fetch (both GET clients)

def test_s3_fetch_awkward_keys(s3, bucket, s3_get):
    for i, k in enumerate(KEYS):
        s3.put_object(Bucket=bucket, Key=k, Body=f"img{i}".encode() * (i + 1))
    for i, k in enumerate(KEYS):
        f = fetch(f"s3://{bucket}/{k}", s3_get.policy())
        assert f.data == f"img{i}".encode() * (i + 1), k
        assert f.size == len(f.data)
        head = s3.head_object(Bucket=bucket, Key=k)
        assert f.etag == head["ETag"].strip('"') and '"' not in f.etag
        assert f.size == head["ContentLength"]


def test_s3_percent_is_not_decoded(s3, bucket, s3_get):
    s3.put_object(Bucket=bucket, Key="a%20b.jpg", Body=b"literal")
    s3.put_object(Bucket=bucket, Key="a b.jpg", Body=b"space")
    s3.put_object(Bucket=bucket, Key="a+b.jpg", Body=b"plus")
    s3.put_object(Bucket=bucket, Key="a%2Bb.jpg", Body=b"encoded plus")
    assert fetch(f"s3://{bucket}/a%20b.jpg", s3_get.policy()).data == b"literal"
    assert fetch(f"s3://{bucket}/a b.jpg", s3_get.policy()).data == b"space"
    assert fetch(f"s3://{bucket}/a+b.jpg", s3_get.policy()).data == b"plus"
    assert fetch(f"s3://{bucket}/a%2Bb.jpg", s3_get.policy()).data == b"encoded plus"


def test_s3_not_found(s3, bucket, s3_get):
    with pytest.raises(ImageError) as ei:
        fetch(f"s3://{bucket}/missing.jpg", s3_get.policy())
    assert _code(ei) == ErrorCode.not_found
    assert "no such object" in str(ei.value)
    with pytest.raises(ImageError) as ei:
        fetch("s3://no-such-bucket/x.jpg", s3_get.policy())
    assert _code(ei) == ErrorCode.not_found
    assert "bucket does not exist" in str(ei.value)


def test_s3_empty_object_returned(s3, bucket, s3_get):
    s3.put_object(Bucket=bucket, Key="empty.jpg", Body=b"")
    f = fetch(f"s3://{bucket}/empty.jpg", s3_get.policy())
    assert f.data == b"" and f.size == 0
    assert f.etag == "d41d8cd98f00b204e9800998ecf8427e"  # MD5 of nothing


def test_s3_too_large(s3, bucket, s3_get):
    s3.put_object(Bucket=bucket, Key="big.jpg", Body=b"x" * 5000)
    with pytest.raises(ImageError) as ei:
        fetch(f"s3://{bucket}/big.jpg", s3_get.policy(max_bytes=4999))
    assert _code(ei) == ErrorCode.too_large
    assert "5000 bytes" in str(ei.value)  # refused on the announced size
    assert fetch(f"s3://{bucket}/big.jpg", s3_get.policy(max_bytes=5000)).size == 5000


def test_s3_no_credentials_is_transient(s3, bucket, s3_get, monkeypatch, request):
    s3.put_object(Bucket=bucket, Key="k.jpg", Body=b"k")
    request.addfinalizer(reset_s3_client)  # don't leave a credential-less session behind
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    reset_s3_client()  # a new session, client and store: no credentials anywhere
    with pytest.raises(TransientError) as ei:
        fetch(f"s3://{bucket}/k.jpg", s3_get.policy())
    assert _code(ei) == ErrorCode.fetch_error
    assert "credentials" in str(ei.value)


def test_s3_too_large_while_streaming(s3, bucket, monkeypatch):
    """A store that under-reports the size is still capped while reading (boto3's body)."""
    s3.put_object(Bucket=bucket, Key="big.jpg", Body=b"x" * 5000)
    client = s3_client()
    real = client.get_object

    def lying_get_object(**kw):
        resp = real(**kw)
        resp["ContentLength"] = 10
        return resp

    monkeypatch.setattr(client, "get_object", lying_get_object)
    with pytest.raises(ImageError) as ei:
        fetch(f"s3://{bucket}/big.jpg", FetchPolicy(max_bytes=100, s3_client="boto3"))
    assert _code(ei) == ErrorCode.too_large
    assert "more than 100 bytes" in str(ei.value)  # caught while streaming, not on the size


@pytest.mark.parametrize("uri", ["s3://", "s3:///x.jpg", "s3://imgs", "s3://imgs/", "s3://B@d/k.jpg",
                                 "", "s3://imgs/a\x00.jpg", "/tmp/a\x00.jpg"])
def test_invalid_uris(uri):
    with pytest.raises(ImageError) as ei:
        fetch(uri, FetchPolicy())
    assert _code(ei) == ErrorCode.invalid_uri


@pytest.mark.parametrize("uri", ["ftp://h/a.jpg", "gs://b/a.jpg", "data:,x", "https://h/a.jpg"])
def test_unsupported_schemes(uri):
    with pytest.raises(ImageError) as ei:
        fetch(uri, FetchPolicy())
    if uri.startswith("data:"):  # no "://": a (missing) relative local path
        assert _code(ei) == ErrorCode.not_found
        return
    assert _code(ei) == ErrorCode.unsupported_scheme
    assert "HARDNET_ALLOW_HTTP" in str(ei.value)


def test_s3_client_config_and_cache(s3, monkeypatch):
    c = s3_client()
    assert c is s3_client()
    assert c.meta.endpoint_url == os.environ["AWS_ENDPOINT_URL"]  # boto3 reads it itself
    assert c.meta.config.retries == {"mode": "standard", "total_max_attempts": 8}
    assert c.meta.config.max_pool_connections == 64
    monkeypatch.setenv("HARDNET_S3_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("HARDNET_S3_RETRY_MODE", "adaptive")
    c2 = s3_client()
    assert c2 is not c
    assert c2.meta.config.retries == {"mode": "adaptive", "total_max_attempts": 3}


def test_s3_client_recreated_after_fork(s3, monkeypatch):
    c = s3_client()
    real_pid = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: real_pid + 100000)
    c2 = s3_client()
    assert c2 is not c
    assert s3_client() is c2


def test_s3_client_real_fork(s3, bucket):
    s3.put_object(Bucket=bucket, Key="f.jpg", Body=b"forked")
    parent = s3_client()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must build its own client and work
        try:
            ok = s3_client() is not parent and fetch(f"s3://{bucket}/f.jpg").data == b"forked"
            os.write(w, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.waitpid(pid, 0)
    os.close(r)


def test_s3_client_thread_safe_sharing(s3, bucket):
    for i in range(16):
        s3.put_object(Bucket=bucket, Key=f"t{i}.jpg", Body=bytes([i]) * 10)
    reset_s3_client()
    results, clients = {}, set()

    def work(i):
        clients.add(id(s3_client()))
        results[i] = fetch(f"s3://{bucket}/t{i}.jpg").data

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(clients) == 1
    assert all(results[i] == bytes([i]) * 10 for i in range(16))


# ---------------------------------------------------------------- local files

def test_file_fetch_plain_and_uri(tmp_path):
    for name in ["a.jpg", "with space.jpg", "100%.jpg", "h#sh?.jpg", "ü 猫.png"]:
        p = tmp_path / name
        p.write_bytes(name.encode())
        assert fetch(str(p)).data == name.encode()
        assert fetch(path_to_file_uri(p), FetchPolicy(file_roots=(str(tmp_path),))).data == name.encode()
    assert fetch("file://" + str(tmp_path / "a.jpg")).data == b"a.jpg"


def test_file_errors(tmp_path):
    with pytest.raises(ImageError) as ei:
        fetch(str(tmp_path / "missing.jpg"))
    assert _code(ei) == ErrorCode.not_found
    with pytest.raises(ImageError) as ei:
        fetch(str(tmp_path))
    assert _code(ei) == ErrorCode.not_found
    (tmp_path / "big.jpg").write_bytes(b"x" * 101)
    with pytest.raises(ImageError) as ei:
        fetch(str(tmp_path / "big.jpg"), FetchPolicy(max_bytes=100))
    assert _code(ei) == ErrorCode.too_large
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert fetch(str(tmp_path / "empty.jpg")).data == b""


def test_file_fifo_does_not_hang(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(ImageError) as ei:
        fetch(str(fifo))
    assert _code(ei) == ErrorCode.not_found


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads everything")
def test_file_access_denied(tmp_path):
    p = tmp_path / "secret.jpg"
    p.write_bytes(b"x")
    p.chmod(0)
    with pytest.raises(ImageError) as ei:
        fetch(str(p))
    assert _code(ei) == ErrorCode.access_denied


def test_file_roots(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(b"secret")
    (root / "sub" / "ok.jpg").write_bytes(b"ok")
    (root / "link-out.jpg").symlink_to(outside)
    (root / "link-in.jpg").symlink_to(root / "sub" / "ok.jpg")
    (root / "dirlink").symlink_to(tmp_path)
    pol = FetchPolicy(file_roots=(str(root),))

    assert fetch(str(root / "sub" / "ok.jpg"), pol).data == b"ok"
    assert fetch(str(root / "link-in.jpg"), pol).data == b"ok"
    for bad in [str(root / ".." / "outside.jpg"), str(root / "sub" / ".." / ".." / "outside.jpg"),
                path_to_file_uri(str(root)) + "/../outside.jpg",
                "file://" + str(root) + "/%2e%2e/outside.jpg",
                str(root / "link-out.jpg"), str(root / "dirlink" / "outside.jpg"), str(outside),
                "/etc/passwd"]:
        with pytest.raises(ImageError) as ei:
            fetch(bad, pol)
        assert _code(ei) == ErrorCode.forbidden, bad
    # a sibling directory sharing the root's name as a prefix is outside too
    (tmp_path / "root2").mkdir()
    (tmp_path / "root2" / "x.jpg").write_bytes(b"x")
    with pytest.raises(ImageError) as ei:
        fetch(str(tmp_path / "root2" / "x.jpg"), pol)
    assert _code(ei) == ErrorCode.forbidden
    with pytest.raises(ImageError) as ei:
        fetch(str(root / "sub" / "missing.jpg"), pol)
    assert _code(ei) == ErrorCode.not_found
    with pytest.raises(ImageError) as ei:
        fetch(str(root / "sub" / "ok.jpg"), FetchPolicy(file_roots=()))
    assert _code(ei) == ErrorCode.forbidden
    # no roots given: anywhere (the local classify CLI)
    assert fetch(str(root / "link-out.jpg"), FetchPolicy()).data == b"secret"


def test_file_roots_relative_root(tmp_path, monkeypatch):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "a.jpg").write_bytes(b"a")
    monkeypatch.chdir(tmp_path)
    pol = FetchPolicy(file_roots=("r",))
    assert fetch("r/a.jpg", pol).data == b"a"
    with pytest.raises(ImageError) as ei:
        fetch("r/../r/../a.jpg", pol)
    assert _code(ei) == ErrorCode.forbidden


def test_read_capped_reads_at_most_max_plus_one():
    asked = []

    def reader(n):
        asked.append(n)
        return b"x" * n

    with pytest.raises(ImageError) as ei:
        read_capped(reader, 10, "u", block=4)
    assert _code(ei) == ErrorCode.too_large
    assert sum(asked) == 11


# ---------------------------------------------------------------- destinations

def _exercise_destination(d: Destination):
    assert d.part_path("job1", 7) == "job1/part-00007.jsonl"
    assert d.manifest_path("job1") == "job1/manifest.json"
    assert d.get("job1/part-00000.jsonl") is None
    assert not d.exists("job1/part-00000.jsonl")
    assert d.list("job1/") == []
    d.put(d.part_path("job1", 1), b'{"a":1}\n', content_type="application/x-ndjson")
    d.put(d.part_path("job1", 0), b'{"a":0}\n')
    d.put(d.part_path("job1", 0), b'{"a":"replaced"}\n')
    d.put(d.manifest_path("job1"), json.dumps({"k": 1}).encode())
    d.put("job2/part-00000.jsonl", b"")
    assert d.get("job1/part-00000.jsonl") == b'{"a":"replaced"}\n'
    assert d.exists("job1/manifest.json")
    assert d.list("job1/") == ["job1/manifest.json", "job1/part-00000.jsonl",
                               "job1/part-00001.jsonl"]
    assert d.list("job1/part-") == ["job1/part-00000.jsonl", "job1/part-00001.jsonl"]
    assert d.list("") == d.list() == ["job1/manifest.json", "job1/part-00000.jsonl",
                                      "job1/part-00001.jsonl", "job2/part-00000.jsonl"]
    assert d.get("job2/part-00000.jsonl") == b""
    for bad in ["../x", "/abs", "a/../../x", "a\x00b"]:
        with pytest.raises(ValueError):
            d.put(bad, b"x")


def test_s3_destination(s3, bucket):
    d = open_destination(f"s3://{bucket}/results/run1")
    assert isinstance(d, S3Destination)
    assert d.dest == f"s3://{bucket}/results/run1/"
    _exercise_destination(d)
    assert d.uri("job1/manifest.json") == f"s3://{bucket}/results/run1/job1/manifest.json"
    obj = s3.get_object(Bucket=bucket, Key="results/run1/job1/part-00001.jsonl")
    assert obj["ContentType"] == "application/x-ndjson"
    acl = s3.get_object_acl(Bucket=bucket, Key="results/run1/job1/part-00001.jsonl")
    assert all(g["Grantee"].get("URI", "").endswith("AllUsers") is False for g in acl["Grants"])
    # at the bucket root too
    root = open_destination(f"s3://{bucket}")
    root.put("x/y.json", b"{}")
    assert root.get("x/y.json") == b"{}"
    assert root.uri("x/y.json") == f"s3://{bucket}/x/y.json"


def test_s3_destination_missing_bucket(s3):
    d = open_destination("s3://no-such-bucket/p/")
    with pytest.raises(ConfigError):
        d.put("a.json", b"{}")
    with pytest.raises(ConfigError):
        check_writable("s3://no-such-bucket/p/")


def test_check_writable(s3, bucket, tmp_path):
    check_writable(f"s3://{bucket}/out/")
    target = tmp_path / "new" / "dir"
    check_writable(str(target))
    assert target.is_dir() and list(target.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError):
        check_writable(str(tmp_path / "file"))


def test_file_destination(tmp_path):
    d = open_destination(str(tmp_path / "out dir"))
    assert isinstance(d, FileDestination)
    _exercise_destination(d)
    assert d.uri("job1/manifest.json") == path_to_file_uri(tmp_path / "out dir" / "job1" / "manifest.json")
    assert not [p for p in (tmp_path / "out dir").rglob(".tmp-*")]
    d2 = open_destination(path_to_file_uri(tmp_path / "out dir"))
    assert d2.get("job1/part-00001.jsonl") == b'{"a":1}\n'


def test_file_destination_atomic_replace(tmp_path, monkeypatch):
    d = open_destination(str(tmp_path))
    d.put("j/a.json", b"old")
    import hnq.storage.file as fmod

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fmod.os, "replace", boom)
    with pytest.raises(TransientError):
        d.put("j/a.json", b"new")
    monkeypatch.undo()
    assert d.get("j/a.json") == b"old"
    assert sorted(os.listdir(tmp_path / "j")) == ["a.json"]  # temp file cleaned up


@pytest.mark.parametrize("dest,norm", [
    ("s3://bkt", "s3://bkt/"), ("s3://bkt/", "s3://bkt/"), ("s3://bkt/a/b", "s3://bkt/a/b/"),
    ("s3://bkt/a/b/", "s3://bkt/a/b/"), ("/tmp/x y", "file:///tmp/x%20y/"),
    ("file:///tmp/x%20y/", "file:///tmp/x%20y/"),
])
def test_validate_destination(dest, norm):
    assert validate_destination(dest) == norm


@pytest.mark.parametrize("dest", ["", "s3://", "s3:///p/", "gs://b/p", "http://h/p", "ftp://x/",
                                  "s3://bkt//p", "file://remote/x"])
def test_validate_destination_bad(dest):
    with pytest.raises(ConfigError):
        validate_destination(dest)


def test_validate_destination_relative(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert validate_destination("out") == path_to_file_uri(tmp_path / "out") + "/"


# ---------------------------------------------------------------- torch-free

def test_imports_do_not_pull_torch():
    code = ("import hnq.storage, hnq.uris, hnq.storage.http, producer.sources, sys; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr


def test_policy_defaults():
    p = FetchPolicy()
    assert (p.max_bytes, p.timeout_s, p.allow_http, p.http_allow_hosts,
            p.allow_private_networks, p.file_roots) == (50 * 2**20, 30.0, False, (), False, None)
