"""Output options without a cluster (issue 10, items 4-7): the message's compatibility rules, the
Parquet codec, tag spelling and merging, the engine pool's bound, the checkpoint allow-list, the
per-chunk top-k in the engine, and the report's bounded aggregates and escaping."""
from __future__ import annotations

import re
import sys
import threading
import time
import unicodedata
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from hnq.errors import ConfigError, ErrorCode
from hnq.options import DEFAULT_OPTIONS, JobOptions, normalize_weights
from hnq.schema import ChunkTask, Label, RecordError, ResultRecord

BASE = {"job_id": "j1", "chunk": 0, "count": 3, "digest": "abcdef0123456789", "model": "hardnet68"}


# ------------------------------------------------------------------------------------ message
class OldChunkTask(BaseModel):
    """The version-2 schema as workers from before the options have it."""

    model_config = ConfigDict(extra="forbid")
    v: Literal[2] = 2
    job_id: str
    chunk: int
    count: int
    digest: str
    model: str
    dest: str | None = None


def test_a_default_job_sends_the_version_2_message():
    t = ChunkTask(**BASE, options=DEFAULT_OPTIONS.for_message())
    payload = t.model_dump(exclude_none=True)
    assert payload == {"v": 2, **BASE}
    OldChunkTask.model_validate(payload)          # an old worker labels it


def test_options_make_a_version_3_message_that_old_workers_refuse():
    t = ChunkTask(**BASE, options=JobOptions(format="parquet", top_k=3, weights="/m/x.pth", tag=True))
    payload = t.model_dump(exclude_none=True)
    assert payload["v"] == 3 and payload["options"] == {"format": "parquet", "top_k": 3, "weights": "/m/x.pth",
                                                         "tag": True}
    back = ChunkTask.model_validate(payload)
    assert back.opts.format == "parquet" and back.opts.top_k == 3 and back.opts.tag
    with pytest.raises(ValidationError) as e:
        OldChunkTask.model_validate(payload)      # refused, never silently ignored
    text = str(e.value)
    assert "options" in text and "Input should be 2" in text


@pytest.mark.parametrize("bad", [
    {"v": 2, "options": {"format": "parquet"}},    # options need v3
    {"v": 4},                                      # a later version
    {"v": 3, "options": {"top_k": 0}},
    {"v": 3, "options": {"top_k": 21}},
    {"v": 3, "options": {"format": "csv"}},
    {"v": 3, "options": {"weights": "relative.pth"}},
    {"v": 3, "options": {"colour": "blue"}},       # unknown option
])
def test_bad_messages_are_refused(bad):
    with pytest.raises(ValidationError):
        ChunkTask.model_validate({**BASE, **bad})


@pytest.mark.parametrize("value, want", [
    (None, None), ("official", "official"), ("default", "official"), ("RANDOM", "random"),
    ("/models/a.pth", "/models/a.pth"), ("file:///models/a.pth", "file:///models/a.pth"),
    ("https://models.example/a.pth", "https://models.example/a.pth"),
])
def test_weights_spellings(value, want):
    assert normalize_weights(value) == want


@pytest.mark.parametrize("value", ["a.pth", "./a.pth", "~/a.pth", "s3://bkt/a.pth", "file://host/a.pth", "", "x\x00"])
def test_weights_that_no_worker_could_load_are_refused(value):
    with pytest.raises(ConfigError):
        normalize_weights(value)


def test_job_options_round_trip_through_the_job_state():
    o = JobOptions(format="parquet", top_k=7)
    assert JobOptions.from_json(o.to_json()) == o
    assert JobOptions.from_json("") == DEFAULT_OPTIONS and JobOptions.from_dict(None) == DEFAULT_OPTIONS
    from hnq.jobs.store import _options

    assert _options(o.to_json()) == {"format": "parquet", "top_k": 7} and _options(DEFAULT_OPTIONS.to_json()) is None


