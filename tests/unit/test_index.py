"""The labelled index (hnq.jobs.index) and the --skip-labelled filter (producer.incremental) on a local
destination: which objects are skipped, what the new job's cumulative index holds, the base-job
choice, and the memory bound (entries held, allocation peak) with 60,000 earlier records."""
from __future__ import annotations

import json
import tracemalloc

import pytest

from hnq.errors import ConfigError
from hnq.jobs.index import (bits_for, build_index, decode_rows, ensure_index, read_meta,
                       reused_path, shard_path, top_bits, uri_hash)
from hnq.objects import SourceObject
from hnq.storage import open_destination
from producer.incremental import SkipLabelled, find_base, job_dirs


def _write_job(d, job: str, records: list[dict], chunk_size: int = 512, manifest: dict | None = None) -> None:
    for c in range(0, len(records), chunk_size):
        d.put(f"{job}/part-{c // chunk_size:05d}.jsonl",
              "".join(json.dumps(r) + "\n" for r in records[c:c + chunk_size]).encode())
    if manifest is not None:
        d.put(f"{job}/manifest.json", json.dumps(manifest).encode())


def _ok(uri: str, etag: str | None) -> dict:
    r = {"uri": uri, "status": "ok", "model": "hardnet39ds", "top5": [], "job_id": "x"}
    if etag:
        r["etag"] = etag
    return r


def _err(uri: str) -> dict:
    return {"uri": uri, "status": "error", "model": "hardnet39ds", "error": {"code": "decode_error", "message": "m"},
            "etag": "e"}


def test_index_of_a_job(tmp_path):
    d = open_destination(str(tmp_path))
    recs = ([_ok(f"s3://b/{i:03d}.jpg", f"e{i}") for i in range(30)] + [_err("s3://b/bad.jpg")]
            + [_ok("file:///x/local.jpg", None)] + [_ok("s3://b/tab\there.jpg", "et")])
    _write_job(d, "job1", recs, chunk_size=8)
    meta = build_index(d, "job1", estimate=31, target=4)     # 31 / 4 -> 3 bits, 8 shards
    assert meta["bits"] == 3 and meta["count"] == 31 and read_meta(d, "job1") == meta
    rows = []
    for s in meta["shards"]:
        shard = list(decode_rows(d.get(shard_path("job1", s))))
        assert [r[0] for r in shard] == sorted(r[0] for r in shard)          # sorted by URI
        assert all(top_bits(uri_hash(r[0]), 3) == s for r in shard)
        rows += shard
    assert sorted(rows) == sorted([(f"s3://b/{i:03d}.jpg", f"e{i}", "job1", f"part-{i // 8:05d}.jsonl")
                                   for i in range(30)] + [("s3://b/tab\there.jpg", "et", "job1", "part-00004.jsonl")])
    assert ensure_index(d, "job1") == (meta, False)


