"""Producer source expansion: local trees, S3 prefixes (paginated, streamed), URI lists."""
from __future__ import annotations

import io
import types
from concurrent.futures import ThreadPoolExecutor

import pytest

from hnq.errors import ConfigError
from hnq.storage import FetchPolicy, fetch, s3_client
from hnq.uris import path_to_file_uri
from hnq.sources import chunked, expand_sources, read_uri_list


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "photos"
    for rel in ["b.jpg", "a.PNG", "notes.txt", "sub/c.jpeg", "sub/deeper/d.webp", "sub/x.json",
                "z dir/e 100%#.gif", "ü/猫.bmp", ".hidden/f.tif"]:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rel.encode())
    return root


def test_local_dir_recursive_sorted(tree):
    uris = list(expand_sources([str(tree)]))
    rels = [u[len(path_to_file_uri(tree)) + 1:] for u in uris]
    assert rels == [".hidden/f.tif", "a.PNG", "b.jpg", "sub/c.jpeg", "sub/deeper/d.webp",
                    "z%20dir/e%20100%25%23.gif", "%C3%BC/%E7%8C%AB.bmp"]
    # every emitted URI fetches the file it names
    for u in uris:
        data = fetch(u, FetchPolicy(file_roots=(str(tree),))).data
        assert u.endswith(path_to_file_uri("/" + data.decode())[len("file:///"):])


def test_local_dir_not_recursive(tree):
    uris = list(expand_sources([str(tree)], recursive=False))
    assert [u.rsplit("/", 1)[1] for u in uris] == ["a.PNG", "b.jpg"]


def test_local_file_and_file_uri(tree, monkeypatch):
    monkeypatch.chdir(tree)
    assert list(expand_sources(["b.jpg"])) == [path_to_file_uri(tree / "b.jpg")]
    # an explicitly named file is emitted whatever its extension
    assert list(expand_sources(["notes.txt"])) == [path_to_file_uri(tree / "notes.txt")]
    u = path_to_file_uri(tree / "sub")
    assert [x.rsplit("/", 1)[1] for x in expand_sources([u])] == ["c.jpeg", "d.webp"]


def test_local_missing_and_roots(tree):
    with pytest.raises(ConfigError, match="does not exist"):
        list(expand_sources([str(tree / "nope")]))
    with pytest.raises(ConfigError, match="outside"):
        list(expand_sources([str(tree)], file_roots=(str(tree / "sub"),)))
    assert len(list(expand_sources([str(tree / "sub")], file_roots=(str(tree),)))) == 2


@pytest.mark.parametrize("src", ["ftp://h/x.jpg", "gs://b/k.jpg", "", "s3://", "s3:///k"])
def test_bad_sources(src):
    with pytest.raises(ConfigError):
        list(expand_sources([src]))


def test_http_passthrough():
    assert list(expand_sources(["https://img.example/a.jpg", "http://h/b"])) == [
        "https://img.example/a.jpg", "http://h/b"]


def test_is_a_generator(tree):
    it = expand_sources([str(tree), str(tree / "missing")])
    assert isinstance(it, types.GeneratorType)
    assert next(it).endswith("f.tif")  # nothing raised until the bad source is reached


# ---------------------------------------------------------------- s3

N_KEYS = 1205


def _make_bucket(s3, n: int):
    s3.create_bucket(Bucket="big")
    keys = [f"pre/fix/{i:05d}.jpg" for i in range(n)]
    _bulk_put(s3, "big", keys)
    extra = {"pre/fix/readme.txt": b"t", "pre/fix/dir/": b"", "pre/fix/sub/UPPER.JPEG": b"x",
             "pre/other.png": b"x", "prefix-sibling/a.jpg": b"x", "pre/fix/a b+c%.png": b"x"}
    for k, v in extra.items():
        s3.put_object(Bucket="big", Key=k, Body=v)
    return s3


@pytest.fixture
def big_bucket(s3):
    """1,205 image keys under pre/fix/ (more than one ListObjectsV2 page) and a few others."""
    return _make_bucket(s3, N_KEYS)


N_SMALL = 5


@pytest.fixture
def small_bucket(s3):
    """The same layout with only 5 numbered keys."""
    return _make_bucket(s3, N_SMALL)


def _bulk_put(s3, bucket: str, keys: list[str]) -> None:
    """Create many small objects fast: straight into the moto backend when the server runs in
    this process (the fixture's ThreadedMotoServer does; ~0.1 s for 1,205 keys instead of ~14 s
    over HTTP), else through the API with a thread pool."""
    try:
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
        backend.get_bucket(bucket)
    except Exception:  # noqa: BLE001 - not in-process: go through HTTP
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda k: s3.put_object(Bucket=bucket, Key=k, Body=b"x"), keys))
        return
    for k in keys:
        backend.put_object(bucket, k, b"x")


def test_s3_prefix_paginated(big_bucket):
    calls = []
    from hnq.storage.s3.listing import listing_client

    listing_client().meta.events.register("before-call.s3.ListObjectsV2", lambda **kw: calls.append(1))
    uris = list(expand_sources(["s3://big/pre/fix/"]))
    assert len(uris) == N_KEYS + 2
    assert len(calls) >= 2  # more than one page
    assert uris[:2] == ["s3://big/pre/fix/00000.jpg", "s3://big/pre/fix/00001.jpg"]
    assert "s3://big/pre/fix/a b+c%.png" in uris
    assert "s3://big/pre/fix/sub/UPPER.JPEG" in uris
    assert not any(u.endswith((".txt", "/")) for u in uris)
    assert len(set(uris)) == len(uris)
    # each URI is fetchable as given (raw key form)
    assert fetch("s3://big/pre/fix/a b+c%.png").data == b"x"


