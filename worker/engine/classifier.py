"""The Python API that `hardnet classify` and the Celery worker share: build a model by name with
its weights, preprocess encoded images into a uint8 batch, run it, get top-k records back.

    clf = Classifier("hardnet68", weights=None, device="auto")
    records = clf.classify([("dog.jpg", open("dog.jpg", "rb").read())])

A thin synchronous facade: the forward pass is the engine's :class:`~worker.engine.device.DeviceRunner`
(``run`` instead of the engine's pipelined ``launch``/``finish``), and labels come from
:func:`~worker.engine.device.top_labels`, as in the engine's records.
"""
from __future__ import annotations

import logging
from typing import Iterable, Sequence

import torch

from hnq.errors import ConfigError, HardnetError, ImageError
from hnq.models import DEFAULT_MODEL, WEIGHTS_WORDS, weights_key
from hnq.schema import Label, ResultRecord
from worker.engine.device import DeviceRunner, default_batch_size, top_labels
from worker.image.decode import decode_image
from worker.model import load_model, source_sha256, state_dict_sha256
from worker.model.weights import weights_entry

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unsupported device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available here; use --device cpu or auto")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {device!r}: use auto, cpu, cuda or cuda:N")
    return dev


def describe_weights(weights: str | None) -> str:
    """What records say about the weights: 'official', 'random' (spelled by the one rule,
    hnq.models.weights_key) or the checkpoint's file name."""
    key = weights_key(weights)
    return key if key in WEIGHTS_WORDS else key.rstrip("/").rsplit("/", 1)[-1]


class Classifier:
    """A HarDNet model on a device, ready for uint8 batches. One per process: loading is slow."""

    def __init__(self, model: str = DEFAULT_MODEL, weights: str | None = None, *, device: str = "auto",
                 batch_size: int | None = None, amp: bool | None = None, fast_jpeg: bool = False,
                 max_pixels: int | None = None):
        self.model_name = model
        self.device = resolve_device(device)
        # None/0: chosen from the device (256 on a GPU, 32 on the CPU)
        self.batch_size = batch_size or default_batch_size(self.device)
        self.fast_jpeg = fast_jpeg
        self.max_pixels = max_pixels
        self.weights = describe_weights(weights)
        # fp16 autocast and channels_last pay off on CUDA; on CPU fp32 is the exact reference.
        self.amp = (self.device.type == "cuda") if amp is None else amp
        net = load_model(model, weights, device=str(self.device))
        #: provenance: the checkpoint file's sha256 (as sha256sum prints it), or for weights from
        #: no file (random) a digest of the tensors; in the worker log and the job's manifest
        self.weights_sha256 = source_sha256(model, weights) or state_dict_sha256(net)
        if self.device.type == "cuda" or self.amp:
            net = net.to(memory_format=torch.channels_last)
        self.net = net.eval()
        entry = weights_entry(model)
        #: how images are prepared for this model (resize, crop, mean, std) and the category
        #: names of its labels by class index: its weights entry's, whatever file the weights are
        self.preprocessing = entry.preprocess
        self.categories = entry.categories
        self.runner = self._runner()
        self.amp_check: dict | None = None
        if self.amp and self.device.type == "cuda":
            self.amp_check = self.check_amp()
            if self.amp_check["top1_agreement"] < 0.75:
                log.warning("fp16 autocast disagrees with fp32 on %s: running in fp32", self.amp_check)
                self.amp = False
                self.runner = self._runner()
            else:
                log.info("fp16 autocast checked against fp32: %s", self.amp_check)

    def _runner(self) -> DeviceRunner:
        """The synchronous runner behind predict and check_amp: the eager model (on the CPU the
        exact fp32 reference), without the engine's pinned buffers and side streams."""
        return DeviceRunner(self.net, self.device, self.batch_size, amp=self.amp, torchscript="off",
                            pipelined=False, mean=self.preprocessing.mean, std=self.preprocessing.std)

    # -- preprocessing --
    def decode(self, data: bytes) -> torch.Tensor:
        kw = {"fast_jpeg": self.fast_jpeg}
        if self.max_pixels:
            kw["max_pixels"] = self.max_pixels
        return decode_image(data, **kw)

    def preprocess(self, blobs: Sequence[bytes]) -> tuple[torch.Tensor | None, list[ImageError | None]]:
        """Decode a list of encoded images. Returns the uint8 batch of the good ones (in order) and,
        per input, None or the error that kept it out of the batch."""
        good, errors = [], []
        for b in blobs:
            try:
                good.append(self.decode(b))
                errors.append(None)
            except ImageError as e:
                errors.append(e)
        return (torch.stack(good) if good else None), errors

    # -- inference --
    def predict(self, batch: torch.Tensor, k: int = 5) -> list[list[Label]]:
        """uint8 [B,3,224,224] (any device) -> per image the top-k labels with softmax scores."""
        out: list[list[Label]] = []
        for i in range(0, batch.shape[0], self.batch_size):
            scores, idx = self.runner.run(batch[i:i + self.batch_size], k)
            out += [[Label(**d) for d in top_labels(srow, irow, self.categories)]
                    for srow, irow in zip(scores, idx)]
        return out

    def check_amp(self, n: int = 16) -> dict:
        """Run a fixed synthetic batch in fp32 and under autocast and compare: the fraction of equal
        top-1 labels, of equal top-5 sets, and the largest softmax difference."""
        return self.runner.check_amp(n)

    def record(self, uri: str, top: list[Label] | list[dict] | None = None,
               error: HardnetError | None = None, **extra) -> ResultRecord:
        """``top``: Labels, or dicts of their fields (validated into Labels here)."""
        if error is not None:
            return ResultRecord.failure(uri, error.code, error.message, self.model_name,
                                        weights=self.weights, **extra)
        return ResultRecord(uri=uri, status="ok", top5=top, model=self.model_name,
                            weights=self.weights, **extra)

    def classify(self, items: Iterable[tuple[str, bytes]]) -> list[ResultRecord]:
        """Label (uri, encoded bytes) pairs; every input gets exactly one record, in order."""
        items = list(items)
        batch, errors = self.preprocess([b for _, b in items])
        tops = iter(self.predict(batch) if batch is not None else [])
        return [self.record(uri, error=err) if err else self.record(uri, next(tops))
                for (uri, _), err in zip(items, errors)]

