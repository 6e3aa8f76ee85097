"""Build S3 Inventory reports the way S3 delivers them (manifest.json, manifest.checksum, gzip CSV
data files without a header or Parquet files) into a (moto) bucket, for tests."""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import urllib.parse
from dataclasses import dataclass

SCHEMA = ["Bucket", "Key", "VersionId", "IsLatest", "IsDeleteMarker", "Size", "LastModifiedDate",
          "ETag", "StorageClass", "IntelligentTieringAccessTier"]


@dataclass
class Row:
    key: str
    size: int | None = 0
    etag: str | None = None
    storage_class: str = "STANDARD"
    is_latest: bool = True
    delete_marker: bool = False
    version: str = "v1"
    tier: str = ""


def rows_for(s3, bucket: str, keys: list[str]) -> list[Row]:
    """Rows for objects that exist (ETag, size and storage class from a HEAD, as S3 would list them)."""
    out = []
    for k in keys:
        h = s3.head_object(Bucket=bucket, Key=k)
        out.append(Row(k, h["ContentLength"], h["ETag"].strip('"'), h.get("StorageClass", "STANDARD")))
    return out


def _csv_gz(bucket: str, rows: list[Row]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n")
    for i, r in enumerate(rows):
        # S3 URL-encodes CSV keys (space as '+'); both '/' kept and '/' encoded decode the same
        key = urllib.parse.quote_plus(r.key, safe="/" if i % 2 else "")
        w.writerow([bucket, key, r.version, str(r.is_latest).lower(), str(r.delete_marker).lower(),
                    "" if r.size is None else str(r.size), "2026-11-30T00:00:00.000Z", r.etag or "",
                    r.storage_class, r.tier])
    return gzip.compress(buf.getvalue().encode())


def _parquet(bucket: str, rows: list[Row]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pa.table({
        "bucket": [bucket] * len(rows), "key": [r.key for r in rows],
        "version_id": [r.version for r in rows], "is_latest": [r.is_latest for r in rows],
        "is_delete_marker": [r.delete_marker for r in rows],
        "size": pa.array([r.size for r in rows], pa.int64()),
        "e_tag": [r.etag for r in rows], "storage_class": [r.storage_class for r in rows],
        "intelligent_tiering_access_tier": [r.tier or None for r in rows],
    })
    b = io.BytesIO()
    pq.write_table(t, b)
    return b.getvalue()


def put_inventory(s3, *, source_bucket: str, rows: list[Row], fmt: str = "CSV", inv_bucket: str = "inv",
                  config: str = "daily", when: str = "2026-12-01T00-00Z", files: int = 1,
                  checksum: bool = True, corrupt_md5: bool = False, data_files=None) -> str:
    """Write one report; returns its manifest URI (s3://inv_bucket/PREFIX/manifest.json).
    ``data_files``: an iterable of data files already encoded in ``fmt`` (one report file each,
    e.g. a benchmark's million rows made without a Row per object), instead of ``rows``."""
    try:
        s3.create_bucket(Bucket=inv_bucket)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    base = f"inventories/{source_bucket}/{config}"
    ext = {"CSV": "csv.gz", "Parquet": "parquet", "ORC": "orc"}[fmt]
    entries = []
    if data_files is None:
        data_files = (_csv_gz(source_bucket, rows[n::files]) if fmt == "CSV" else
                      (_parquet(source_bucket, rows[n::files]) if fmt == "Parquet" else b"ORC")
                      for n in range(files))
    for n, data in enumerate(data_files):
        key = f"{base}/data/{when}-{n}.{ext}"
        s3.put_object(Bucket=inv_bucket, Key=key, Body=data)
        md5 = hashlib.md5(data).hexdigest()
        entries.append({"key": key, "size": len(data), "MD5checksum": "0" * 32 if corrupt_md5 else md5})
    schema = (", ".join(SCHEMA) if fmt == "CSV" else
              "message s3.inventory { required binary bucket (STRING); required binary key (STRING); }")
    manifest = {"sourceBucket": source_bucket, "destinationBucket": f"arn:aws:s3:::{inv_bucket}",
                "version": "2016-11-30", "creationTimestamp": "1764547200000", "fileFormat": fmt,
                "fileSchema": schema, "files": entries}
    body = json.dumps(manifest, indent=2).encode()
    mkey = f"{base}/{when}/manifest.json"
    s3.put_object(Bucket=inv_bucket, Key=mkey, Body=body)
    if checksum:
        s3.put_object(Bucket=inv_bucket, Key=f"{base}/{when}/manifest.checksum",
                      Body=hashlib.md5(body).hexdigest().encode())
    return f"s3://{inv_bucket}/{mkey}"
