"""A chunk's part: encoding its records in each output format, writing it (:func:`write_part`),
the chunk_failed part of a dead letter (:func:`dead_letter`), and reading parts back (`hardnet
results`, `hardnet resume`, `hardnet report`). Torch-free; pyarrow is needed only for Parquet
(the ``parquet`` extra) and imported only then.

Part names are deterministic (part-<chunk>), so a retried or duplicated chunk overwrites its own
part instead of adding records.

JSON Lines (``part-NNNNN.jsonl``): one :class:`~hnq.schema.ResultRecord` per line, as always.

Parquet (``part-NNNNN.parquet``): one file per chunk, one row per record, zstd-compressed, the
schema :data:`PARQUET_COLUMNS` (documented in docs/output.md with DuckDB and Athena examples):

  uri string, status string,
  top1_index int16, top1_label string, top1_score float32,          (null for an error record)
  topk list<struct<index int16, label string, score float32>>,      (null for an error record)
  error_code string, error_message string,                          (null for an ok record)
  tag_error_code string, tag_error_message string,                  (null unless a tag failed)
  model string, weights string, job_id string, etag string, size int64

Why nested top-k *and* flat top-1 columns: the question asked of almost every such table is about
the first label ("how many cats", "everything under 0.3"): flat columns answer it with a plain
WHERE / GROUP BY in DuckDB, Athena, Spark and pandas alike, with column statistics that let
engines skip row groups. The full top-k stays together as one list of structs (not parallel lists
that could be misaligned), which DuckDB (``topk[1].label``, ``unnest``), Athena/Trino
(``topk[1].label``, ``CROSS JOIN UNNEST``) and pyarrow/pandas (a list of dicts per row) read
directly. Scores are float32 (softmax probabilities need no more; half the bytes); the index fits
int16 (0..999).

The file's key-value metadata holds ``hardnet.schema`` (1), ``hardnet.top_k`` and the job id, so
a reader can turn rows back into the exact records a JSON Lines job would have written
(:func:`decode_part`): `hardnet results` prints the same JSON Lines for either format.
"""
from __future__ import annotations

import io
import json
import logging
import time
from typing import Callable, Iterable, Iterator

from hnq.errors import ConfigError, ErrorCode
from hnq.jobs.finish import finalize_or_fail, is_complete_unfinished
from hnq.jobs.inputs import OutputPolicy, check_output, read_chunk_uris
from hnq.jobs.store import JobStore
from hnq.options import TOP_K_DEFAULT, JobOptions
from hnq.schema import ChunkTask, ResultRecord
from hnq.storage import open_destination

log = logging.getLogger("hardnet.worker")

#: Told (seconds the write took, the records written) once a part is stored: the worker's metrics
#: (worker.metrics.part_written), which this torch-free core does not import.
WriteObserver = Callable[[float, list[ResultRecord]], None]

JSONL_TYPE = "application/x-ndjson"
PARQUET_TYPE = "application/vnd.apache.parquet"
PARQUET_SCHEMA_VERSION = "1"

#: (name, type, meaning) of every Parquet column, in order (docs/output.md is generated from the
#: same words; tests check the file against it)
PARQUET_COLUMNS: list[tuple[str, str, str]] = [
    ("uri", "string", "the input URI, as submitted"),
    ("status", "string", "`ok` (labelled) or `error`"),
    ("top1_index", "int16", "ImageNet class index of the best label (null for errors)"),
    ("top1_label", "string", "its class name"),
    ("top1_score", "float32", "its softmax probability"),
    ("topk", "list<struct<index: int16, label: string, score: float32>>",
     "the job's top-k labels, best first (k = `--top-k`, default 5; null for errors)"),
    ("error_code", "string", "stable error code (README) when status is `error`"),
    ("error_message", "string", "what went wrong, for people"),
    ("tag_error_code", "string", "`tag_error` when `--tag` could not write the object's tags (status stays ok)"),
    ("tag_error_message", "string", "why"),
    ("model", "string", "HarDNet variant"),
    ("weights", "string", "`official`, `random` or the checkpoint's file name"),
    ("job_id", "string", "the job"),
    ("etag", "string", "the source object's ETag, where the store gives one"),
    ("size", "int64", "the source object's size in bytes, where known"),
]


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ConfigError(
            f"Parquet output needs pyarrow, which is not installed here ({e}); install the parquet "
            "extra: pip install 'hardnet-queue[parquet]' (or use --format jsonl)") from None
    return pa, pq


