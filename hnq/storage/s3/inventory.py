"""S3 Inventory reports as a source: ``hardnet submit --inventory s3://BUCKET/PREFIX/manifest.json``.

An S3 Inventory configuration delivers, daily or weekly, into its destination bucket::

    DEST-PREFIX/SOURCE-BUCKET/CONFIG-ID/YYYY-MM-DDTHH-MMZ/manifest.json   (+ manifest.checksum)
    DEST-PREFIX/SOURCE-BUCKET/CONFIG-ID/data/*.csv.gz | *.parquet | *.orc

``manifest.json`` names the source bucket (``sourceBucket``), where the data files are
(``destinationBucket``, an ARN ``arn:aws:s3:::NAME``), their format (``fileFormat``: CSV, Parquet
or ORC), their columns (``fileSchema``) and the files (``files: [{key, size, MD5checksum}]``).

``--inventory`` takes a ``manifest.json`` (``s3://`` or a local copy), or the configuration's
folder ``s3://…/CONFIG-ID/``: then the latest ``YYYY-MM-DDTHH-MMZ/manifest.json`` under it is read,
so a nightly command line need not change.

What is read, in bounded memory (rows are streamed; a Parquet file is downloaded to a temporary
file and read in record batches):

* **CSV** (``.csv.gz``, no header): columns in ``fileSchema`` order. The key is URL-encoded in
  CSV reports (AWS: "the key name is URL-encoded and must be decoded"; a space is ``+``, a ``+`` is
  ``%2B``), so it is decoded with ``unquote_plus``. Parquet keys are plain.
* **Parquet** when pyarrow is importable (``pip install 'hardnet-queue[parquet]'``; a clear
  ConfigError says so otherwise). **ORC** is refused (configure the report as CSV or Parquet).
* Rows that are delete markers (``IsDeleteMarker``) or not the latest version (``IsLatest``) are
  skipped when the report has those columns (``IncludedObjectVersions: All``); folder markers and
  keys without an image extension (:mod:`hnq.formats`; ``--extensions`` chooses, counted per
  extension for the job's ``skipped_by_extension``) are skipped.
* ``Size``, ``ETag``, ``StorageClass`` and ``IntelligentTieringAccessTier`` ride along on each
  :class:`~hnq.objects.SourceObject`: archived objects (GLACIER, DEEP_ARCHIVE, Intelligent-Tiering
  archive tiers) and 0-byte ones get their record without a fetch; the ETag lets
  ``--skip-labelled`` compare without a HEAD.
* Each data file's MD5 is checked against ``MD5checksum``, and ``manifest.json`` against
  ``manifest.checksum`` when that exists: a report that does not match is refused (ConfigError).
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import urllib.parse
from dataclasses import dataclass, field
from typing import Iterator

import botocore.exceptions as bex

from hnq.errors import ConfigError, TransientError
from hnq.formats import ExtensionFilter
from hnq.objects import SourceObject
from hnq.storage.base import clean_etag
from hnq.storage.s3.client import s3_client
from hnq.storage.s3.errors import code_and_status, listing_error
from hnq.storage.s3.listing import iter_folders
from hnq.uris import InvalidURI, file_uri_to_path, parse_s3, s3_uri, scheme_of

log = logging.getLogger("hardnet.inventory")

_REPORT_DIR = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}-\d{2}Z$")
#: the columns we use, by normalised name (lower case, no underscores: "e_tag" = "ETag")
_WANTED = ("bucket", "key", "islatest", "isdeletemarker", "size", "etag", "storageclass",
           "intelligenttieringaccesstier")
_PARQUET_HINT = ("reading it needs pyarrow: pip install 'hardnet-queue[parquet]'")


def _norm(name: str) -> str:
    return name.strip().replace("_", "").lower()


@dataclass
class InventoryStats:
    """What was read (``hardnet submit`` prints it)."""

    manifest: str = ""
    files: int = 0
    rows: int = 0
    images: int = 0
    not_images: int = 0
    delete_markers: int = 0
    old_versions: int = 0
    by_class: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        skipped = [f"{n} {what}" for n, what in ((self.not_images, "not images"),
                                                 (self.delete_markers, "delete markers"),
                                                 (self.old_versions, "older versions")) if n]
        return (f"inventory {self.manifest}: {self.rows} rows in {self.files} files, "
                f"{self.images} images" + (f" (skipped: {', '.join(skipped)})" if skipped else ""))


# ------------------------------------------------------------------------------ reading objects
def _get_error(e: BaseException, uri: str, what: str) -> Exception:
    if isinstance(e, bex.ClientError):
        code, status = code_and_status(e)
        if code in ("NoSuchKey", "NotFound") or (status == 404 and code != "NoSuchBucket"):
            return ConfigError(f"{uri}: no such object ({what})")
    bucket, key = parse_s3(uri)
    return listing_error(e, bucket, key)


def _get(uri: str, what: str):
    bucket, key = parse_s3(uri)
    try:
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"]
    except Exception as e:  # noqa: BLE001 - mapped
        raise _get_error(e, uri, what) from None


def _exists(bucket: str, key: str) -> bool:
    try:
        s3_client().head_object(Bucket=bucket, Key=key)
        return True
    except bex.ClientError as e:
        code, status = code_and_status(e)
        if status == 404 or code in ("NoSuchKey", "NotFound", "404"):
            return False
        raise listing_error(e, bucket, key) from None
    except Exception as e:  # noqa: BLE001
        raise listing_error(e, bucket, key) from None


def _read_bytes(uri: str, what: str) -> bytes:
    body = _get(uri, what)
    try:
        return body.read()
    except Exception as e:  # noqa: BLE001
        raise TransientError(f"{uri}: reading {what} failed ({type(e).__name__}: {e})") from None
    finally:
        body.close()


class _HashingReader(io.RawIOBase):
    """A file-like view of a streaming body that keeps the MD5 of what was read."""

    def __init__(self, body, uri: str):
        self.body, self.uri = body, uri
        self.md5 = hashlib.md5(usedforsecurity=False)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        try:
            data = self.body.read(len(b))
        except Exception as e:  # noqa: BLE001
            raise TransientError(f"{self.uri}: reading the inventory file failed "
                                 f"({type(e).__name__}: {e})") from None
        self.md5.update(data)
        b[:len(data)] = data
        return len(data)


# ------------------------------------------------------------------------------ the manifest
def resolve_manifest(spec: str) -> str:
    """The manifest.json that ``spec`` names: itself, or for a configuration folder
    (``s3://…/CONFIG-ID/``) its latest ``YYYY-MM-DDTHH-MMZ/manifest.json``."""
    if scheme_of(spec) != "s3":
        return spec
    try:
        bucket, key = parse_s3(spec, require_key=False)
    except InvalidURI as e:
        raise ConfigError(f"invalid --inventory {spec!r}: {e}") from None
    if key.endswith(".json"):
        return spec
    prefix = key if (not key or key.endswith("/")) else key + "/"
    dates = [name for name in iter_folders(bucket, prefix) if _REPORT_DIR.match(name)]
    for d in sorted(dates, reverse=True):
        if _exists(bucket, f"{prefix}{d}/manifest.json"):
            return s3_uri(bucket, f"{prefix}{d}/manifest.json")
    raise ConfigError(f"no inventory report under s3://{bucket}/{prefix}: expected "
                      "YYYY-MM-DDTHH-MMZ/manifest.json folders (give the inventory configuration's "
                      "folder, DEST-PREFIX/SOURCE-BUCKET/CONFIG-ID/, or a manifest.json)")


def identity(source: str) -> str:
    """What stays the same from one delivery of a report to the next: the configuration folder
    (``inventory:s3://…/CONFIG-ID/``) of an ``inventory:`` source, else the source itself."""
    if source.startswith("inventory:"):
        m = re.match(r"^(inventory:.*/)\d{4}-\d{2}-\d{2}T\d{2}-\d{2}Z/manifest\.json$", source)
        if m:
            return m.group(1)
    return source


def load_manifest(uri: str) -> dict:
    if scheme_of(uri) == "s3":
        data = _read_bytes(uri, "the inventory manifest")
        bucket, key = parse_s3(uri)
        if key.endswith("manifest.json") and _exists(bucket, key[:-len("json")] + "checksum"):
            want = _read_bytes(s3_uri(bucket, key[:-len("json")] + "checksum"), "manifest.checksum")
            got = hashlib.md5(data, usedforsecurity=False).hexdigest()
            if want.decode("ascii", "replace").strip().lower() != got:
                raise ConfigError(f"{uri}: does not match its manifest.checksum (MD5 {got}, checksum "
                                  f"file says {want.decode('ascii', 'replace').strip()[:64]}): a "
                                  "truncated or replaced report")
    else:
        try:
            with open(file_uri_to_path(uri), "rb") as f:
                data = f.read()
        except OSError as e:
            raise ConfigError(f"cannot read the inventory manifest {uri!r}: {e.strerror or e}") from None
    try:
        m = json.loads(data)
    except ValueError as e:
        raise ConfigError(f"{uri}: not an S3 Inventory manifest (not JSON: {e})") from None
    missing = [k for k in ("sourceBucket", "destinationBucket", "fileFormat", "files") if k not in m]
    if not isinstance(m, dict) or missing:
        raise ConfigError(f"{uri}: not an S3 Inventory manifest (missing {', '.join(missing) or 'everything'})")
    if not isinstance(m["files"], list) or not all(isinstance(f, dict) and "key" in f for f in m["files"]):
        raise ConfigError(f"{uri}: its 'files' are not a list of {{key, size, MD5checksum}}")
    return m


def _bucket_of(arn_or_name: str) -> str:
    name = arn_or_name.split(":::", 1)[1] if arn_or_name.startswith("arn:") else arn_or_name
    return name.split("/", 1)[0]


# ------------------------------------------------------------------------------ the rows
@dataclass
class Report:
    """A report whose manifest was read and found usable."""

    uri: str
    manifest: dict
    fmt: str        # CSV or PARQUET


def open_report(spec: str) -> Report:
    """Resolve and read the manifest, and refuse what cannot be read (ORC, Parquet without
    pyarrow, another format) now, before a job exists."""
    uri = resolve_manifest(spec)
    m = load_manifest(uri)
    fmt = str(m["fileFormat"]).strip().upper()
    if fmt == "ORC":
        raise ConfigError(f"{uri}: ORC inventory reports are not supported; configure the inventory's "
                          "output format as CSV or Parquet (Apache Parquet)")
    if fmt not in ("CSV", "PARQUET"):
        raise ConfigError(f"{uri}: unknown inventory fileFormat {m['fileFormat']!r} (CSV or Parquet)")
    if fmt == "PARQUET":
        try:  # imported here: pyarrow is optional, and heavy, and CSV reports never need it
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise ConfigError(f"{uri}: this inventory report is in Parquet; {_PARQUET_HINT}") from None
    return Report(uri, m, fmt)


def iter_inventory(spec: "str | Report", *, images_only: bool = True, tmpdir: str | None = None,
                   stats: InventoryStats | None = None, extensions: ExtensionFilter | None = None
                   ) -> Iterator[SourceObject]:
    """Stream the objects an inventory report lists (see the module doc). ``extensions``: which
    keys are kept, counting those left out (unset: the image extensions, or every key with
    ``images_only=False``)."""
    stats = stats if stats is not None else InventoryStats()
    keep = extensions if extensions is not None else (ExtensionFilter() if images_only else None)
    if keep is not None and keep.takes_all:
        keep = None
    report = spec if isinstance(spec, Report) else open_report(spec)
    uri, m, fmt = report.uri, report.manifest, report.fmt
    stats.manifest = uri
    source_bucket = str(m["sourceBucket"])
    data_bucket = _bucket_of(str(m["destinationBucket"]))
    schema = [_norm(c) for c in str(m.get("fileSchema", "")).split(",")] if fmt == "CSV" else None
    if schema is not None and "key" not in schema:
        raise ConfigError(f"{uri}: its fileSchema has no Key column: {m.get('fileSchema')!r}")
    for f in m["files"]:
        furi = s3_uri(data_bucket, f["key"])
        stats.files += 1
        rows = _csv_rows(furi, schema, f) if fmt == "CSV" else _parquet_rows(furi, f, tmpdir)
        for row in rows:
            stats.rows += 1
            obj = _object(row, source_bucket, stats, keep, decode=fmt == "CSV")
            if obj is not None:
                yield obj
    log.info(stats.line())


def _truthy(v) -> bool | None:
    if v is None or v == "":
        return None
    if isinstance(v, bool):
        return v
    return str(v).strip().lower() == "true"


def _object(row: dict, source_bucket: str, stats: InventoryStats, keep: ExtensionFilter | None,
            decode: bool) -> SourceObject | None:
    key = row.get("key")
    if not key:
        return None
    if decode:
        key = urllib.parse.unquote_plus(key)
    if _truthy(row.get("isdeletemarker")):
        stats.delete_markers += 1
        return None
    if _truthy(row.get("islatest")) is False:
        stats.old_versions += 1
        return None
    if key.endswith("/") or (keep is not None and not keep.keep(key)):
        stats.not_images += 1
        return None
    size = row.get("size")
    try:
        size = int(size) if size not in (None, "") else None
    except ValueError:
        size = None
    sc = row.get("storageclass") or None
    stats.images += 1
    stats.by_class[sc or "?"] = stats.by_class.get(sc or "?", 0) + 1
    return SourceObject(s3_uri(row.get("bucket") or source_bucket, key),
                        etag=clean_etag(row.get("etag") or None), size=size, storage_class=sc,
                        access_tier=row.get("intelligenttieringaccesstier") or None)


def _check_md5(furi: str, f: dict, got: str) -> None:
    want = str(f.get("MD5checksum") or "").strip().lower()
    if want and want != got:
        raise ConfigError(f"{furi}: MD5 {got} does not match the manifest's MD5checksum {want}: a "
                          "truncated or replaced inventory file")


def _csv_rows(furi: str, schema: list[str], f: dict) -> Iterator[dict]:
    body = _get(furi, "an inventory data file named by the manifest")
    raw = _HashingReader(body, furi)
    try:
        text = io.TextIOWrapper(gzip.GzipFile(fileobj=io.BufferedReader(raw, 1 << 20)),
                                encoding="utf-8", errors="surrogateescape", newline="")
        idx = {name: i for i, name in enumerate(schema) if name in _WANTED}
        try:
            for n, rec in enumerate(csv.reader(text), 1):
                if not rec:
                    continue
                if len(rec) != len(schema):
                    raise ConfigError(f"{furi}: row {n} has {len(rec)} columns, the manifest's "
                                      f"fileSchema {len(schema)}")
                yield {name: rec[i] for name, i in idx.items()}
        except (OSError, EOFError, csv.Error) as e:
            raise ConfigError(f"{furi}: not a gzip CSV inventory file ({e})") from None
        _check_md5(furi, f, raw.md5.hexdigest())
    finally:
        body.close()


def _parquet_rows(furi: str, f: dict, tmpdir: str | None) -> Iterator[dict]:
    import pyarrow.parquet as pq  # optional and heavy: only a Parquet report loads it

    body = _get(furi, "an inventory data file named by the manifest")
    md5 = hashlib.md5(usedforsecurity=False)
    fd, path = tempfile.mkstemp(prefix="hardnet-inventory-", suffix=".parquet", dir=tmpdir)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                while True:
                    block = body.read(1 << 20)
                    if not block:
                        break
                    md5.update(block)
                    out.write(block)
            except Exception as e:  # noqa: BLE001
                raise TransientError(f"{furi}: reading the inventory file failed ({type(e).__name__}: {e})") from None
            finally:
                body.close()
        _check_md5(furi, f, md5.hexdigest())
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises its own types
            raise ConfigError(f"{furi}: not a Parquet inventory file ({e})") from None
        names = {_norm(n): n for n in pf.schema_arrow.names}
        if "key" not in names:
            raise ConfigError(f"{furi}: the Parquet inventory file has no key column ({pf.schema_arrow.names})")
        cols = [names[w] for w in _WANTED if w in names]
        for batch in pf.iter_batches(batch_size=8192, columns=cols):
            data = {_norm(n): batch.column(n).to_pylist() for n in cols}
            keys = list(data)
            for i in range(batch.num_rows):
                yield {k: data[k][i] for k in keys}
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
