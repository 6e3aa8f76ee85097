"""Fetch + decode of many URIs at once, in threads: downloads overlap each other and the forward
pass of the images that are already in. A transient storage error is not an image's fault: it is
raised so that the whole chunk is retried later rather than recorded as a failure."""
from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from hnq.errors import HardnetError, TransientError
from hnq.storage import FetchPolicy, fetch
from worker.pipeline.predict import Classifier, error_from_exception


@dataclass
class Loaded:
    uri: str
    image: torch.Tensor | None = None
    error: HardnetError | None = None
    etag: str | None = None
    size: int | None = None


class Loader:
    """A pool of fetch threads; decoding is limited to `decode_threads` at a time so that many
    slow downloads don't turn into as many CPU-bound decodes fighting over the cores."""

    def __init__(self, clf: Classifier, policy: FetchPolicy, fetch_threads: int = 16, decode_threads: int = 0):
        self.clf = clf
        self.policy = policy
        self.pool = ThreadPoolExecutor(max_workers=fetch_threads, thread_name_prefix="fetch")
        self.decode_slots = threading.BoundedSemaphore(decode_threads or os.cpu_count() or 2)

    def _load(self, uri: str) -> Loaded:
        out = Loaded(uri)
        try:
            got = fetch(uri, self.policy)
            out.etag, out.size = got.etag, got.size
            with self.decode_slots:
                out.image = self.clf.decode(got.data)
        except TransientError:
            raise
        except Exception as e:  # noqa: BLE001 - one image's trouble is that image's record
            out.error = error_from_exception(e)
        return out

    def submit(self, uris: list[str]) -> list[Future]:
        return [self.pool.submit(self._load, u) for u in uris]

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