# ------------------------------------------------------------------------------------ parquet
def _recs(k: int = 5) -> list[ResultRecord]:
    from worker.model.labels import IMAGENET_CATEGORIES

    field = "top5" if k == 5 else "topk"
    ok = ResultRecord(uri="s3://bkt/a b+c%.jpg", status="ok", model="hardnet68", weights="official", job_id="j",
                      etag="e1", size=2**40, **{field: [Label(index=i * 47 % 1000, label=IMAGENET_CATEGORIES[i * 47 % 1000],
                                                              score=round(0.61 / (i + 1), 6)) for i in range(k)]})
    tagged = ok.model_copy(update={"uri": "s3://bkt/t.jpg", "tag_error": RecordError(code=ErrorCode.tag_error,
                                                                                   message="not tagged: limit")})
    bad = ResultRecord.failure("file:///x/ü.jpg", ErrorCode.decode_error, "not an image", "hardnet68",
                               weights="official", job_id="j")
    return [ok, tagged, bad]


@pytest.mark.parametrize("k", [1, 5, 20])
def test_parquet_round_trip_gives_the_json_lines_records(k):
    pytest.importorskip("pyarrow")
    from hnq.jobs.parts import decode_part, encode_part, part_jsonl_lines

    recs = _recs(k)
    data, ctype = encode_part(recs, "parquet", top_k=k, job_id="j")
    assert data[:4] == b"PAR1" and ctype == "application/vnd.apache.parquet"
    assert list(part_jsonl_lines(data, "parquet")) == [r.to_json() for r in recs]
    assert [r.labels and len(r.labels) for r in decode_part(data, "parquet")] == [k, k, None]
    jl, _ = encode_part(recs, "jsonl")
    assert list(part_jsonl_lines(jl, "jsonl")) == [r.to_json() for r in recs]


def test_parquet_columns_are_the_documented_ones():
    pytest.importorskip("pyarrow")
    from pathlib import Path

    from hnq.jobs.parts import PARQUET_COLUMNS, arrow_schema

    import pyarrow as pa

    doc = (Path(__file__).resolve().parents[2] / "docs" / "output.md").read_text()
    for name, typ, _ in PARQUET_COLUMNS:
        assert f"| `{name}` | {typ} |" in doc, name
    schema = arrow_schema()
    assert schema.names == [c[0] for c in PARQUET_COLUMNS]
    assert schema.field("top1_index").type == pa.int16() and schema.field("top1_score").type == pa.float32()
    assert schema.field("size").type == pa.int64() and schema.field("uri").type == pa.string()
    label = schema.field("topk").type.value_type
    assert [(f.name, f.type) for f in label] == [("index", pa.int16()), ("label", pa.string()),
                                                 ("score", pa.float32())]
    assert not schema.field("uri").nullable and schema.field("topk").nullable


def test_without_pyarrow_parquet_is_a_clear_config_error(monkeypatch):
    from hnq.jobs import parts as output

    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ConfigError, match=r"pyarrow.*hardnet-queue\[parquet\]"):
        output.encode_part(_recs(), "parquet")
    assert output.parquet_available() is False
    assert output.encode_part(_recs(), "jsonl")[0].count(b"\n") == 3


def test_resume_counts_a_parquet_part():
    pytest.importorskip("pyarrow")
    from hnq.jobs.parts import encode_part
    from producer.resume import _part_outcome

    data, _ = encode_part(_recs(), "parquet")
    assert _part_outcome(data, 3, "parquet") == {"ok": 2, "failed": 1, "weights": "official",
                                                 "codes": {"tag_error": 1, "decode_error": 1}}
    assert _part_outcome(data, 4, "parquet") is None
    assert _part_outcome(b"PAR1 truncated", 3, "parquet") is None


# ------------------------------------------------------------------------------------ tags
_TAG_PATTERN_EXTRA = set("_.:/=+-@")


def _valid_tag_text(s: str) -> bool:
    # S3 API Tag pattern ^([\p{L}\p{Z}\p{N}_.:/=+\-@]*)$
    return all(unicodedata.category(c)[0] in "LZN" or c in _TAG_PATTERN_EXTRA for c in s)


def test_every_imagenet_label_makes_a_valid_tag_value():
    from hnq.storage.s3.tags import tag_value
    from worker.model.labels import IMAGENET_CATEGORIES

    for label in IMAGENET_CATEGORIES:
        v = tag_value(label)
        assert v and _valid_tag_text(v) and len(v) <= 256, (label, v)
    assert tag_value("potter's wheel") == "potters wheel"
    assert tag_value("jack-o'-lantern") == "jack-o-lantern"
    assert tag_value("crane, bird (N.Am.)") == "crane bird N.Am."
    assert tag_value('x<script>"&;') == "x script"
    assert tag_value("naïve café 東京") == "naïve café 東京"
    long = tag_value("\U00020000" * 200)   # a CJK letter beyond the BMP: 2 UTF-16 units, 128 fit in 256
    assert len(long) == 128


