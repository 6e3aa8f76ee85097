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


@pytest.mark.parametrize("entry", [
    {"uri": "s3://b/k.jpg", "code": "archived", "message": "m", "etag": "e1", "size": 10},
    {"uri": "s3://b/x&token=5/\u2028é\x00.jpg", "code": "empty", "message": "s3://b/x&token=5: 0 bytes"},
    {"uri": "https://u:pw@h/a.jpg?X-Amz-Signature=abc", "code": "archived",
     "message": "https://u:pw@h/a.jpg?X-Amz-Signature=abc: not fetched", "etag": "", "size": 0},
    {"uri": "s3://b/k.jpg", "code": "archived", "message": "m", "size": True},     # pydantic decides
])
@pytest.mark.parametrize("weights,job", [("random", "job1"), (None, None)])
def test_precoded_record_is_the_validated_record(entry, weights, job):
    """precoded_record builds the record without pydantic's validation: the same record, the same
    JSON line, the same redaction as ResultRecord.failure."""
    from hnq import objects
    from hnq.schema import ResultRecord

    assert objects._FAST        # this pydantic: the fast path is the one that runs
    want = ResultRecord.failure(entry["uri"], entry["code"], entry["message"], "hardnet39ds", job_id=job,
                                weights=weights, etag=entry.get("etag"), size=entry.get("size"))
    got = objects.precoded_record(entry, "hardnet39ds", job, weights)
    assert got == want and got.to_json() == want.to_json() and got.model_dump() == want.model_dump()
    assert got.model_fields_set == want.model_fields_set and got.error.code is want.error.code
    assert got.model_copy(update={"etag": "x"}).etag == "x"
    assert ResultRecord.model_validate_json(got.to_json()) == want


def test_a_chunk_of_precoded_entries_is_written_as_its_validated_records_would_be():
    """PrecodedRecords (a chunk of archived objects) makes its part's JSON Lines and its counts
    from the entries directly: byte for byte what pydantic writes for the validated records, over
    strings of every kind of character; the records it hands out are those records."""
    import random
    from collections import Counter

    from hnq import objects
    from hnq.jobs.parts import to_jsonl
    from hnq.schema import ResultRecord

    rng = random.Random(19)
    pools = ["\x00\x01\x1f\x7f\"\\/\n\r\t\b\f", "\u0085\u2028\u2029\ufeff\u00e9\u4e2d\U0001f600",
             "abc=&@:?#% ", "token=1&sig=2&X-Amz-Signature=3"]

    def text(n: int) -> str:
        return "".join(rng.choice(rng.choice(pools)) for _ in range(n))

    entries = []
    for _ in range(300):
        e = {"uri": rng.choice(["s3://b/", "https://u:p@h/", "file:///x/", ""]) + text(12),
             "code": rng.choice(sorted(objects.PRECODED_CODES)), "message": text(30)}
        e.update({k: v for k, v in (("etag", rng.choice([None, "", text(5)])),
                                    ("size", rng.choice([None, 0, 7, 2**40]))) if v is not None})
        entries.append(e)
    data, _ = encode_uris(entries)
    entries, _ = decode_entries(data)
    for model, job, weights in (("hardnet68", "job1", "random"), (text(3), None, None), ("m", text(4), text(4))):
        recs = with_precoded(entries, model, job, lambda u: 1 / 0, weights=weights)
        assert isinstance(recs, objects.PrecodedRecords) and len(recs) == len(entries)
        want = [ResultRecord.failure(e["uri"], e["code"], e["message"], model, job_id=job, weights=weights,
                                     etag=e.get("etag"), size=e.get("size")) for e in entries]
        assert recs.jsonl() == to_jsonl(recs) == "".join(r.to_json() + "\n" for r in want).encode()
        assert list(recs) == want and recs[3] == want[3] and recs[-1] == want[-1]
        assert recs.codes() == Counter(r.error.code for r in want)
        assert recs.tally() == Counter((model, "error", r.error.code) for r in want)
    # values of another type than the direct encoding writes: the validated records
    assert type(with_precoded([{**entries[0], "size": True}], "m", "j", lambda u: 1 / 0)) is list
