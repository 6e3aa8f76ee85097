"""The *labelled index* of a job: which objects (URI and ETag) it has an ok record for, and in
which part that record is. ``hardnet submit --skip-labelled`` reads it to leave out what an
earlier job already labelled, without holding the earlier records in memory.

Layout, under the job's folder::

    DEST/JOB/index/meta.json              written last (its presence means the index is complete)
    DEST/JOB/index/shard-XXXX.jsonl.gz    ["uri", "etag", "job", "part"] per line, sorted by URI
    DEST/JOB/reused/bucket-XX.jsonl.gz    the same rows, for the objects this job skipped because
                                          an earlier job had labelled them (written by submit)

* **Sharded by hash**: a URI's shard is the top ``bits`` bits of the 64-bit BLAKE2b of its UTF-8
  bytes; ``bits`` is chosen when the index is built so that a shard holds about
  :data:`SHARD_TARGET` entries (2**bits shards, at most 2**:data:`MAX_BITS`). Empty shards are not
  written; ``meta.json`` lists the ones that exist. A reader holds one shard at a time.
* **Cumulative**: a job's index holds its own ok records *and* the rows it reused, which point at
  the job that holds the record (``job``, ``part``). So the index of the latest job covers
  everything labelled and still current, and a nightly run reads one index, not one per night.
  An object that disappeared from the source drops out of the next index; one that changed
  (another ETag) is labelled again.
* **When**: a job submitted with ``--skip-labelled``, ``--since`` or ``--index`` has its index
  built when it is finalised (:func:`hnq.jobs.finish.finalize`, once every part is there, before the
  manifest and the final state; a failure is logged and leaves the job to finish as it would). A job without one (older, or submitted without those options) has
  it built from its parts by the first ``--skip-labelled`` run that needs it.
* Only ok records with an ETag are indexed: error records are labelled again, and sources whose
  records have no ETag (local files, http) are always labelled.

Parts in JSON Lines are read as such; ``.parquet`` parts (``submit --format parquet``) with
pyarrow, from their ``uri``, ``status`` and ``etag`` columns.

**Building** (:func:`build_index`): with pyarrow (the worker image has it: the ``worker`` extra)
the parts are read by a few threads and parsed by Arrow's JSON reader (only ``uri``, ``status``,
``etag``), the rows are spilled in Arrow IPC files by the top 8 bits of their hash (at most
``flush_lines`` rows held while reading), then each shard is deduplicated and sorted by Arrow and
written in the format above, byte for byte what the plain-Python builder writes (kept for a
producer without pyarrow, and for a part Arrow cannot parse). Measured in docs/performance.md
("Finalisation").

Long: the index's format, its reader and its two builders change together.
"""
from __future__ import annotations

import bisect
import gzip
import hashlib
import io
import itertools
import json
import logging
import os
import re
import shutil
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Callable, Iterable, Iterator

from hnq.errors import ConfigError
from hnq.storage import open_destination
from hnq.storage.base import Destination

log = logging.getLogger("hardnet.index")

INDEX_VERSION = 1
HASH_NAME = "blake2b-64"
#: entries per shard the number of shards is chosen for
SHARD_TARGET = 65536
#: at most 2**MAX_BITS shards (beyond 67 M entries shards grow past the target)
MAX_BITS = 10
#: the buckets of the reused rows written by submit (and of its spool): the top 8 bits
REUSE_BITS = 8
#: concurrent reads of parts while building
READ_THREADS = 8
_PART_RE = re.compile(r"^part-(\d+)\.(jsonl|parquet)$")

Row = tuple[str, str, str, str]   # uri, etag, job, part


