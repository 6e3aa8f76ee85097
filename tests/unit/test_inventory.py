"""S3 Inventory reports read from moto's S3 server: CSV (URL-encoded keys) and Parquet, the
version / delete-marker / non-image filters, storage classes and sizes carried to precoded
records, checksums, the latest-report lookup, and the refusals (ORC, no pyarrow, bad reports)."""
from __future__ import annotations

import sys

import pytest

from hnq.errors import ConfigError
from hnq.objects import to_entry
from inventories import Row, put_inventory
from hnq.storage.s3.inventory import InventoryStats, identity, iter_inventory, resolve_manifest

KEYS = ["photos/a b+c%.jpg", "photos/ünï/çødé 1.png", "photos/plain.jpeg", "photos/x/y/z.JPG"]


def _rows() -> list[Row]:
    rows = [Row(k, 100 + i, f"etag{i}") for i, k in enumerate(KEYS)]
    rows += [
        Row("photos/cold.jpg", 5000, "etagcold", "GLACIER"),
        Row("photos/deep.jpg", 5000, "etagdeep", "DEEP_ARCHIVE"),
        Row("photos/instant.jpg", 5000, "etaginst", "GLACIER_IR"),                    # fetchable
        Row("photos/tiered.jpg", 5000, "etagtier", "INTELLIGENT_TIERING", tier="DEEP_ARCHIVE_ACCESS"),
        Row("photos/tiered-ok.jpg", 5000, "etagtok", "INTELLIGENT_TIERING", tier="ARCHIVE_INSTANT_ACCESS"),
        Row("photos/zero.jpg", 0, "d41d8cd98f00b204e9800998ecf8427e"),
        Row("photos/old.jpg", 10, "etagold1", is_latest=False, version="v0"),         # older version
        Row("photos/old.jpg", 11, "etagold2", version="v1"),                           # its latest
        Row("photos/gone.jpg", None, None, is_latest=True, delete_marker=True),       # deleted
        Row("photos/notes.txt", 10, "etagtxt"),                                        # not an image
        Row("photos/folder/", 0, "etagdir"),                                           # folder marker
    ]
    return rows


def _check(objs, stats):
    by = {str(o): o for o in objs}
    want = {f"s3://src/{k}" for k in KEYS} | {f"s3://src/photos/{n}.jpg" for n in
                                              ("cold", "deep", "instant", "tiered", "tiered-ok", "zero", "old")}
    assert set(by) == want and len(objs) == len(want)
    assert by["s3://src/photos/a b+c%.jpg"].etag == "etag0" and by["s3://src/photos/a b+c%.jpg"].size == 100
    assert by["s3://src/photos/old.jpg"].etag == "etagold2"       # the latest version only
    entries = {str(o): to_entry(o) for o in objs}
    for name, code, word in (("cold", "archived", "GLACIER"), ("deep", "archived", "DEEP_ARCHIVE"),
                             ("tiered", "archived", "DEEP_ARCHIVE_ACCESS"), ("zero", "empty", "0 bytes")):
        e = entries[f"s3://src/photos/{name}.jpg"]
        assert e["code"] == code and word in e["message"], e
    for name in ("instant", "tiered-ok", "plain"):
        uri = f"s3://src/photos/{name}.jp{'e' if name == 'plain' else ''}g"
        assert entries[uri] == uri          # fetched like any other object
    assert stats.files >= 1 and stats.rows == len(_rows())
    assert (stats.images, stats.delete_markers, stats.old_versions, stats.not_images) == (len(want), 1, 1, 2)


@pytest.mark.parametrize("files", [1, 3])
def test_csv_report(s3, files):
    uri = put_inventory(s3, source_bucket="src", rows=_rows(), files=files)
    st = InventoryStats()
    objs = list(iter_inventory(uri, stats=st))
    _check(objs, st)
    assert st.files == files and st.manifest == uri
    assert f"{st.rows} rows in {files} files, {st.images} images" in st.line()