def test_s3_prefix_streams_pages(big_bucket, monkeypatch):
    import hnq.storage.s3.listing as s3mod

    monkeypatch.setattr(s3mod, "LIST_PAGE_SIZE", 500)
    calls = []
    from hnq.storage.s3.listing import listing_client

    listing_client().meta.events.register("before-call.s3.ListObjectsV2", lambda **kw: calls.append(1))
    it = expand_sources(["s3://big/pre/"])
    first = next(it)
    assert first == "s3://big/pre/fix/00000.jpg"
    assert len(calls) == 1  # one page fetched so far: streaming, not slurping
    rest = list(it)
    assert len(rest) + 1 == N_KEYS + 3
    assert len(calls) == 3


def test_s3_bucket_and_folder_forms(small_bucket):
    assert len(list(expand_sources(["s3://big"]))) == N_SMALL + 4
    assert len(list(expand_sources(["s3://big/"]))) == N_SMALL + 4
    # no trailing slash and no image extension: a folder
    assert len(list(expand_sources(["s3://big/pre/fix"]))) == N_SMALL + 2
    assert list(expand_sources(["s3://big/pre/", "s3://big/pre"], recursive=False)) == [
        "s3://big/pre/other.png"] * 2
    # a single object: emitted as given, no request needed
    assert list(expand_sources(["s3://big/pre/fix/00001.jpg", "s3://big/missing.jpg"])) == [
        "s3://big/pre/fix/00001.jpg", "s3://big/missing.jpg"]
    # an extension-less key that is no folder is emitted as given
    assert list(expand_sources(["s3://big/pre/fix/readme"])) == ["s3://big/pre/fix/readme"]


def test_s3_missing_bucket(s3):
    with pytest.raises(ConfigError, match="does not exist"):
        list(expand_sources(["s3://no-such-bucket/p/"]))


# ---------------------------------------------------------------- uri lists

def test_read_uri_list_file(tree, tmp_path, monkeypatch):
    monkeypatch.chdir(tree)
    lst = tmp_path / "list.txt"
    lst.write_text("\ufeff# a comment\n\n  s3://b/k with space.jpg  \nhttps://h/x.jpg\n"
                   "b.jpg\nsub\n/does/not/exist.jpg\ngs://b/k\n   # indented comment\n",
                   encoding="utf-8")
    out = list(read_uri_list(str(lst)))
    assert out == ["s3://b/k with space.jpg", "https://h/x.jpg", path_to_file_uri(tree / "b.jpg"),
                   path_to_file_uri(tree / "sub" / "c.jpeg"),
                   path_to_file_uri(tree / "sub" / "deeper" / "d.webp"),
                   "file:///does/not/exist.jpg", "gs://b/k"]


def test_read_uri_list_stdin(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("s3://b/1.jpg\n\n#x\ns3://b/2.jpg"))
    assert list(read_uri_list("-")) == ["s3://b/1.jpg", "s3://b/2.jpg"]


def test_read_uri_list_expands_s3_prefix(small_bucket, tmp_path):
    lst = tmp_path / "l.txt"
    lst.write_text("s3://big/pre/\ns3://big/pre/fix/00007.jpg\n")
    out = list(read_uri_list(str(lst), recursive=False))
    assert out == ["s3://big/pre/other.png", "s3://big/pre/fix/00007.jpg"]


def test_read_uri_list_passes_malformed_lines_on(tmp_path):
    """A malformed line becomes the worker's invalid_uri record; it must not abort the whole list."""
    lst = tmp_path / "l.txt"
    bad = ["s3://", "s3:///", "s3://Bad_Bucket!/", "file://otherhost/x.jpg", "file:relative.jpg",
           "file:///tmp/%00x.jpg", "bad\x00name.jpg"]
    lst.write_text("s3://b/first.jpg\n" + "\n".join(bad) + "\ns3://b/last.jpg\n")
    assert list(read_uri_list(str(lst))) == ["s3://b/first.jpg", *bad, "s3://b/last.jpg"]
    with pytest.raises(ConfigError):  # as a command-line source it is still refused up front
        list(expand_sources(["s3://"]))


def test_read_uri_list_streams(tmp_path):
    lst = tmp_path / "l.txt"
    lst.write_text("".join(f"s3://b/{i}.jpg\n" for i in range(10)))
    it = read_uri_list(str(lst))
    assert isinstance(it, types.GeneratorType)
    assert next(it) == "s3://b/0.jpg"
    with pytest.raises(ConfigError):
        list(read_uri_list(str(tmp_path / "missing.txt")))


def test_chunked():
    assert list(chunked(iter(range(7)), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(chunked([], 3)) == []
    assert list(chunked("ab", 5)) == [["a", "b"]]

    def endless():
        i = 0
        while True:
            yield i
            i += 1

    it = chunked(endless(), 2)
    assert next(it) == [0, 1] and next(it) == [2, 3]
    with pytest.raises(ValueError):
        list(chunked([1], 0))