def uri_hash(uri: str) -> int:
    return int.from_bytes(hashlib.blake2b(uri.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


#: a str's JSON form as json.dumps(..., ensure_ascii=False) writes it (the index's line format)
_json_str = json.encoder.encode_basestring


def top_bits(h: int, bits: int) -> int:
    return h >> (64 - bits) if bits else 0


def bits_for(n: int, target: int = SHARD_TARGET) -> int:
    k = 0
    while (n >> k) > target and k < MAX_BITS:
        k += 1
    return k


def meta_path(job_id: str) -> str:
    return f"{job_id}/index/meta.json"


def shard_path(job_id: str, shard: int) -> str:
    return f"{job_id}/index/shard-{shard:04x}.jsonl.gz"


def reused_path(job_id: str, bucket: int) -> str:
    return f"{job_id}/reused/bucket-{bucket:02x}.jsonl.gz"


def encode_rows(rows: Iterable[Row]) -> bytes:
    raw = "".join(json.dumps(list(r), ensure_ascii=False) + "\n" for r in rows)
    return gzip.compress(raw.encode("utf-8", "surrogatepass"), compresslevel=6, mtime=0)


def decode_rows(data: bytes) -> Iterator[Row]:
    for line in gzip.decompress(data).decode("utf-8", "surrogatepass").splitlines():
        if line:
            u, e, j, p = json.loads(line)
            yield u, e, j, p


# ------------------------------------------------------------------------------ reading
def read_meta(d: Destination, job_id: str) -> dict | None:
    """The index's meta.json, or None when the job has no (complete, readable) index."""
    data = d.get(meta_path(job_id))
    if data is None:
        return None
    try:
        meta = json.loads(data)
    except ValueError:
        return None
    if meta.get("version") != INDEX_VERSION or meta.get("hash") != HASH_NAME:
        return None
    return meta


class IndexReader:
    """One job's index, a shard at a time (the last one read is kept)."""

    def __init__(self, d: Destination, job_id: str, meta: dict):
        self.d, self.job_id, self.meta = d, job_id, meta
        self.bits = int(meta["bits"])
        self.present = set(meta.get("shards", []))
        self._shard: int | None = None
        self._rows: dict[str, tuple[str, str, str]] = {}
        self.peak_entries = 0          # most entries held at once (tests check the bound)
        self.shards_read = 0

    def shard(self, s: int) -> dict[str, tuple[str, str, str]]:
        """uri -> (etag, job, part) of shard ``s``."""
        if s != self._shard:
            self._rows = {}
            self._shard = s
            if s in self.present:
                data = self.d.get(shard_path(self.job_id, s))
                if data is None:
                    raise ConfigError(f"{self.d.uri(shard_path(self.job_id, s))} is missing although "
                                      f"the index's meta.json lists it: delete {self.d.uri(meta_path(self.job_id))} "
                                      "and the next --skip-labelled run rebuilds the index from the parts")
                self._rows = {u: (e, j, p) for u, e, j, p in decode_rows(data)}
                self.shards_read += 1
                self.peak_entries = max(self.peak_entries, len(self._rows))
        return self._rows


# ------------------------------------------------------------------------------ building
def _bounded_map(fn: Callable, items: list, threads: int = READ_THREADS) -> Iterator:
    """fn over items with a few threads, in order, at most 2 x threads results held."""
    if not items:
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="hardnet-index") as ex:
        window: deque = deque()
        it = iter(items)
        for x in it:
            window.append(ex.submit(fn, x))
            if len(window) >= 2 * threads:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def _part_rows(job_id: str, name: str, data: bytes) -> list[Row]:
    rows = []
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq  # only for Parquet parts (the optional parquet extra)

        t = pq.read_table(io.BytesIO(data))
        cols = set(t.column_names)
        if not {"uri", "status", "etag"} <= cols:
            return rows
        for u, st, e in zip(t.column("uri").to_pylist(), t.column("status").to_pylist(),
                            t.column("etag").to_pylist()):
            if st == "ok" and e and u:
                rows.append((u, e, job_id, name))
        return rows
    for line in data.decode("utf-8", "surrogateescape").splitlines():
        if '"ok"' not in line:   # cheap pre-filter; the JSON decides
            continue
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("status") == "ok" and r.get("etag") and isinstance(r.get("uri"), str):
            rows.append((r["uri"], r["etag"], job_id, name))
    return rows


def iter_labelled(d: Destination, job_id: str) -> Iterator[Row]:
    """The job's ok records with an ETag, from its parts, then the rows it reused."""
    parts = sorted(p.rsplit("/", 1)[-1] for p in d.list(f"{job_id}/part-"))
    parts = [p for p in parts if _PART_RE.match(p)]
    reused = [p for p in d.list(f"{job_id}/reused/") if p.endswith(".jsonl.gz")]

    def read_part(name: str) -> list[Row]:
        data = d.get(f"{job_id}/{name}")
        return _part_rows(job_id, name, data) if data is not None else []

    def read_reused(path: str) -> list[Row]:
        data = d.get(path)
        return list(decode_rows(data)) if data is not None else []

    for rows in _bounded_map(read_part, parts):
        yield from rows
    for rows in _bounded_map(read_reused, reused):
        yield from rows


def build_index(d: Destination, job_id: str, *, estimate: int | None = None,
                tmpdir: str | None = None, target: int = SHARD_TARGET,
                flush_lines: int = 50_000) -> dict:
    """Build (or rebuild) the job's index from its parts and reused rows; returns its meta.

    Memory: at most ``flush_lines`` rows buffered while partitioning into local temporary files,
    then one shard at a time (about ``target`` entries; a 256th of the rows at least) while
    sorting. With pyarrow when it is installed, else in plain Python (the same bytes)."""
    try:
        import pyarrow  # noqa: F401 - optional on the producer (the parquet extra); the worker has it
    except ImportError:
        return _build_python(d, job_id, estimate=estimate, tmpdir=tmpdir, target=target, flush_lines=flush_lines)
    return _build_arrow(d, job_id, estimate=estimate, tmpdir=tmpdir, target=target, flush_lines=flush_lines)


def _write_meta(d: Destination, job_id: str, bits: int, count: int, shards: list[int]) -> dict:
    meta = {"version": INDEX_VERSION, "job_id": job_id, "hash": HASH_NAME, "bits": bits,
            "count": count, "shards": shards, "created_at": datetime.now(timezone.utc).isoformat()}
    d.put(meta_path(job_id), json.dumps(meta, indent=1).encode(), content_type="application/json")
    log.info("job %s: index of %d labelled objects in %d shards (%d bits)", job_id, count, len(shards), bits)
    return meta


# --- with Arrow ---
#: the spill files' buckets: the top SPILL_BITS bits of a URI's hash (each holds whole shards, or
#: a shard is made of whole buckets); the rows keep the top MAX_BITS bits to cut shards finer
SPILL_BITS = 8


def _arrow_part(job_id: str, name: str, data: bytes):
    """The part's indexed rows as an Arrow table (uri, etag: binary; job, part), or None when
    Arrow cannot read it (the caller falls back to :func:`_part_rows`)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    try:
        if name.endswith(".parquet"):
            t = pq.read_table(io.BytesIO(data))
            if not {"uri", "status", "etag"} <= set(t.column_names):
                return _rows_table([])
            t = t.select(["uri", "status", "etag"])
            keep = pc.and_(pc.and_(pc.equal(t["status"], "ok"), pc.not_equal(t["etag"], "")),
                           pc.not_equal(t["uri"], ""))
        else:
            schema = pa.schema([("uri", pa.string()), ("status", pa.string()), ("etag", pa.string())])
            t = pj.read_json(io.BytesIO(data),
                             read_options=pj.ReadOptions(use_threads=False, block_size=max(1 << 20, len(data) + 1)),
                             parse_options=pj.ParseOptions(explicit_schema=schema,
                                                           unexpected_field_behavior="ignore"))
            keep = pc.and_(pc.and_(pc.equal(t["status"], "ok"), pc.not_equal(t["etag"], "")),
                           pc.is_valid(t["uri"]))
        t = t.filter(pc.fill_null(keep, False))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return None
    n = t.num_rows
    return pa.table({"uri": t["uri"].cast(pa.binary()), "etag": t["etag"].cast(pa.binary()),
                     "job": pa.repeat(job_id, n), "part": pa.repeat(name, n)})


def _rows_table(rows: list[Row]):
    import pyarrow as pa

    enc = [(u.encode("utf-8", "surrogatepass"), e.encode("utf-8", "surrogatepass"), j, p) for u, e, j, p in rows]
    return pa.table({"uri": pa.array([r[0] for r in enc], pa.binary()),
                     "etag": pa.array([r[1] for r in enc], pa.binary()),
                     "job": pa.array([r[2] for r in enc], pa.string()),
                     "part": pa.array([r[3] for r in enc], pa.string())})


def _decode_rows_fast(data: bytes) -> list[Row]:
    """:func:`decode_rows` with one json.loads for the whole file (a line never holds a raw newline)."""
    text = gzip.decompress(data).decode("utf-8", "surrogatepass").strip()
    return [tuple(r) for r in json.loads("[" + ",".join(text.splitlines()) + "]")] if text else []


def _build_arrow(d: Destination, job_id: str, *, estimate: int | None, tmpdir: str | None, target: int,
                 flush_lines: int) -> dict:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.ipc as ipc

    parts = sorted(p.rsplit("/", 1)[-1] for p in d.list(f"{job_id}/part-"))
    parts = [p for p in parts if _PART_RE.match(p)]
    reused = [p for p in d.list(f"{job_id}/reused/") if p.endswith(".jsonl.gz")]

    def read_part(name: str):
        data = d.get(f"{job_id}/{name}")
        if data is None:
            return _rows_table([])
        t = _arrow_part(job_id, name, data)
        return t if t is not None else _rows_table(_part_rows(job_id, name, data))

    def read_reused(path: str):
        data = d.get(path)
        return _rows_table(_decode_rows_fast(data) if data is not None else [])

    work = tempfile.mkdtemp(prefix=f"hardnet-index-{job_id}-", dir=tmpdir)
    schema = pa.schema([("uri", pa.binary()), ("etag", pa.binary()), ("job", pa.string()),
                        ("part", pa.string()), ("seq", pa.int64()), ("hb", pa.uint16())])
    writers: dict[int, ipc.RecordBatchStreamWriter] = {}
    pending: list = []
    n_held = count_in = 0
    shift = 64 - MAX_BITS
    down = MAX_BITS - SPILL_BITS

    def spill() -> None:
        """The rows held, sorted by hash and cut into one slice per bucket, to the buckets' files."""
        t = pa.concat_tables(pending).combine_chunks()
        pending.clear()
        t = t.take(pc.sort_indices(t["hb"]))
        hb = t["hb"].to_pylist()
        start = 0
        while start < len(hb):
            g = hb[start] >> down
            end = bisect.bisect_left(hb, (g + 1) << down, start)
            if g not in writers:
                writers[g] = ipc.new_stream(os.path.join(work, f"{g:02x}.arrow"), schema)
            writers[g].write_table(t.slice(start, end - start))
            start = end

    try:
        for t in itertools.chain(_bounded_map(read_part, parts), _bounded_map(read_reused, reused)):
            n = t.num_rows
            if not n:
                continue
            hb = [uri_hash_bytes(u) >> shift for u in t["uri"].to_pylist()]
            t = t.append_column("seq", pa.array(range(count_in, count_in + n), pa.int64()))
            pending.append(t.append_column("hb", pa.array(hb, pa.uint16())))
            count_in += n
            n_held += n
            if n_held >= flush_lines:
                spill()
                n_held = 0
        if pending:
            spill()
        for w in writers.values():
            w.close()
        bits = bits_for(count_in if estimate is None else estimate, target)

        def group(g: int):
            if g not in writers:
                return None
            path = os.path.join(work, f"{g:02x}.arrow")
            with ipc.open_stream(path) as r:
                t = r.read_all()
            os.unlink(path)
            return t

        shards, count = [], 0
        per = 1 << max(0, SPILL_BITS - bits)            # buckets per shard (bits < SPILL_BITS)
        cached: tuple[int, object] | None = None
        for s in range(1 << bits):
            if bits <= SPILL_BITS:
                ts = [x for x in (group(g) for g in range(s * per, (s + 1) * per)) if x is not None]
                t = pa.concat_tables(ts) if ts else None
            else:
                g = s >> (bits - SPILL_BITS)
                if cached is None or cached[0] != g:
                    cached = (g, group(g))
                t = cached[1]
                if t is not None:
                    t = t.filter(pc.equal(pc.shift_right(t["hb"], MAX_BITS - bits), s))
            if t is None or not t.num_rows:
                continue
            # one row per URI, the last one read, sorted by URI (UTF-8 byte order = code point order)
            t = t.take(pc.sort_indices(t, sort_keys=[("uri", "ascending"), ("seq", "descending")]))
            u = t["uri"]
            if t.num_rows > 1:
                first = pc.not_equal(u.slice(1), u.slice(0, t.num_rows - 1))
                t = t.filter(pa.concat_arrays([pa.array([True]), first.combine_chunks()]))
            d.put(shard_path(job_id, s), _encode_table(t), content_type="application/gzip")
            shards.append(s)
            count += t.num_rows
    finally:
        for w in writers.values():
            try:
                w.close()
            except Exception:  # noqa: BLE001 - already closed
                pass
        shutil.rmtree(work, ignore_errors=True)
    return _write_meta(d, job_id, bits, count, shards)


def uri_hash_bytes(b: bytes) -> int:
    """:func:`uri_hash` of a URI already encoded (UTF-8, surrogatepass)."""
    return int.from_bytes(hashlib.blake2b(b, digest_size=8).digest(), "big")


def _encode_table(t) -> bytes:
    """:func:`encode_rows` of an Arrow table's rows (uri, etag binary; job, part)."""
    enc = _json_str
    lines = [f"[{enc(u.decode('utf-8', 'surrogatepass'))}, {enc(e.decode('utf-8', 'surrogatepass'))}, "
             f"{enc(j)}, {enc(p)}]\n"
             for u, e, j, p in zip(t["uri"].to_pylist(), t["etag"].to_pylist(), t["job"].to_pylist(),
                                   t["part"].to_pylist())]
    return gzip.compress("".join(lines).encode("utf-8", "surrogatepass"), compresslevel=6, mtime=0)


# --- in plain Python ---
def _build_python(d: Destination, job_id: str, *, estimate: int | None, tmpdir: str | None, target: int,
                  flush_lines: int) -> dict:
    rows = iter_labelled(d, job_id)
    if estimate is None:   # a first pass only to count: cheap next to a wrong shard count
        estimate = sum(1 for _ in iter_labelled(d, job_id))
    bits = bits_for(estimate, target)
    work = tempfile.mkdtemp(prefix=f"hardnet-index-{job_id}-", dir=tmpdir)
    try:
        buf: dict[int, list[str]] = {}
        held = 0

        def flush() -> None:
            for s, lines in buf.items():
                with open(os.path.join(work, f"{s:04x}"), "a", encoding="utf-8", errors="surrogatepass") as f:
                    f.writelines(lines)
            buf.clear()

        count_in = 0
        for r in rows:
            buf.setdefault(top_bits(uri_hash(r[0]), bits), []).append(json.dumps(list(r), ensure_ascii=False) + "\n")
            held += 1
            count_in += 1
            if held >= flush_lines:
                flush()
                held = 0
        flush()
        shards, count = [], 0
        for name in sorted(os.listdir(work)):
            s = int(name, 16)
            entries: dict[str, Row] = {}
            with open(os.path.join(work, name), encoding="utf-8", errors="surrogatepass") as f:
                for line in f:
                    u, e, j, p = json.loads(line)
                    entries[u] = (u, e, j, p)    # one row per URI (the last one read)
            d.put(shard_path(job_id, s), encode_rows(entries[u] for u in sorted(entries)),
                  content_type="application/gzip")
            shards.append(s)
            count += len(entries)
            os.unlink(os.path.join(work, name))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _write_meta(d, job_id, bits, count, shards)


def ensure_index(d: Destination, job_id: str, **kw) -> tuple[dict, bool]:
    """(meta, built): the job's index, built from its parts first if it has none."""
    meta = read_meta(d, job_id)
    if meta is not None:
        return meta, False
    return build_index(d, job_id, **kw), True


# ------------------------------------------------------------------------------ job bookkeeping
#: DEST/JOB/ file where submit writes what it skipped (read into the manifest)
SUMMARY_PATH = "reused/summary.json"


def manifest_fields(d: Destination | None, job_id: str, raw: dict) -> dict:
    """The manifest's ``skipped`` and ``reused`` for a job (empty when it skipped nothing)."""
    skipped = int(raw.get("skipped") or 0)
    if not skipped or d is None:
        return {}
    data = d.get(f"{job_id}/{SUMMARY_PATH}")
    try:
        reused = json.loads(data).get("reused", []) if data else []
    except ValueError:
        reused = []
    return {"skipped": skipped, "reused": reused}


def index_for_finalize(store, job_id: str) -> dict | None:
    """Called by :func:`hnq.jobs.finish.finalize` when every part is there, before the manifest (still
    written last) and the final state (so that a ``--wait`` that returned sees the index): build
    the index of a job submitted with one asked for. Never raises (the job finishes either way; a
    later ``--skip-labelled`` builds a missing index from the parts)."""
    raw = store.raw(job_id)
    if raw.get("index") != "1" or not raw.get("dest"):
        return None
    try:
        estimate = int(raw.get("succeeded") or 0) + int(raw.get("skipped") or 0)
        return build_index(open_destination(raw["dest"]), job_id, estimate=estimate)
    except Exception as e:  # noqa: BLE001 - the job stays finished; the index can be built later
        log.warning("job %s: its labelled index could not be built (%s: %s); the next --skip-labelled "
                    "run builds it from the parts", job_id, type(e).__name__, e)
        return None


def job_fields(skipped: int = 0, index: bool = False) -> dict:
    """The job hash fields (and job.json keys) that carry this for finalize and resume."""
    out: dict = {}
    if index:
        out["index"] = "1"
    if skipped:
        out["skipped"] = skipped
    return out