def test_skip_labelled_filter_and_cumulative_index(tmp_path):
    d = open_destination(str(tmp_path))
    _write_job(d, "20260101-000000-aaaaaaaa", [_ok(f"s3://b/{i}.jpg", f"e{i}") for i in range(20)]
               + [_err("s3://b/bad.jpg")], chunk_size=6,
               manifest={"state": "done_with_errors", "model": "hardnet39ds", "sources": ["s3://b/"],
                         "succeeded": 20})
    base = find_base(d, model="hardnet39ds", sources=["s3://b/"])
    assert base.job_id == "20260101-000000-aaaaaaaa" and base.built         # built from its parts
    items = ([SourceObject(f"s3://b/{i}.jpg", f"e{i}") for i in range(20) if i != 7]     # unchanged
             + [SourceObject("s3://b/7.jpg", "e7-new")]                                  # overwritten
             + [SourceObject("s3://b/bad.jpg", "e")]                                     # failed before
             + [SourceObject(f"s3://b/new{i}.jpg", f"n{i}") for i in range(5)]           # new
             + ["file:///x/a.jpg", SourceObject("s3://b/noetag.jpg")])                   # no ETag
    sk = SkipLabelled(base, str(tmp_path / "spool-parent"))
    (tmp_path / "spool-parent").mkdir()
    sk.start(d, "20260102-000000-bbbbbbbb")
    out = list(sk.filter(items))
    assert out[:2] == ["file:///x/a.jpg", "s3://b/noetag.jpg"]       # unspooled, streamed first
    assert sorted(out) == sorted(["file:///x/a.jpg", "s3://b/noetag.jpg", "s3://b/7.jpg", "s3://b/bad.jpg"]
                                 + [f"s3://b/new{i}.jpg" for i in range(5)])
    assert next(o for o in out if o == "s3://b/7.jpg").etag == "e7-new"
    assert sk.skipped == 19 and sk.spooled == 26 and sk.passed_unspooled == 2
    assert list((tmp_path / "spool-parent").iterdir()) == []          # the spool is gone
    summary = sk.finish()
    assert summary["base"] == base.job_id and summary["skipped"] == 19
    [r] = summary["reused"]
    assert r["job"] == base.job_id and r["records"] == 19
    assert r["parts"] == [f"part-{c:05d}.jsonl" for c in range(4)]    # 0-5, 6-11, 12-17, 18-19
    # the new job's index: its own ok records (here one part) + what it reused, pointing at the base
    d.put("20260102-000000-bbbbbbbb/part-00000.jsonl",
          "".join(json.dumps(_ok(u, getattr(u, "etag", None))) + "\n" for u in out).encode())
    meta = build_index(d, "20260102-000000-bbbbbbbb", estimate=27)
    rows = {u: (e, j, p) for s in meta["shards"]
            for u, e, j, p in decode_rows(d.get(shard_path("20260102-000000-bbbbbbbb", s)))}
    assert len(rows) == meta["count"] == 19 + 7        # reused + own ok with an ETag (not file://, noetag)
    assert rows["s3://b/3.jpg"] == ("e3", base.job_id, "part-00000.jsonl")
    assert rows["s3://b/7.jpg"] == ("e7-new", "20260102-000000-bbbbbbbb", "part-00000.jsonl")


def test_base_choice(tmp_path):
    d = open_destination(str(tmp_path))
    m = {"state": "done", "model": "hardnet39ds", "succeeded": 1}
    _write_job(d, "20260101-000000-aaaaaaaa", [_ok("s3://b/1.jpg", "e")], manifest={**m, "sources": ["s3://b/"]})
    _write_job(d, "20260102-000000-aaaaaaaa", [_ok("s3://b/1.jpg", "e")],
               manifest={**m, "sources": ["inventory:s3://inv/x/src/cfg/2026-12-01T00-00Z/manifest.json"]})
    _write_job(d, "20260103-000000-aaaaaaaa", [_ok("s3://b/1.jpg", "e")], manifest={**m, "sources": ["s3://c/"]})
    _write_job(d, "20260104-000000-aaaaaaaa", [_ok("s3://b/1.jpg", "e")],
               manifest={**m, "model": "hardnet68", "sources": ["s3://b/"]})
    _write_job(d, "20260105-000000-aaaaaaaa", [_ok("s3://b/1.jpg", "e")])          # no manifest: running
    assert job_dirs(d)[0] == "20260101-000000-aaaaaaaa" and len(job_dirs(d)) == 5
    assert find_base(d, model="hardnet39ds", sources=["s3://b/"]).job_id == "20260101-000000-aaaaaaaa"
    assert find_base(d, model="hardnet68", sources=["s3://b/"]).job_id == "20260104-000000-aaaaaaaa"
    # an inventory's next delivery is the same source
    nxt = ["inventory:s3://inv/x/src/cfg/2026-12-02T00-00Z/manifest.json"]
    assert find_base(d, model="hardnet39ds", sources=nxt).job_id == "20260102-000000-aaaaaaaa"
    assert find_base(d, model="hardnet39ds", sources=["s3://other/"]) is None
    assert find_base(d, model="hardnet39ds", sources=["x"], since="20260103-000000-aaaaaaaa").job_id \
        == "20260103-000000-aaaaaaaa"
    with pytest.raises(ConfigError, match="no such job"):
        find_base(d, model="hardnet39ds", sources=[], since="20990101-000000-zzzzzzzz")
    with pytest.raises(ConfigError, match="labelled with hardnet68"):
        find_base(d, model="hardnet39ds", sources=[], since="20260104-000000-aaaaaaaa")