def require_pyarrow() -> None:
    """ConfigError (what to install) unless pyarrow can be imported here."""
    _pyarrow()


def parquet_available() -> bool:
    try:
        _pyarrow()
    except ConfigError:
        return False
    return True


def arrow_schema():
    pa, _ = _pyarrow()
    label = pa.struct([("index", pa.int16()), ("label", pa.string()), ("score", pa.float32())])
    types = {"string": pa.string(), "int16": pa.int16(), "float32": pa.float32(), "int64": pa.int64()}
    fields = []
    for name, typ, _ in PARQUET_COLUMNS:
        t = pa.list_(label) if name == "topk" else types[typ]
        fields.append(pa.field(name, t, nullable=name not in ("uri", "status", "model")))
    return pa.schema(fields)


def _code(c) -> str:
    return str(getattr(c, "value", c))


def _row(r: ResultRecord) -> dict:
    labels = r.labels
    top = labels[0] if labels else None
    return {
        "uri": r.uri, "status": r.status,
        "top1_index": top.index if top else None,
        "top1_label": top.label if top else None,
        "top1_score": top.score if top else None,
        "topk": [{"index": x.index, "label": x.label, "score": x.score} for x in labels] if labels else None,
        "error_code": _code(r.error.code) if r.error else None,
        "error_message": r.error.message if r.error else None,
        "tag_error_code": _code(r.tag_error.code) if r.tag_error else None,
        "tag_error_message": r.tag_error.message if r.tag_error else None,
        "model": r.model, "weights": r.weights, "job_id": r.job_id, "etag": r.etag, "size": r.size,
    }


def to_jsonl(records: Iterable[ResultRecord]) -> bytes:
    return "".join(r.to_json() + "\n" for r in records).encode()


