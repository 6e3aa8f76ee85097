"""Precoded entries (hnq.objects): what the producer stores for archived / 0-byte objects and how a
worker turns a chunk of mixed entries into one record per entry, in order, without fetching them."""
from __future__ import annotations

import pytest

from hnq.errors import ConfigError
from hnq.jobs.inputs import decode_entries, decode_uris, encode_uris
from hnq.objects import SourceObject, to_entry, with_precoded


def test_source_object_is_its_uri():
    o = SourceObject("s3://b/k.jpg", etag="e1", size=3, storage_class="standard")
    assert o == "s3://b/k.jpg" and isinstance(o, str) and o.storage_class == "STANDARD"
    assert to_entry(o) == "s3://b/k.jpg" and type(to_entry(o)) is str
    assert SourceObject.from_row(o.to_row()).to_row() == o.to_row()
    import pickle

    assert pickle.loads(pickle.dumps(o)).etag == "e1"


def test_mixed_chunk_round_trip_and_records_in_order():
    items = ["s3://b/0.jpg", SourceObject("s3://b/1.jpg", "e1", 10, "GLACIER"), SourceObject("s3://b/2.jpg", "e2", 5),
             SourceObject("s3://b/3.jpg", "e3", 0), "file:///x/4.jpg",
             SourceObject("s3://b/5.jpg", "e5", 9, "GLACIER_IR")]
    data, digest = encode_uris([to_entry(x) for x in items])
    entries, d2 = decode_entries(data)
    assert d2 == digest and len(entries) == 6
    assert decode_uris(data)[0] == [str(x) for x in items]          # dead letters, sweeps: the URIs
    fetched = []

    def label(uris):
        fetched.append(list(uris))
        from hnq.schema import ResultRecord

        return [ResultRecord(uri=u, status="ok", model="hardnet39ds", top5=[]) for u in uris]

    recs = with_precoded(entries, "hardnet39ds", "job1", label, weights="random")
    assert fetched == [["s3://b/0.jpg", "s3://b/2.jpg", "file:///x/4.jpg", "s3://b/5.jpg"]]
    assert [r.uri for r in recs] == [str(x) for x in items]
    assert [r.status for r in recs] == ["ok", "error", "ok", "error", "ok", "ok"]
    assert recs[1].error.code == "archived" and "GLACIER" in recs[1].error.message
    assert recs[1].etag == "e1" and recs[1].size == 10 and recs[1].job_id == "job1" and recs[1].weights == "random"
    assert recs[3].error.code == "empty" and recs[3].size == 0
    # a chunk of precoded entries only needs no fetch at all; a cancelled fetch stays None
    assert [r.error.code for r in with_precoded(entries[1:2], "hardnet39ds", "j", lambda u: 1 / 0)] == ["archived"]
    assert with_precoded(entries, "hardnet39ds", "j", lambda u: None) is None


@pytest.mark.parametrize("bad", [{"uri": "s3://b/k"}, {"uri": "s3://b/k", "code": "decode_error", "message": "m"},
                                 {"uri": 3, "code": "archived", "message": "m"}, 7,
                                 {"uri": "s3://b/k", "code": "archived", "message": "m", "x": 1}])
def test_malformed_entries_are_refused(bad):
    data, _ = encode_uris([bad])
    with pytest.raises(ConfigError, match="neither a URI string nor a precoded record"):
        decode_entries(data)
