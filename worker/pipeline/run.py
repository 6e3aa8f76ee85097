"""One chunk, start to finish: fetch and decode concurrently, run full batches as soon as they are
ready (the device works while the rest of the chunk downloads), keep one record per URI in order."""
from __future__ import annotations

from hnq.schema import ResultRecord
from worker.pipeline.fetch import Loaded, Loader


def classify_uris(loader: Loader, uris: list[str], *, job_id: str | None = None) -> list[ResultRecord]:
    clf = loader.clf
    futures = loader.submit(uris)
    records: list[ResultRecord | None] = [None] * len(uris)
    pending: list[tuple[int, Loaded]] = []

    def flush():
        if not pending:
            return
        import torch

        tops = clf.predict(torch.stack([it.image for _, it in pending]))
        for (i, it), top in zip(pending, tops):
            records[i] = clf.record(it.uri, top, job_id=job_id, etag=it.etag, size=it.size)
        pending.clear()

    try:
        # In submission order: the head of the chunk is usually done first, and ordered batches
        # keep the code simple; later images keep downloading meanwhile.
        for i, fut in enumerate(futures):
            it: Loaded = fut.result()  # a TransientError propagates: the chunk is retried
            if it.error is not None:
                records[i] = clf.record(it.uri, error=it.error, job_id=job_id, etag=it.etag, size=it.size)
                continue
            pending.append((i, it))
            if len(pending) >= clf.batch_size:
                flush()
        flush()
    finally:
        for f in futures:
            f.cancel()
    assert all(r is not None for r in records)
    return records  # type: ignore[return-value]
