"""The Python API that `hardnet classify` and the Celery worker share: build a model by name with
its weights, preprocess encoded images into a uint8 batch, run it, get top-k records back.

    clf = Classifier("hardnet68", weights=None, device="auto")
    records = clf.classify([("dog.jpg", open("dog.jpg", "rb").read())])
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Iterable, Sequence

import torch

from hnq.errors import ConfigError, ErrorCode, HardnetError, ImageError
from hnq.models import WEIGHTS_WORDS, weights_key
from hnq.schema import Label, ResultRecord
from worker.engine.device import default_batch_size
from worker.model.labels import IMAGENET_CATEGORIES
from worker.model import load_model, source_sha256, state_dict_sha256
from worker.image.decode import decode_image
from worker.image.normalize import normalize

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

    def __init__(self, model: str = "hardnet68", weights: str | None = None, *, device: str = "auto",
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
        self.amp_check: dict | None = None
        if self.amp and self.device.type == "cuda":
            self.amp_check = self.check_amp()
            if self.amp_check["top1_agreement"] < 0.75:
                log.warning("fp16 autocast disagrees with fp32 on %s: running in fp32", self.amp_check)
                self.amp = False
            else:
                log.info("fp16 autocast checked against fp32: %s", self.amp_check)

    def _autocast(self):
        if not self.amp:
            return nullcontext()
        dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

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
    @torch.inference_mode()
    def predict(self, batch: torch.Tensor, k: int = 5) -> list[list[Label]]:
        """uint8 [B,3,224,224] (any device) -> per image the top-k labels with softmax scores."""
        out: list[list[Label]] = []
        for i in range(0, batch.shape[0], self.batch_size):
            x = batch[i:i + self.batch_size].to(self.device, non_blocking=True)
            if self.device.type == "cuda" or self.amp:
                x = x.contiguous(memory_format=torch.channels_last)
            x = normalize(x)
            with self._autocast():
                logits = self.net(x)
            probs = torch.softmax(logits.float(), dim=1)
            scores, idx = probs.topk(k, dim=1)
            for srow, irow in zip(scores.cpu().tolist(), idx.cpu().tolist()):
                out.append([Label(index=j, label=IMAGENET_CATEGORIES[j], score=round(s, 6))
                            for s, j in zip(srow, irow)])
        return out

    @torch.inference_mode()
    def check_amp(self, n: int = 16) -> dict:
        """Run a fixed synthetic batch in fp32 and under autocast and compare: the fraction of equal
        top-1 labels, of equal top-5 sets, and the largest softmax difference."""
        h = torch.arange(224, dtype=torch.float32)
        x = torch.stack([
            (127.5 + 127.5 * torch.sin(0.02 * (i + 1) * h[None, :, None] + 0.03 * h[None, None, :] + c))
            .expand(1, 224, 224) for i in range(n) for c in range(3)]).reshape(n, 3, 224, 224)
        x = normalize(x.round().to(torch.uint8).to(self.device))
        if self.device.type == "cuda" or self.amp:
            x = x.contiguous(memory_format=torch.channels_last)
        ref = torch.softmax(self.net(x).float(), 1)
        with self._autocast():
            low = torch.softmax(self.net(x).float(), 1)
        t5r, t5l = ref.topk(5, 1).indices, low.topk(5, 1).indices
        return {
            "top1_agreement": (t5r[:, 0] == t5l[:, 0]).float().mean().item(),
            "top5_set_agreement": sum(set(a.tolist()) == set(b.tolist()) for a, b in zip(t5r, t5l)) / n,
            "max_prob_diff": (ref - low).abs().max().item(),
        }

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


def error_from_exception(exc: BaseException) -> HardnetError:
    """Anything unexpected while handling one image still becomes a record, never a crash."""
    if isinstance(exc, HardnetError):
        return exc
    return ImageError(f"{type(exc).__name__}: {exc}", ErrorCode.internal_error)