class FakeS3:
    """get/put_object_tagging on a dict, counting PUTs."""

    def __init__(self, tags: dict[str, dict[str, str]]):
        self.tags = tags
        self.puts = 0

    def get_object_tagging(self, Bucket, Key):
        return {"TagSet": [{"Key": k, "Value": v} for k, v in self.tags[f"{Bucket}/{Key}"].items()]}

    def put_object_tagging(self, Bucket, Key, Tagging):
        self.puts += 1
        ts = Tagging["TagSet"]
        assert len(ts) <= 10 and len({t["Key"] for t in ts}) == len(ts)
        self.tags[f"{Bucket}/{Key}"] = {t["Key"]: t["Value"] for t in ts}


def _ok(uri: str, label: str = "potter's wheel", score: float = 0.876543) -> ResultRecord:
    return ResultRecord(uri=uri, status="ok", model="hardnet68", weights="official",
                        top5=[Label(index=739, label=label, score=score)])


def test_tag_merge_rules():
    from hnq.storage.s3.tags import TAG_KEYS, tag_records

    seven = {f"k{i}": "v" for i in range(7)}
    nine = {f"k{i}": "v" for i in range(9)}
    old = {"hardnet:label": "old", "hardnet:score": "0.1", "hardnet:model": "x", **{f"k{i}": "v" for i in range(7)}}
    fake = FakeS3({"bkt/plain": {}, "bkt/two": {"a": "1", "b": "2"}, "bkt/seven": dict(seven), "bkt/nine": dict(nine),
                   "bkt/old": dict(old)})
    recs = [_ok("s3://bkt/plain"), _ok("s3://bkt/two"), _ok("s3://bkt/seven"), _ok("s3://bkt/nine"), _ok("s3://bkt/old"),
            ResultRecord.failure("s3://bkt/broken", "decode_error", "x", "hardnet68"), _ok("file:///x.jpg")]
    out, counts = tag_records(recs, threads=4, client=fake)
    want = {"hardnet:label": "potters wheel", "hardnet:score": "0.8765", "hardnet:model": "hardnet68/official"}
    assert fake.tags["bkt/plain"] == want
    assert fake.tags["bkt/two"] == {"a": "1", "b": "2", **want}
    assert fake.tags["bkt/seven"] == {**seven, **want} and len(fake.tags["bkt/seven"]) == 10   # exactly at the limit
    assert fake.tags["bkt/nine"] == nine, "over the limit: untouched"
    assert fake.tags["bkt/old"] == {**{f"k{i}": "v" for i in range(7)}, **want}, "our old values replaced, not added"
    assert [bool(r.tag_error) for r in out] == [False, False, False, True, False, False, True]
    assert "limit of 10" in out[3].tag_error.message and out[3].status == "ok" and out[3].top5
    assert "only s3://" in out[6].tag_error.message
    assert counts == {"tagged": 4, "unchanged": 0, "failed": 2}
    puts = fake.puts
    out2, counts2 = tag_records(recs, threads=4, client=fake)     # a retried chunk
    assert counts2["unchanged"] == 4 and fake.puts == puts, "no PUT when the tags are already there"
    assert set(TAG_KEYS) <= fake.tags["bkt/plain"].keys()


def test_tag_failures_from_s3_become_record_errors():
    import botocore.exceptions as bex

    from hnq.storage.s3.tags import tag_records

    class Denied(FakeS3):
        def put_object_tagging(self, **kw):
            raise bex.ClientError({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}},
                                  "PutObjectTagging")

    out, counts = tag_records([_ok("s3://bkt/x")], client=Denied({"bkt/x": {}}))
    assert counts["failed"] == 1 and "s3:PutObjectTagging" in out[0].tag_error.message
    assert out[0].status == "ok"


# ------------------------------------------------------------------------------------ engines
class FakeEngine:
    def __init__(self, key):
        self.key = key
        self.closed = False

    def close(self):
        self.closed = True


