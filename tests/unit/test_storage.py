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
    assert c.meta.config.max_pool_connections == 256
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
    code = ("import hnq.storage, hnq.uris, hnq.storage.http, hnq.sources, sys; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr


def test_policy_defaults():
    p = FetchPolicy()
    assert (p.max_bytes, p.timeout_s, p.allow_http, p.http_allow_hosts,
            p.allow_private_networks, p.file_roots) == (50 * 2**20, 30.0, False, (), False, None)


# ---------------------------------------------------------------- the obstore GET client

def _obs():
    pytest.importorskip("obstore")
    from hnq.storage.s3 import get_obstore as s3_obstore

    return s3_obstore


def test_get_client_choice(monkeypatch):
    from hnq.storage.s3 import get as s3mod

    _obs()
    assert s3mod.get_client_for("boto3") == "boto3"
    assert s3mod.get_client_for("auto") == "obstore"
    assert s3mod.get_client_for("obstore") == "obstore"
    with pytest.raises(ConfigError):
        s3mod.get_client_for("curl")
    monkeypatch.setattr(s3mod, "_obstore_ok", False)  # as if obstore were not installed
    assert s3mod.get_client_for("auto") == "boto3"
    with pytest.raises(ConfigError):
        s3mod.get_client_for("obstore")


def test_worker_setting_reaches_the_policy(monkeypatch):
    from hnq.errors import ConfigError
    from worker.settings import WorkerSettings

    assert WorkerSettings().fetch_policy().s3_client == "auto"
    monkeypatch.setenv("HARDNET_S3_GET_CLIENT", "boto3")
    assert WorkerSettings().fetch_policy().s3_client == "boto3"
    monkeypatch.setenv("HARDNET_S3_GET_CLIENT", "aioboto")
    with pytest.raises(ConfigError, match="HARDNET_S3_GET_CLIENT='aioboto'"):
        WorkerSettings()


def test_obstore_keys_it_cannot_spell_go_to_boto3(s3, bucket, monkeypatch):
    """obstore would strip '/' at the ends (another object!) or refuse '//', '.', '..' and
    control characters: those keys are fetched by boto3, as given."""
    so = _obs()
    from hnq.storage.s3 import get as s3mod

    odd = ["/lead.jpg", "trail.jpg/", "a//b.jpg", "d/./x.jpg", "d/../x.jpg", "tab\t.jpg",
           "bell\x07.jpg"]
    for k in odd + ["lead.jpg", "trail.jpg", "a/b.jpg", "x.jpg"]:
        s3.put_object(Bucket=bucket, Key=k, Body=k.encode())
    via = []
    real_boto, real_obs = s3mod.fetch_s3_boto3, so.fetch_obstore
    monkeypatch.setattr(s3mod, "fetch_s3_boto3", lambda *a: via.append("boto3") or real_boto(*a))
    monkeypatch.setattr(so, "fetch_obstore", lambda *a: via.append("obstore") or real_obs(*a))
    for k in odd:
        assert not so.can_address(k), k
        assert fetch(f"s3://{bucket}/{k}", FetchPolicy(s3_client="obstore")).data == k.encode(), k
    assert via == ["boto3"] * len(odd)
    via.clear()
    for k in ["lead.jpg", "a/b.jpg", "..x.jpg", "x./y.jpg", "%2F.jpg"]:
        assert so.can_address(k)
    assert fetch(f"s3://{bucket}/lead.jpg", FetchPolicy(s3_client="obstore")).data == b"lead.jpg"
    assert via == ["obstore"]


def test_obstore_store_config_and_cache(s3, monkeypatch):
    so = _obs()
    reset_s3_client()
    st = so.store_for("imgs")
    assert so.store_for("imgs") is st
    assert so.store_for("other") is not st
    cfg = st.config
    assert cfg["endpoint"] == os.environ["AWS_ENDPOINT_URL"]  # boto3's endpoint
    assert cfg["region"] == "us-east-1"
    assert cfg["virtual_hosted_style_request"] == "false"  # path style, as boto3 does here
    opts = st.client_options
    assert opts["allow_http"] == "true"  # the endpoint is http://
    assert opts["connect_timeout"] == "10s" and opts["read_timeout"] == "1m"
    assert opts["timeout"] == "10m"  # a whole request: 10x the read timeout
    assert st.retry_config["max_retries"] == 7  # HARDNET_S3_MAX_ATTEMPTS 8 = 1 + 7 retries
    assert isinstance(st.credential_provider, so.BotoCredentialProvider)
    # a change of the variables s3_client() watches rebuilds the stores
    monkeypatch.setenv("HARDNET_S3_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("HARDNET_S3_READ_TIMEOUT", "2.5")
    st2 = so.store_for("imgs")
    assert st2 is not st
    assert st2.retry_config["max_retries"] == 2
    assert st2.client_options["read_timeout"] == "2s 500ms"
    monkeypatch.setenv("HARDNET_S3_ADDRESSING_STYLE", "virtual")
    port = os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://localhost:{port}")
    st3 = so.store_for("imgs")
    assert st3.config["endpoint"] == f"http://imgs.localhost:{port}"
    assert st3.config["virtual_hosted_style_request"] == "true"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://s3.example.test")  # boto3 prefers it
    assert so.store_for("imgs").config["endpoint"] == "https://imgs.s3.example.test"
    assert so.store_for("imgs").client_options["allow_http"] == "false"


def test_obstore_default_aws_endpoint_like_boto3(s3, monkeypatch):
    so = _obs()
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    st = so.store_for("photos")
    assert st.config["endpoint"] == "https://photos.s3.eu-west-1.amazonaws.com"
    assert st.config["virtual_hosted_style_request"] == "true"
    assert st.config["region"] == "eu-west-1"
    dotted = so.store_for("my.dotted.bucket")  # boto3 uses path style for those (TLS)
    assert dotted.config["endpoint"] == "https://s3.eu-west-1.amazonaws.com"
    assert dotted.config["virtual_hosted_style_request"] == "false"


def test_obstore_credentials_from_boto3_chain(s3, bucket, monkeypatch, tmp_path, request):
    so = _obs()
    import boto3

    request.addfinalizer(reset_s3_client)
    got = so.BotoCredentialProvider(boto3.session.Session())()
    assert (got["access_key_id"], got["secret_access_key"], got["token"]) == ("testing", "testing", None)
    assert got["expires_at"].tzinfo is not None
    # a profile of the shared credentials file
    creds = tmp_path / "credentials"
    creds.write_text("[imgs]\naws_access_key_id = PROFILEKEY\naws_secret_access_key = s3cr3t\n"
                     "aws_session_token = tok\n")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_PROFILE", "imgs")
    reset_s3_client()
    prov = so.store_for("imgs").credential_provider
    got = prov()
    assert (got["access_key_id"], got["secret_access_key"], got["token"]) == ("PROFILEKEY", "s3cr3t", "tok")
    s3.put_object(Bucket="imgs", Key="p.jpg", Body=b"profile")
    assert fetch("s3://imgs/p.jpg", FetchPolicy(s3_client="obstore")).data == b"profile"
    # none at all: the provider raises what boto3 would
    import botocore.exceptions as bex

    monkeypatch.delenv("AWS_PROFILE")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    with pytest.raises(bex.NoCredentialsError):
        so.BotoCredentialProvider(boto3.session.Session())()


def test_obstore_refreshes_expiring_credentials():
    """Credentials that expire are refreshed by botocore and reach obstore at its next call."""
    so = _obs()
    from datetime import datetime, timedelta, timezone
    from types import SimpleNamespace

    from botocore.credentials import RefreshableCredentials

    n = {"refreshes": 0}

    def refresh():
        n["refreshes"] += 1
        return {"access_key": f"KEY{n['refreshes']}", "secret_key": "s", "token": f"t{n['refreshes']}",
                # inside botocore's mandatory refresh window (10 min): refreshed at every use
                "expiry_time": (datetime.now(timezone.utc) + timedelta(minutes=5)).isoformat()}

    creds = RefreshableCredentials.create_from_metadata(refresh(), refresh, "test")
    prov = so.BotoCredentialProvider(SimpleNamespace(get_credentials=lambda: creds))
    first, second = prov(), prov()
    assert first["access_key_id"] != second["access_key_id"]
    assert second["access_key_id"] == f"KEY{n['refreshes']}" and second["token"] == f"t{n['refreshes']}"
    assert second["expires_at"] - datetime.now(timezone.utc) <= so.CREDENTIALS_TTL


def test_obstore_asks_the_provider_again_after_ttl(s3, bucket, monkeypatch):
    so = _obs()
    from datetime import timedelta
    import time as _time

    s3.put_object(Bucket=bucket, Key="k.jpg", Body=b"k")
    calls = []
    real = so.BotoCredentialProvider.__call__
    monkeypatch.setattr(so.BotoCredentialProvider, "__call__",
                        lambda self: calls.append(1) or real(self))
    monkeypatch.setattr(so, "CREDENTIALS_TTL", timedelta(seconds=1))
    pol = FetchPolicy(s3_client="obstore")
    assert fetch(f"s3://{bucket}/k.jpg", pol).data == b"k"
    assert fetch(f"s3://{bucket}/k.jpg", pol).data == b"k"
    assert len(calls) == 1  # cached while valid
    _time.sleep(1.3)
    assert fetch(f"s3://{bucket}/k.jpg", pol).data == b"k"
    assert len(calls) == 2  # expired: asked again


def test_obstore_too_large_reads_no_body(s3, bucket, monkeypatch):
    """Refused on the announced size: the body stream is never opened; a size that lies is still
    caught while streaming."""
    so = _obs()
    s3.put_object(Bucket=bucket, Key="big.jpg", Body=b"x" * 5000)
    streamed = []
    real_get = so.obstore.get

    class Spy:
        def __init__(self, res, lie):
            self._res, self._lie = res, lie

        @property
        def meta(self):
            m = dict(self._res.meta)
            if self._lie:
                m["size"] = 10
            return m

        def stream(self, min_chunk_size):
            streamed.append(min_chunk_size)
            return self._res.stream(min_chunk_size=min_chunk_size)

    lie = False
    monkeypatch.setattr(so.obstore, "get", lambda store, key: Spy(real_get(store, key), lie))
    with pytest.raises(ImageError) as ei:
        fetch(f"s3://{bucket}/big.jpg", FetchPolicy(max_bytes=100, s3_client="obstore"))
    assert _code(ei) == ErrorCode.too_large and "5000 bytes" in str(ei.value)
    assert streamed == []
    lie = True
    with pytest.raises(ImageError) as ei:
        fetch(f"s3://{bucket}/big.jpg", FetchPolicy(max_bytes=100, s3_client="obstore"))
    assert _code(ei) == ErrorCode.too_large and "more than 100 bytes" in str(ei.value)
    assert streamed == [101]  # chunks of at most max_bytes + 1 asked for
    lie = False
    assert fetch(f"s3://{bucket}/big.jpg", FetchPolicy(max_bytes=5000, s3_client="obstore")).size == 5000


def _obstore_error(cls_name: str, status: int | None, code: str | None, key: str = "k.jpg",
                   extra: str = "") -> Exception:
    """An exception shaped like obstore's (its message: display, then the debug source)."""
    import obstore.exceptions as oe

    cls = FileNotFoundError if cls_name == "FileNotFoundError" else getattr(oe, cls_name)
    msg = f"Error at location {key}: Error performing GET http://h/b/{key} in 5ms"
    if status is not None:
        body = f"<Error><Code>{code}</Code></Error>" if code else ""
        msg += f" - Server returned non-2xx status code: {status} X: {body}"
    return cls(msg + extra + f'\n\nDebug source:\nGeneric {{ path: "{key}" }}')


@pytest.mark.parametrize("cls,status,code,want,transient", [
    ("FileNotFoundError", 404, "NoSuchKey", ErrorCode.not_found, False),
    ("FileNotFoundError", 404, "NoSuchBucket", ErrorCode.not_found, False),
    ("PermissionDeniedError", 403, "AccessDenied", ErrorCode.access_denied, False),
    ("PermissionDeniedError", 403, "ExpiredToken", ErrorCode.fetch_error, True),  # credentials
    ("PermissionDeniedError", 403, "SignatureDoesNotMatch", ErrorCode.fetch_error, True),
    ("GenericError", 400, "InvalidBucketName", ErrorCode.invalid_uri, False),
    ("GenericError", 503, "SlowDown", ErrorCode.throttled, True),
    ("GenericError", 429, None, ErrorCode.throttled, True),
    ("GenericError", 400, "ThrottlingException", ErrorCode.throttled, True),
    ("GenericError", 500, "InternalError", ErrorCode.fetch_error, True),
    ("GenericError", 400, "RequestTimeout", ErrorCode.timeout, True),
    ("GenericError", 418, "Teapot", ErrorCode.fetch_error, False),
])
def test_obstore_error_mapping_is_boto3s(cls, status, code, want, transient):
    """The same classification as a boto3 ClientError with that code and status."""
    so = _obs()
    import botocore.exceptions as bex

    from hnq.storage.s3.errors import map_fetch_error

    got = so.map_obstore_error(_obstore_error(cls, status, code), "s3://b/k.jpg", "k.jpg")
    boto = map_fetch_error(bex.ClientError(
        {"Error": {"Code": code or ""}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject"), "s3://b/k.jpg")
    assert isinstance(got, TransientError if transient else ImageError)
    assert type(got) is type(boto)
    assert got.code == boto.code == want


def test_obstore_error_mapping_transport_and_odd_keys():
    so = _obs()
    # a key that reads like a status must not be taken for one
    key = "status code: 404 <Code>NoSuchKey</Code>.jpg"
    e = so.map_obstore_error(_obstore_error("GenericError", 503, "SlowDown", key=key), "u", key)
    assert isinstance(e, TransientError) and e.code == ErrorCode.throttled
    timeout = _obstore_error("GenericError", None, None,
                             extra=", after 7 retries - HTTP error: error sending request "
                                   "HttpError { kind: Timeout, source: TimedOut }")
    e = so.map_obstore_error(timeout, "u", "k.jpg")
    assert isinstance(e, TransientError) and e.code == ErrorCode.timeout
    reset = _obstore_error("GenericError", None, None,
                           extra=" - HTTP error: request or response body error kind: Interrupted")
    e = so.map_obstore_error(reset, "u", "k.jpg")
    assert isinstance(e, TransientError) and e.code == ErrorCode.fetch_error
    import obstore.exceptions as oe

    unauth = oe.UnauthenticatedError("The operation lacked valid authentication credentials for "
                                     "path External AWS credential provider: RuntimeError: boom")
    e = so.map_obstore_error(unauth, "u", "k.jpg")
    assert isinstance(e, TransientError) and e.code == ErrorCode.fetch_error
    assert "credentials" in str(e)
    e = so.map_obstore_error(RuntimeError("bug"), "u", "k.jpg")
    assert isinstance(e, ImageError) and e.code == ErrorCode.internal_error


_FORK_SCRIPT = r"""
import os, select, sys
from hnq.storage import FetchPolicy, fetch
from hnq.storage.s3 import get_obstore as so
pol = FetchPolicy(s3_client="obstore")
uri = sys.argv[1]

def in_child(tag):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            ok = fetch(uri, pol).data == b"forked"
            os.write(w, f"{tag}:{int(ok)}:{int(so.usable_here())}:{int(so._runtime_pid == os.getpid())}".encode())
        finally:
            os._exit(0)
    os.close(w)
    ready, _, _ = select.select([r], [], [], 30)
    if not ready:
        os.kill(pid, 9)
        print(f"{tag}:HUNG")
    else:
        print(os.read(r, 100).decode())
    os.waitpid(pid, 0)

in_child("before")   # the parent has not used obstore: the child may
assert fetch(uri, pol).data == b"forked"
in_child("after")    # it has: the child must not (obstore's runtime is gone there)
"""


def test_obstore_fork_safety(s3, bucket):
    """A child forked before the parent used obstore uses it; one forked after gets boto3
    instead of hanging."""
    _obs()
    s3.put_object(Bucket=bucket, Key="f.jpg", Body=b"forked")
    r = subprocess.run([sys.executable, "-c", _FORK_SCRIPT, f"s3://{bucket}/f.jpg"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["before:1:1:1", "after:1:0:0"], r.stdout + r.stderr