def test_parquet_report(s3):
    pytest.importorskip("pyarrow")
    uri = put_inventory(s3, source_bucket="src", rows=_rows(), fmt="Parquet", files=2)
    st = InventoryStats()
    _check(list(iter_inventory(uri, stats=st)), st)


def test_parquet_without_pyarrow_says_what_to_install(s3, monkeypatch):
    uri = put_inventory(s3, source_bucket="src", rows=_rows()[:2], fmt="Parquet" if _has_pyarrow() else "CSV")
    if not _has_pyarrow():
        pytest.skip("needs pyarrow to write the report")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)     # import pyarrow.parquet -> ImportError
    with pytest.raises(ConfigError, match=r"Parquet.*pip install 'hardnet-queue\[parquet\]'"):
        list(iter_inventory(uri))


def _has_pyarrow() -> bool:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def test_orc_is_refused(s3):
    uri = put_inventory(s3, source_bucket="src", rows=_rows()[:2], fmt="ORC")
    with pytest.raises(ConfigError, match="ORC inventory reports are not supported.*CSV or Parquet"):
        list(iter_inventory(uri))


def test_latest_report_of_a_configuration_folder(s3):
    put_inventory(s3, source_bucket="src", rows=_rows()[:1], when="2026-11-30T00-00Z")
    newest = put_inventory(s3, source_bucket="src", rows=_rows()[:2], when="2026-12-01T00-00Z")
    s3.put_object(Bucket="inv", Key="inventories/src/daily/hive/dt=2026-12-01-00-00/symlink.txt", Body=b"x")
    folder = "s3://inv/inventories/src/daily/"
    assert resolve_manifest(folder) == newest
    assert resolve_manifest(folder.rstrip("/")) == newest
    assert len(list(iter_inventory(folder))) == 2
    assert identity(f"inventory:{newest}") == f"inventory:{folder}"
    with pytest.raises(ConfigError, match="no inventory report under"):
        resolve_manifest("s3://inv/inventories/src/")


def test_checksums_are_checked(s3):
    uri = put_inventory(s3, source_bucket="src", rows=_rows(), corrupt_md5=True)
    with pytest.raises(ConfigError, match="does not match the manifest's MD5checksum"):
        list(iter_inventory(uri))
    uri = put_inventory(s3, source_bucket="src", rows=_rows(), when="2026-12-02T00-00Z")
    key = uri.split("/", 3)[3].replace("manifest.json", "manifest.checksum")
    s3.put_object(Bucket="inv", Key=key, Body=b"0" * 32)
    with pytest.raises(ConfigError, match="does not match its manifest.checksum"):
        list(iter_inventory(uri))


def test_bad_reports(s3, tmp_path):
    s3.create_bucket(Bucket="inv")
    with pytest.raises(ConfigError, match="no such object"):
        list(iter_inventory("s3://inv/nothing/manifest.json"))
    s3.put_object(Bucket="inv", Key="m/manifest.json", Body=b'{"files": []}')
    with pytest.raises(ConfigError, match="not an S3 Inventory manifest .missing sourceBucket"):
        list(iter_inventory("s3://inv/m/manifest.json"))
    s3.put_object(Bucket="inv", Key="m2/manifest.json",
                  Body=b'{"sourceBucket": "s", "destinationBucket": "arn:aws:s3:::inv", "fileFormat": "CSV",'
                       b' "fileSchema": "Bucket, Size", "files": []}')
    with pytest.raises(ConfigError, match="no Key column"):
        list(iter_inventory("s3://inv/m2/manifest.json"))
    with pytest.raises(ConfigError, match="does not exist"):
        list(iter_inventory("s3://no-such-inventory-bucket/x/manifest.json"))
    local = tmp_path / "manifest.json"
    local.write_text("not json")
    with pytest.raises(ConfigError, match="not JSON"):
        list(iter_inventory(str(local)))
