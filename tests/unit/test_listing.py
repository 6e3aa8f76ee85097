"""hnq.storage.s3.listing against moto's S3 server (real HTTP): the fanned-out listing yields exactly the
single stream's objects, with their ETag, size and storage class, in bounded memory; errors are
ConfigErrors naming the prefix; closing the stream stops its threads."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from faultproxy import FaultProxy
from hnq.errors import ConfigError
from hnq.storage import reset_s3_client
from hnq.storage.s3.listing import ListingStats, list_objects
from hnq.sources import expand_sources


def _keys() -> dict[str, str]:
    """key -> storage class: three levels of folders, keys beside folders at every level, non-images,
    folder markers, a key with odd characters."""
    keys = {}
    for a in ("a", "b", "c"):
        keys[f"top/{a}.jpg"] = "STANDARD"                # beside the folders at level 1
        for b in range(4):
            keys[f"top/{a}/{b:02d}.png"] = "STANDARD"    # beside the folders at level 2
            for c in range(5):
                keys[f"top/{a}/{b:02d}/{c}/img {c}+%.jpg"] = "STANDARD"
                keys[f"top/{a}/{b:02d}/{c}/deep/x{c}.jpeg"] = "GLACIER" if c == 0 else "STANDARD"
    keys["top/a/00/readme.txt"] = "STANDARD"             # not an image
    keys["top/b/"] = "STANDARD"                          # a folder marker
    keys["other/z.jpg"] = "STANDARD"                     # outside the prefix
    return keys


@pytest.fixture
def bucket(s3):
    s3.create_bucket(Bucket="lst")
    keys = _keys()
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda kv: s3.put_object(Bucket="lst", Key=kv[0], Body=kv[0].encode(), StorageClass=kv[1]),
                    keys.items()))
    return keys


def _images(keys) -> list[str]:
    return sorted(f"s3://lst/{k}" for k in keys
                  if k.startswith("top/") and not k.endswith("/") and not k.endswith(".txt"))


@pytest.mark.parametrize("threads,depth", [(8, 2), (3, 1), (8, 4), (2, 0)])
def test_fanned_out_listing_is_the_single_stream(bucket, s3, threads, depth):
    single = list(list_objects("lst", "top/", threads=1))
    assert single == _images(bucket)            # one stream: S3's sorted order
    st = ListingStats()
    fanned = list(list_objects("lst", "top/", threads=threads, depth=depth, stats=st))
    assert sorted(fanned) == single and len(fanned) == len(single)   # each object exactly once
    assert st.keys == len(single)
    # units: the prefix itself, then each folder down to `depth` levels
    expected_units = 1 + (3 if depth >= 1 else 0) + (12 if depth >= 2 else 0) + (60 if depth >= 3 else 0) \
        + (60 if depth >= 4 else 0)
    assert st.units == expected_units
    by_uri = {o: o for o in fanned}
    for o in single:
        f = by_uri[o]
        key = o[len("s3://lst/"):]
        head = s3.head_object(Bucket="lst", Key=key)
        assert f.etag == o.etag == head["ETag"].strip('"')
        assert f.size == o.size == len(key.encode())
        assert f.storage_class == bucket[key]


def test_listing_gives_archived_objects_a_precoded_entry(bucket):
    from hnq.objects import to_entry

    objs = {str(o): o for o in list_objects("lst", "top/", threads=4)}
    glacier = objs["s3://lst/top/a/00/0/deep/x0.jpeg"]
    entry = to_entry(glacier)
    assert entry["code"] == "archived" and "GLACIER" in entry["message"] and entry["size"] == glacier.size
    assert to_entry(objs["s3://lst/top/a.jpg"]) == "s3://lst/top/a.jpg"


def test_bounded_queue_and_pages(bucket):
    st = ListingStats()
    it = list_objects("lst", "top/", threads=6, depth=1, page_size=7, queue_pages=2, stats=st)
    first = [next(it) for _ in range(3)]
    rest = list(it)
    assert len(first) + len(rest) == len(_images(bucket))
    assert st.queue_pages == 2 and 1 <= st.peak_queued_pages <= 2
    # folders a, b, c listed whole in pages of 7 (top/ itself holds 3 images and 3 folders: 1 page)
    per_folder = {a: sum(1 for k in bucket if k.startswith(f"top/{a}/")) for a in "abc"}  # marker too
    assert st.requests == 1 + sum(-(-n // 7) for n in per_folder.values())


def test_closing_the_stream_stops_its_threads(bucket):
    it = list_objects("lst", "top/", threads=5, depth=3, page_size=5, queue_pages=1)
    assert next(it).startswith("s3://lst/top/")
    it.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("hardnet-list-") and t.is_alive()]


def test_flat_prefix_is_one_unit(s3):
    s3.create_bucket(Bucket="flat")
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda i: s3.put_object(Bucket="flat", Key=f"f/{i:04d}.jpg", Body=b"x"), range(60)))
    st = ListingStats()
    got = list(list_objects("flat", "f/", threads=8, depth=2, page_size=25, stats=st))
    assert got == [f"s3://flat/f/{i:04d}.jpg" for i in range(60)]   # one unit: S3's order
    assert st.units == 1 and st.requests == 3


def test_missing_bucket_is_a_config_error(s3):
    with pytest.raises(ConfigError, match="does not exist"):
        list(list_objects("no-such-bucket", "x/", threads=4))
    with pytest.raises(ConfigError, match="does not exist"):
        list(expand_sources(["s3://no-such-bucket/x/"], list_threads=4))


def test_access_denied_on_one_folder_names_it(bucket, moto_server, monkeypatch):
    with FaultProxy(moto_server.url) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        reset_s3_client()
        proxy.set_fault("403", path="prefix=top%2Fb%2F")
        try:
            with pytest.raises(ConfigError, match=r"s3://lst/top/b/.*access denied"):
                list(list_objects("lst", "top/", threads=4, depth=2))
            assert proxy.faults_injected >= 1
        finally:
            reset_s3_client()


def test_fetching_an_archived_object_anyway_is_archived(bucket, s3_get):
    """A URI list carries no storage class: the GET's InvalidObjectState becomes `archived`, with
    either GET client."""
    from hnq.errors import ErrorCode, ImageError
    from hnq.storage import fetch

    with pytest.raises(ImageError) as ei:
        fetch("s3://lst/top/a/00/0/deep/x0.jpeg", s3_get.policy())
    assert ei.value.code == ErrorCode.archived and "restore it first" in str(ei.value)
    assert fetch("s3://lst/top/a/00/1/deep/x1.jpeg", s3_get.policy()).data == b"top/a/00/1/deep/x1.jpeg"
