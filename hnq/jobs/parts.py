"""A chunk's part: encoding its records in each output format, writing it (:func:`write_part`),
the chunk_failed part of a dead letter (:func:`dead_letter`), and reading parts back (`hardnet
results`, `hardnet resume`, `hardnet report`). Torch-free; pyarrow is needed only for Parquet
(the ``parquet`` extra) and imported only then.

Part names are deterministic (part-<chunk>), so a retried or duplicated chunk never adds records;
parts are written conditionally (:func:`write_part`), so a complete part is never overwritten by a
later, worse attempt (a dead letter's chunk_failed records, a late duplicate).
Long: the part's formats, its conditional write, the records kept across attempts and the dead
letter are one rule about what a chunk's part may hold.

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
from collections import Counter
from typing import Callable, Iterable, Iterator

from hnq.errors import ConfigError, ErrorCode, TransientError
from hnq.jobs.finish import finalize_or_fail, is_complete_unfinished
from hnq.jobs.inputs import OutputPolicy, check_output, read_chunk_uris
from hnq.jobs.store import JobStore
from hnq.objects import PrecodedRecords
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
    if isinstance(records, PrecodedRecords):     # a chunk of archived objects: its lines directly
        return records.jsonl()
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


#: codes of images that gave up on a transient failure: never kept across attempts (fetched again)
TRANSIENT_CODES = frozenset({ErrorCode.throttled.value, ErrorCode.timeout.value, ErrorCode.fetch_error.value})


# --- records kept across attempts ------------------------------------------------------------
# The API for anything that stops a chunk half-way (a storage-down retry, a part write that
# failed, a worker asked to stop): keep_records() what is finished, by position in the chunk's
# inputs; the chunk's next attempt reads kept_records() and fetches only the other positions; the
# records are dropped once the chunk's part is written and counted (drop_kept).
def keep_records(store: JobStore | None, job_id: str, chunk: int, records: dict[int, ResultRecord]) -> int:
    """Keep ``records`` (position in the chunk -> record) for the chunk's next attempt, in Redis
    (hnq:job:ID:kept:N, the job's TTL). Records of transient give-ups (throttled, timeout,
    fetch_error) are not kept: the next attempt fetches them again. Returns how many were kept."""
    keep = {i: r.to_json() for i, r in records.items()
            if r is not None and not (r.error is not None and _code(r.error.code) in TRANSIENT_CODES)}
    if store is not None and keep:
        store.keep_records(job_id, chunk, keep)
    return len(keep)


def kept_records(store: JobStore | None, job_id: str, chunk: int,
                 uris: list[str] | Callable[[], list[str]]) -> dict[int, ResultRecord]:
    """The records an earlier attempt kept, by position; only those whose URI is still the one at
    that position of ``uris`` (the stored inputs; a callable that makes them is called only when
    records were kept)."""
    if store is None:
        return {}
    out = {}
    stored = store.kept_records(job_id, chunk)
    if stored and callable(uris):
        uris = uris()
    for i, raw in stored.items():
        try:
            r = ResultRecord.model_validate_json(raw)
        except ValueError:
            continue
        if 0 <= i < len(uris) and r.uri == uris[i]:
            out[i] = r
    return out


def drop_kept(store: JobStore | None, job_id: str, chunk: int) -> None:
    if store is not None:
        store.drop_kept(job_id, chunk)


# --- writing a part that cannot regress ------------------------------------------------------
def complete_part(data: bytes, fmt: str, uris: list[str]) -> list[ResultRecord] | None:
    """The records of a stored part when it is complete — one record for each of ``uris`` and no
    chunk_failed record — else None (unreadable, partial, or a dead letter's part)."""
    try:
        recs = list(decode_part(data, fmt))
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - unreadable: not complete
        return None
    if len(recs) != len(uris) or sorted(r.uri for r in recs) != sorted(uris):
        return None
    if any(r.error is not None and _code(r.error.code) == ErrorCode.chunk_failed.value for r in recs):
        return None
    return recs


def write_part(store: JobStore | None, dest: str | None, job_id: str, chunk: int, records: list[ResultRecord],
               options: JobOptions | None = None, *, observe: WriteObserver | None = None) -> list[ResultRecord]:
    """Store the chunk's part in the job's format, at the destination or (no destination) in
    Redis, with conditional writes so that a complete part never regresses: the part is created
    only if absent (S3 ``If-None-Match: *``, a file linked in O_EXCL-style, Redis only-if-absent);
    an existing part that is complete (:func:`complete_part`) stands and its records are returned
    instead of ``records``; any other (a dead letter's chunk_failed part, an unreadable one) is
    replaced only if it is still the version that was read (``If-Match: ETag``). Then ``observe``
    the write's time and its records (nothing observed when the part was not ours). Returns the
    records the part holds. Parquet only to a destination."""
    t0 = time.monotonic()
    fmt = options.format if options else "jsonl"
    top_k = options.top_k if options else 5
    if fmt != "jsonl" and not dest:
        raise ConfigError(f"{fmt} parts need a destination (--out); results kept in Redis are JSON Lines")
    data, ctype = encode_part(records, fmt, top_k=top_k, job_id=job_id)
    if dest:
        d = open_destination(dest)
        path = d.part_path(job_id, chunk, fmt)

        def put(expect: str | None) -> bool:
            return d.put_if(path, data, ctype, expect=expect)

        def get() -> tuple[bytes, str] | None:
            return d.get_versioned(path)
    else:
        def put(expect: str | None) -> bool:
            return store.put_part_if(job_id, chunk, data, expect)

        def get() -> tuple[bytes, str] | None:
            return store.get_part_versioned(job_id, chunk)
    for _ in range(8):
        if put(None):
            break
        got = get()
        if got is None:
            continue          # deleted between the two calls: create it
        old, version = got
        stands = complete_part(old, fmt, [r.uri for r in records])
        if stands is not None:
            log.info("part %s/%d: a complete part written by another attempt stands", job_id, chunk)
            return stands
        if put(version):
            break
    else:
        raise TransientError(f"part {job_id}/{chunk} kept changing while this attempt wrote it")
    if observe is not None:
        observe(time.monotonic() - t0, records)
    return records


def _counts(records: list[ResultRecord]) -> tuple[int, dict[str, int]]:
    codes: Counter = Counter(_code(r.error.code) for r in records if r.error is not None)
    codes.update(_code(r.tag_error.code) for r in records if r.tag_error is not None)
    return sum(r.status == "ok" for r in records), dict(codes)


def dead_letter(store: JobStore, task: ChunkTask, uris: list[str] | None, error: str, attempts: int,
                policy: OutputPolicy | None = None, write: bool = True, *,
                observe: WriteObserver | None = None) -> str:
    """Give up on a chunk. Returns "kept" when another attempt completed it (its part and counts
    stand: a dead letter never overwrites a complete part), else "dead": the chunk is listed as a
    dead letter for `hardnet redrive` and — when ``write`` and its URIs are known — its part holds
    the records earlier attempts kept (:func:`keep_records`) and a chunk_failed record for every
    other URI, counted as such (all chunk_failed when the part could not be written). When this was
    the last chunk the job is finalised, and marked failed if even that fails (never left running).

    The race with a late attempt that completes meanwhile is closed, not logged: the failure part
    is only created where no part is, or replaces a part that is not complete; a good attempt's
    part replaces a failure part; whoever finds a complete part counts it (Lua, once); and
    recording the dead letter is refused once the chunk is counted complete."""
    job, chunk = task.job_id, task.chunk
    if store.is_completed(job, chunk):
        return _kept(store, task, attempts, error, policy)
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
    ok, codes = 0, None
    if write and uris is not None:
        kept = kept_records(store, job, chunk, uris)
        msg = f"chunk failed after {attempts} attempts: {error}"
        records = [kept.get(i) or ResultRecord.failure(u, ErrorCode.chunk_failed, msg, task.model, job_id=job)
                   for i, u in enumerate(uris)]
        try:
            held = write_part(store, task.dest, job, chunk, records, task.options, observe=observe)
        except Exception as e:  # noqa: BLE001 - the destination itself may be what is failing
            log.error("could not write the failure records of %s/%d: %s", job, chunk, e)
        else:
            if held is not records:
                # another attempt completed the chunk meanwhile: its part stands; count it (once)
                ok, codes = _counts(held)
                finished = store.complete_chunk(job, chunk, ok, len(held) - ok, codes=codes,
                                                weights=next((r.weights for r in held if r.weights), None))
                log.warning("chunk %s/%d was completed by another attempt while it was being "
                            "dead-lettered: its part stands and is counted", job, chunk)
                drop_kept(store, job, chunk)
                if finished:
                    finalize_or_fail(store, job, policy)
                return "kept"
            ok, codes = _counts(records)
    finished = store.complete_dead(job, chunk, task.count, error, attempts, ok=ok, codes=codes)
    if finished is None:
        return _kept(store, task, attempts, error, policy)
    log.error("chunk %s/%d dead-lettered after %d attempts: %s", job, chunk, attempts, error)
    if finished:
        finalize_or_fail(store, job, policy)
    return "dead"


def _kept(store: JobStore, task: ChunkTask, attempts: int, error: str, policy: OutputPolicy | None) -> str:
    job, chunk = task.job_id, task.chunk
    log.warning("chunk %s/%d was completed by an earlier attempt: its part is kept (delivery %d "
                "after: %s)", job, chunk, attempts, error)
    if is_complete_unfinished(store, job):
        finalize_or_fail(store, job, policy)
    return "kept"


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
           "write_part", "dead_letter", "WriteObserver", "complete_part", "keep_records", "kept_records",
           "drop_kept", "TRANSIENT_CODES"]
