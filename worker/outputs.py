"""What a job's options (hnq.options) do to a chunk's records between the engine and the part:
the top-k field name, and the S3 tag write-back. The part itself is written by
:func:`worker.write.write_part` in the job's format."""
from __future__ import annotations

import logging

from hnq.options import TOP_K_DEFAULT, JobOptions
from hnq.schema import ResultRecord

log = logging.getLogger("hardnet.worker")


def name_labels(records: list[ResultRecord], top_k: int) -> list[ResultRecord]:
    """Records carry their labels as ``top5`` for the default k, as ``topk`` for any other (a
    ``top5`` of 3 labels would be a lie, and readers of today's ``top5`` keep working)."""
    if top_k == TOP_K_DEFAULT:
        return records
    return [r.model_copy(update={"topk": r.top5, "top5": None}) if r.top5 is not None else r
            for r in records]


def finish_records(records: list[ResultRecord], options: JobOptions, *, tag_threads: int = 16,
                   name: str = "") -> list[ResultRecord]:
    records = name_labels(records, options.top_k)
    if options.tag:
        from hnq.storage.s3.tags import tag_records

        records, counts = tag_records(records, threads=tag_threads)
        log.info("chunk %s tags: %s", name, counts)
    return records