@pytest.mark.parametrize("target", [4096, 100])      # 100: 2**10 shards, finer than the spool's buckets
def test_memory_stays_bounded_with_many_earlier_records(tmp_path, target):
    n = 60_000
    d = open_destination(str(tmp_path / "dest"))
    _write_job(d, "20260101-000000-aaaaaaaa", [_ok(f"s3://photos/2026/{i:07d}.jpg", f"{i:032x}") for i in range(n)],
               manifest={"state": "done", "model": "hardnet39ds", "sources": ["s3://photos/"], "succeeded": n})
    meta = build_index(d, "20260101-000000-aaaaaaaa", estimate=n, target=target, flush_lines=5000)
    assert meta["bits"] == bits_for(n, target) == (4 if target == 4096 else 10)
    base = find_base(d, model="hardnet39ds", sources=["s3://photos/"])
    assert not base.built

    def items():   # every earlier object again, 1 in 100 overwritten, plus 1,000 new ones
        for i in range(n):
            yield SourceObject(f"s3://photos/2026/{i:07d}.jpg", f"{i:032x}" if i % 100 else "changed", 1000)
        for i in range(1000):
            yield SourceObject(f"s3://photos/2026/new-{i:05d}.jpg", "n", 1000)

    sk = SkipLabelled(base, str(tmp_path))
    sk.start(d, "20260102-000000-bbbbbbbb")
    tracemalloc.start()
    try:
        got = sum(1 for _ in sk.filter(items()))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == n // 100 + 1000 and sk.skipped == n - n // 100
    per_shard = n / 2 ** meta["bits"]
    assert base.reader.peak_entries <= 1.5 * per_shard        # one shard held at a time
    # what holding every earlier record would take instead (the naive dict), measured the same way
    tracemalloc.start()
    try:
        naive = {u: (e, j, p) for s in meta["shards"] for u, e, j, p in
                 decode_rows(d.get(shard_path("20260101-000000-aaaaaaaa", s)))}
        naive_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(naive) == n
    print(f"\nMEASURED {n} earlier records, {2 ** meta['bits']} shards: filter peak {peak / 2**20:.1f} MiB "
          f"({base.reader.peak_entries} entries held at most); a dict of them all: {naive_peak / 2**20:.1f} MiB")
    assert peak < 8 * 2**20 and peak < naive_peak / 3, (peak, naive_peak)
    assert sum(len(list(decode_rows(d.get(reused_path("20260102-000000-bbbbbbbb", b)))))
               for b in range(256) if d.exists(reused_path("20260102-000000-bbbbbbbb", b))) == sk.skipped


def test_parquet_parts_are_indexed(tmp_path):
    """Parts in Parquet (`submit --format parquet`: uri, status, etag columns among others)."""
    pa = pytest.importorskip("pyarrow")
    import io

    import pyarrow.parquet as pq

    d = open_destination(str(tmp_path))
    t = pa.table({"uri": ["s3://b/1.jpg", "s3://b/2.jpg", "s3://b/3.jpg"], "status": ["ok", "error", "ok"],
                  "etag": ["e1", "e2", None], "top_k": [5, 5, 5]})
    buf = io.BytesIO()
    pq.write_table(t, buf)
    d.put("job1/part-00000.parquet", buf.getvalue())
    meta = build_index(d, "job1", estimate=3)
    assert meta["count"] == 1
    assert list(decode_rows(d.get(shard_path("job1", 0)))) == [("s3://b/1.jpg", "e1", "job1", "part-00000.parquet")]