def test_engine_pool_builds_lazily_shares_and_evicts_the_idle_lru():
    from worker.engine_pool import EnginePool

    built = []

    def build(model, weights):
        built.append((model, weights))
        return FakeEngine((model, weights))

    pool = EnginePool(build, 2)
    with pool.lease("m", None) as a, pool.lease("m", "official") as a2:
        assert a is a2 and built == [("m", None)], "None and 'official' are one checkpoint"
    with pool.lease("m", "/x.pth") as b:
        pass
    with pool.lease("m", None):
        pass                                  # (m, official) is now the most recently used
    with pool.lease("m", "/y.pth") as c:      # full: the idle LRU, /x.pth, goes
        assert b.closed and not a.closed and not c.closed
    assert pool.keys() == [("m", "official"), ("m", "/y.pth")] and pool.evictions == 1


def test_engine_pool_waits_while_every_engine_is_in_use():
    from worker.engine_pool import EnginePool

    pool = EnginePool(lambda m, w: FakeEngine((m, w)), 1)
    release = threading.Event()
    got = {}

    def hold():
        with pool.lease("m", "/a.pth") as e:
            got["a"] = e
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    while "a" not in got:
        time.sleep(0.01)

    def other():
        with pool.lease("m", "/b.pth") as e:
            got["b"] = e

    t2 = threading.Thread(target=other)
    t2.start()
    t2.join(0.5)
    assert t2.is_alive() and "b" not in got and not got["a"].closed, "must wait, not evict an engine in use"
    release.set()
    t.join(5)
    t2.join(10)
    assert got["a"].closed and got["b"].key == ("m", "/b.pth") and len(pool.keys()) == 1


def test_engine_pool_build_failure_reaches_the_chunk_and_is_not_cached():
    from worker.engine_pool import EnginePool

    calls = []

    def build(m, w):
        calls.append(w)
        if len(calls) == 1:
            raise ConfigError("weights file /a.pth does not exist")
        return FakeEngine((m, w))

    pool = EnginePool(build, 1)
    with pytest.raises(ConfigError, match="does not exist"):
        with pool.lease("m", "/a.pth"):
            pass
    with pool.lease("m", "/a.pth") as e:
        assert e.key == ("m", "/a.pth")
    assert calls == ["/a.pth", "/a.pth"]


def test_job_weights_allow_list(tmp_path):
    from worker.engine_pool import check_job_weights, resolve_job_weights

    allowed = tmp_path / "models"
    allowed.mkdir()
    (allowed / "a.pth").write_bytes(b"x")
    (tmp_path / "secret.pth").write_bytes(b"x")
    (allowed / "link.pth").symlink_to(tmp_path / "secret.pth")
    allow = (str(allowed), "https://models.example/", "https://cdn.example")
    for ok in ("official", "random", str(allowed / "a.pth"), f"file://{allowed}/a.pth",
               "https://models.example/hardnet/v2.pth", "https://cdn.example/m.pth"):
        check_job_weights(ok, allow, None)
    check_job_weights("/own/ckpt.pth", (), "/own/ckpt.pth")       # the worker's own weights
    for bad in (str(tmp_path / "secret.pth"), str(allowed / "link.pth"), str(allowed / ".." / "secret.pth"),
                "https://evil.example/models.example/x.pth", "http://models.example/x.pth",
                "https://cdn.example.evil.net/m.pth"):
        with pytest.raises(ConfigError, match="HARDNET_JOB_WEIGHTS_ALLOW"):
            check_job_weights(bad, allow, None)
    with pytest.raises(ConfigError, match="loads no job-named"):
        check_job_weights(str(allowed / "a.pth"), (), None)
    assert resolve_job_weights("hardnet68", None, "hardnet68", "/own.pth") == "/own.pth"
    assert resolve_job_weights("hardnet85", None, "hardnet68", "/own.pth") is None
    assert resolve_job_weights("hardnet85", None, "hardnet68", "random") == "random"
    assert resolve_job_weights("hardnet68", "official", "hardnet68", "random") is None
    assert resolve_job_weights("hardnet68", "/j.pth", "hardnet68", "random") == "/j.pth"