def to_parquet(records: list[ResultRecord], *, top_k: int = TOP_K_DEFAULT, job_id: str | None = None) -> bytes:
    pa, pq = _pyarrow()
    schema = arrow_schema().with_metadata({
        "hardnet.schema": PARQUET_SCHEMA_VERSION, "hardnet.top_k": str(top_k),
        "hardnet.job_id": job_id or "", "hardnet.columns": json.dumps([c[0] for c in PARQUET_COLUMNS])})
    table = pa.Table.from_pylist([_row(r) for r in records], schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def encode_part(records: list[ResultRecord], fmt: str, *, top_k: int = TOP_K_DEFAULT,
                job_id: str | None = None) -> tuple[bytes, str]:
    """(bytes, content type) of a chunk's part in ``fmt``."""
    if fmt == "jsonl":
        return to_jsonl(records), JSONL_TYPE
    if fmt == "parquet":
        return to_parquet(records, top_k=top_k, job_id=job_id), PARQUET_TYPE
    raise ConfigError(f"unknown output format {fmt!r}: jsonl or parquet")


def write_part(store: JobStore, dest: str | None, job_id: str, chunk: int, records: list[ResultRecord],
               options: JobOptions | None = None, *, observe: WriteObserver | None = None) -> None:
    """Store the chunk's part in the job's format, at the destination or (no destination) in
    Redis; then ``observe`` the write's time and its records (a failed write observes nothing).
    Parquet only to a destination (submit refuses it without --out, and a worker refuses a message
    that asks for it)."""
    t0 = time.monotonic()
    fmt = options.format if options else "jsonl"
    top_k = options.top_k if options else 5
    if fmt != "jsonl" and not dest:
        raise ConfigError(f"{fmt} parts need a destination (--out); results kept in Redis are JSON Lines")
    data, ctype = encode_part(records, fmt, top_k=top_k, job_id=job_id)
    if dest:
        d = open_destination(dest)
        d.put(d.part_path(job_id, chunk, fmt), data, content_type=ctype)
    else:
        store.put_part(job_id, chunk, data)
    if observe is not None:
        observe(time.monotonic() - t0, records)


def dead_letter(store: JobStore, task: ChunkTask, uris: list[str] | None, error: str, attempts: int,
                policy: OutputPolicy | None = None, write: bool = True, *,
                observe: WriteObserver | None = None) -> str:
    """Give up on a chunk. Returns "kept" when an earlier attempt had completed it (its part and
    counts are left alone: a dead letter never overwrites a completed part), else "dead": the chunk
    is counted as failed, listed as a dead letter for `hardnet redrive`, and — when ``write`` and
    its URIs are known — every URI gets a chunk_failed record in its part (``observe``: as for
    :func:`write_part`). When this was the last chunk the job is finalised, and marked failed if
    even that fails (never left running)."""
    job, chunk = task.job_id, task.chunk
    finished = store.complete_dead(job, chunk, task.count, error, attempts)
    if finished is None:
        log.warning("chunk %s/%d was completed by an earlier attempt: its part is kept (delivery %d "
                    "after: %s)", job, chunk, attempts, error)
        if is_complete_unfinished(store, job):
            finalize_or_fail(store, job, policy)
        return "kept"
    log.error("chunk %s/%d dead-lettered after %d attempts: %s", job, chunk, attempts, error)
    if write and task.dest:
        try:
            check_output(task.dest, policy)
        except ConfigError:
            write = False     # a destination this worker may not use gets nothing from it
    if write and uris is None:
        try:
            got = read_chunk_uris(store, task.dest, job, chunk)
            uris = got[0] if got and len(got[0]) == task.count else None
        except Exception:  # noqa: BLE001 - the inputs may be what is failing
            uris = None
    if write and uris is not None:
        msg = f"chunk failed after {attempts} attempts: {error}"
        records = [ResultRecord.failure(u, ErrorCode.chunk_failed, msg, task.model, job_id=job) for u in uris]
        try:
            write_part(store, task.dest, job, chunk, records, task.options, observe=observe)
        except Exception as e:  # noqa: BLE001 - the destination itself may be what is failing
            log.error("could not write the failure records of %s/%d: %s", job, chunk, e)
        if store.is_completed(job, chunk):
            log.error("chunk %s/%d completed by another attempt while it was being dead-lettered: its "
                      "part may hold chunk_failed records although the job counts it as labelled", job, chunk)
    if finished:
        finalize_or_fail(store, job, policy)
    return "dead"


def _record_from_row(row: dict, top_k: int | None) -> ResultRecord:
    labels = row.get("topk")
    d: dict = {"uri": row["uri"], "status": row["status"], "model": row.get("model") or ""}
    if labels is not None:
        # float32 back to the 6 decimals the worker rounded to: the same numbers as in JSON Lines
        labels = [{"index": x["index"], "label": x["label"], "score": round(float(x["score"]), 6)}
                  for x in labels]
        k = top_k if top_k is not None else len(labels)
        d["top5" if k == TOP_K_DEFAULT else "topk"] = labels
    if row.get("error_code"):
        d["error"] = {"code": row["error_code"], "message": row.get("error_message") or ""}
    if row.get("tag_error_code"):
        d["tag_error"] = {"code": row["tag_error_code"], "message": row.get("tag_error_message") or ""}
    for k2 in ("weights", "job_id", "etag", "size"):
        if row.get(k2) is not None:
            d[k2] = row[k2]
    return ResultRecord.model_validate(d)


def iter_parquet_records(data: bytes) -> Iterator[ResultRecord]:
    """The records of a Parquet part, as the worker made them (row group by row group)."""
    _, pq = _pyarrow()
    f = pq.ParquetFile(io.BytesIO(data))
    meta = f.schema_arrow.metadata or {}
    raw_k = meta.get(b"hardnet.top_k")
    top_k = int(raw_k) if raw_k else None
    for i in range(f.num_row_groups):
        for row in f.read_row_group(i).to_pylist():
            yield _record_from_row(row, top_k)


def decode_part(data: bytes, fmt: str) -> Iterator[ResultRecord]:
    """The records of a part in ``fmt``."""
    if fmt == "parquet":
        yield from iter_parquet_records(data)
        return
    for line in data.decode("utf-8", "replace").splitlines():
        if line.strip():
            yield ResultRecord.model_validate_json(line)


def part_jsonl_lines(data: bytes, fmt: str) -> Iterator[str]:
    """JSON Lines of a part (no trailing newlines): a jsonl part's lines as stored, a Parquet
    part's rows turned back into the records a jsonl job would have written."""
    if fmt == "jsonl":
        for line in data.decode("utf-8", "replace").splitlines():
            if line.strip():
                yield line
        return
    for r in iter_parquet_records(data):
        yield r.to_json()


def format_of_part(name: str) -> str:
    return "parquet" if name.endswith(".parquet") else "jsonl"


__all__ = ["PARQUET_COLUMNS", "arrow_schema", "require_pyarrow", "encode_part", "decode_part", "part_jsonl_lines",
           "to_jsonl", "to_parquet", "iter_parquet_records", "parquet_available", "format_of_part",
           "write_part", "dead_letter", "WriteObserver"]