def test_chunks_of_different_top_k_share_one_engine():
    torch = pytest.importorskip("torch")
    from cluster import image_bytes
    from hnq.options import TOP_K_MAX
    from hnq.storage import Fetched
    from worker.engine import DeviceRunner, Engine, EngineConfig
    from worker.engine.classifier import Classifier

    clf = Classifier("hardnet39ds", "random", device="cpu", batch_size=8)
    blobs = {f"mem://{i}": image_bytes(i) for i in range(6)}
    runner = DeviceRunner(clf.net, clf.device, 8, amp=False, k=TOP_K_MAX)
    eng = Engine(fetch=lambda u: Fetched(blobs[u], None, len(blobs[u])), decode=clf.decode, runner=runner,
                 record=clf.record, cfg=EngineConfig(batch_size=8, fetch_threads=4, decode_threads=1))
    try:
        uris = list(blobs)
        chunks = {k: eng.submit(uris, top_k=k, name=f"k{k}") for k in (1, 5, 20)}
        res = {k: c.result(120) for k, c in chunks.items()}
        with pytest.raises(ValueError):
            eng.submit(uris, top_k=21)
    finally:
        eng.close()
    for k, recs in res.items():
        assert all(len(r.top5) == k for r in recs)
    for a, b in zip(res[1], res[20]):   # the same ranking, cut at k
        assert [x.index for x in a.top5] == [x.index for x in b.top5[:1]]
    ref = clf.classify([(uris[2], blobs[uris[2]])])[0]
    assert [x.index for x in res[5][2].top5] == [x.index for x in ref.top5]
    from worker.chunk import name_labels

    renamed = name_labels(res[20], 20)
    assert all(r.top5 is None and len(r.topk) == 20 and r.labels == r.topk for r in renamed)
    assert name_labels(res[5], 5) == res[5]


# ------------------------------------------------------------------------------------ report
HOSTILE = 's3://bkt/"><script>alert(1)</script><img src=x onerror=alert(2)>.jpg'


def test_report_aggregates_are_bounded_and_exact():
    from producer.report.stats import EXAMPLES_PER_CLASS, ReportStats

    st = ReportStats(low_n=10)
    n = 20_000
    for i in range(n):
        if i % 100 == 0:
            st.add(ResultRecord.failure(f"s3://bkt/{i}.jpg", "decode_error", "bad", "m"))
            continue
        st.add(ResultRecord(uri=f"s3://bkt/{i}.jpg", status="ok", model="m",
                            top5=[Label(index=i % 7, label=f"class {i % 7}", score=(i % 1000) / 1000)]))
    assert st.total == n and st.failed == n // 100 and st.ok == n - n // 100
    assert sum(st.classes.values()) == st.ok and len(st.classes) == 7
    assert sum(st.score_bins) == st.ok
    assert all(len(r.items) <= EXAMPLES_PER_CLASS for r in st.class_examples.values())
    assert len(st.code_examples["decode_error"].items) == 5 and st.code_examples["decode_error"].seen == n // 100
    low = st.lowest()
    assert len(low) == 10 and [s for s, _, _ in low] == sorted(s for s, _, _ in low) and low[0][0] == 0.001


def test_report_page_escapes_everything_and_says_when_pillow_is_missing():
    from producer.report.html import render
    from producer.report.job import JobView
    from producer.report.stats import ReportStats

    st = ReportStats()
    st.add(ResultRecord(uri=HOSTILE, status="ok", model="m", top5=[Label(index=1, label='<b>"x"</b>', score=0.2)]))
    st.add(ResultRecord.failure(HOSTILE + "2", "decode_error", "<script>alert(3)</script>", "m"))
    st.parts.append((1000.0, 2))
    st.parts_read = 1
    view = JobView(job_id="j<1>", dest=None, fmt="jsonl", chunks=1,
                   info={"state": "done", "model": "<i>m</i>", "_options": {"top_k": 5}}, manifest=None)
    page = render(view, st, 0, thumbs=None, pillow_missing=True, thumbs_off=False)
    assert "<script" not in page and "<b>" not in page and "<i>" not in page and "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;script&gt;alert(3)&lt;/script&gt;" in page
    assert "Pillow is not installed" in page
    assert "default-src 'none'" in page
    assert not re.search(r"<[^>]+\son\w+=", page), "no event-handler attribute"
