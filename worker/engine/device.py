"""Device stage: uint8 batches in, top-k (scores, indices) out. THE forward path: the engine's
device thread and the synchronous :class:`~worker.engine.classifier.Classifier` both run the model
through :class:`DeviceRunner` (one normalisation, one autocast, one softmax/top-k), and
:func:`top_labels` is the one place where (scores, indices) become labels.

On CUDA (the case it is built for):
* each batch is stacked straight into one of two **pinned** host buffers and copied to the GPU
  with a **non-blocking copy on a side stream**, so batch k+1 is prepared and copied while
  batch k runs (``launch`` returns at once, ``finish`` waits for that batch alone);
* normalisation (uint8 -> (x/255-mean)/std), the forward pass, softmax and **top-k run on the
  device**; one small device->host copy per batch (k scores + k indices per image);
* ``cudnn.benchmark`` on; fp16 autocast + channels_last per the Classifier (whose start-up
  check against fp32 stays);
* options, each measured both ways by benchmarks/bench_gpu.py: ``torch.compile`` and **CUDA
  graphs** for the fixed batch shape (a short last batch is padded to it; the padding's results
  are dropped).

On the CPU the same calls run synchronously (fp32, or bf16 autocast when asked), and the model is
traced to TorchScript (``HARDNET_TORCHSCRIPT``, on by default there): an eager forward releases and
re-takes the GIL around each of its hundreds of ops, and in a worker, whose fetch, decode and Celery
threads take the GIL thousands of times a second, every re-take can wait. The traced forward is
one call that holds the GIL only at its ends: closer to the model's own rate through the queue
(figures: docs/performance.md#against-its-limits-benchmarksbench_enginepy, ``latency39``); the
same ops, so the same numbers (tests/unit/test_engine.py)."""
from __future__ import annotations

import logging
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch

from worker.image.normalize import MEAN, STD, normalize

log = logging.getLogger("hardnet.worker")

CROP = 224


@dataclass
class Pending:
    n: int
    slot: int = 0
    event: object = None          # torch.cuda.Event recorded after the device->host copy
    start: object = None          # torch.cuda.Event recorded before the host->device copy
    result: tuple | None = None   # CPU: (scores, indices) lists, computed at launch


TORCHSCRIPT_MODES = ("auto", "on", "off")


def use_torchscript(mode: str, device: torch.device, *, amp: bool, compile: bool) -> bool:
    """``auto``: on the CPU (where the forward's ops run on the CPU threads that the worker's
    other threads compete with for the GIL), unless the model is compiled or runs under autocast
    (a trace does not carry autocast). ``on`` asks for it wherever those allow; ``off`` never."""
    if mode not in TORCHSCRIPT_MODES:
        raise ValueError(f"torchscript {mode!r}: use one of {', '.join(TORCHSCRIPT_MODES)}")
    if mode == "off" or compile or amp:
        return False
    return mode == "on" or device.type == "cpu"


def trace(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model traced to TorchScript (its ops recorded once; the batch size stays free), or the
    eager model where tracing fails (logged: the worker still labels, at the eager speed)."""
    t0 = time.monotonic()
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            # torch.jit is deprecated in favour of torch.compile / torch.export. An exported
            # program runs op by op in Python again; torch.compile (HARDNET_COMPILE) builds C++
            # kernels at start-up. A trace is one call, built in 1-2 s (hardnet39ds / 68 here).
            warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated")
            traced = torch.jit.trace(net, torch.zeros((2, 3, CROP, CROP), device=device),
                                     check_trace=False)
    except Exception as e:  # noqa: BLE001
        log.warning("TorchScript trace failed (%s: %s): running the model eagerly", type(e).__name__, e)
        return net
    log.info("model traced to TorchScript in %.1fs", time.monotonic() - t0)
    return traced


def top_labels(scores: Sequence[float], indices: Sequence[int], categories: Sequence[str]) -> list[dict]:
    """One image's top-k from the device as label dicts (index, category name, score rounded to 6
    places), best first. Plain dicts: a record validates them into Labels in pydantic-core, cheaper
    than a Label() call each (every image of every batch passes here, with the GIL held)."""
    return [{"index": j, "label": categories[j], "score": round(s, 6)} for s, j in zip(scores, indices)]


def default_batch_size(device: torch.device) -> int:
    """256 on a GPU (a few ms of HarDNet68 fp16 on an H100; ~40 MB of uint8 input), 32 on the CPU
    (larger batches are no faster there and make the last chunk's tail longer)."""
    return 256 if device.type == "cuda" else 32


class DeviceRunner:
    """A model on a device. ``launch``/``finish``: the engine's two-batches-in-flight calls;
    ``run``: one batch now, synchronously (the Classifier's). ``pipelined=False`` (the Classifier):
    no pinned buffers, side streams or CUDA graphs on CUDA; ``launch`` then runs synchronously.
    ``mean``/``std``: the normalisation of the model's weights entry (its ``preprocess``)."""

    def __init__(self, net: torch.nn.Module, device: torch.device, batch_size: int, *,
                 amp: bool, k: int = 5, compile: bool = False, cuda_graphs: bool = False,
                 torchscript: str = "off", pipelined: bool = True,
                 mean: Sequence[float] = MEAN, std: Sequence[float] = STD):
        self.device = device
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.cuda = device.type == "cuda"
        self.pipelined = pipelined and self.cuda
        self.B = batch_size
        self.k = k
        self.amp = amp
        self.channels_last = self.cuda or amp
        self.compiled = compile
        self.graphs = cuda_graphs and self.pipelined
        if cuda_graphs and not self.pipelined:
            log.warning("CUDA graphs asked for on %s%s: ignored", device,
                        "" if self.cuda else " without pipelining")
        self.torchscript = use_torchscript(torchscript, device, amp=amp, compile=compile)
        self.net = trace(net, device) if self.torchscript else net
        if compile:
            # Both options: Inductor's own CUDA graphs ("reduce-overhead") on the fixed shape.
            mode = "reduce-overhead" if self.graphs else None
            self.net = torch.compile(net, mode=mode, dynamic=False)
        # Fixed shapes (padding) whenever something specialises on the shape.
        self.pad = compile or self.graphs
        self._graph = None
        if self.pipelined:
            torch.backends.cudnn.benchmark = True
            self.copy_stream = torch.cuda.Stream(device)
            self.stream = torch.cuda.Stream(device)
            self.host_in = [torch.empty((batch_size, 3, CROP, CROP), dtype=torch.uint8).pin_memory()
                            for _ in range(2)]
            self.host_scores = [torch.empty((batch_size, k), dtype=torch.float32).pin_memory()
                                for _ in range(2)]
            self.host_idx = [torch.empty((batch_size, k), dtype=torch.int64).pin_memory()
                             for _ in range(2)]
            self.dev_in = [torch.empty((batch_size, 3, CROP, CROP), dtype=torch.uint8, device=device)
                           for _ in range(2)]
            self._busy = [False, False]
            self._next = 0
            if self.graphs and not compile:
                self._capture()

    # -- the computation, on whatever stream is current --
    def _autocast(self, amp: bool):
        """fp16 autocast on CUDA, bf16 on the CPU (where fp32 is the exact reference)."""
        if not amp:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.float16 if self.cuda else torch.bfloat16)

    def probabilities(self, x: torch.Tensor, *, amp: bool | None = None) -> torch.Tensor:
        """uint8 [B,3,H,W] on the device -> softmax [B, classes] in fp32: memory format,
        normalisation, the model (under autocast when ``amp``, by default the runner's)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = normalize(x, mean=self.mean, std=self.std)
        with self._autocast(self.amp if amp is None else amp):
            logits = self.net(x)
        return torch.softmax(logits.float(), dim=1)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.probabilities(x).topk(self.k, dim=1)

    @torch.inference_mode()
    def _capture(self) -> None:
        t0 = time.monotonic()
        self._static_in = torch.zeros((self.B, 3, CROP, CROP), dtype=torch.uint8, device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up: cuDNN autotuning and allocations happen outside the graph
                self._forward(self._static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._static_scores, self._static_idx = self._forward(self._static_in)
        torch.cuda.synchronize(self.device)
        log.info("CUDA graph captured for batch %d in %.1fs", self.B, time.monotonic() - t0)

    # -- the Classifier's calls --
    @torch.inference_mode()
    def run(self, batch: torch.Tensor, k: int | None = None) -> tuple[list[list[float]], list[list[int]]]:
        """uint8 [n,3,H,W] (any device, any n) through the forward path now, on the current
        stream: per image its top ``k`` (default the runner's) scores and class indices."""
        scores, idx = self.probabilities(batch.to(self.device, non_blocking=True)).topk(
            self.k if k is None else k, dim=1)
        return scores.cpu().tolist(), idx.cpu().tolist()

    @torch.inference_mode()
    def check_amp(self, n: int = 16) -> dict:
        """Run a fixed synthetic batch in fp32 and as the runner runs it (under autocast when
        ``amp``) and compare: the fraction of equal top-1 labels, of equal top-5 sets, and the
        largest softmax difference."""
        h = torch.arange(CROP, dtype=torch.float32)
        x = torch.stack([
            (127.5 + 127.5 * torch.sin(0.02 * (i + 1) * h[None, :, None] + 0.03 * h[None, None, :] + c))
            .expand(1, CROP, CROP) for i in range(n) for c in range(3)]).reshape(n, 3, CROP, CROP)
        x = x.round().to(torch.uint8).to(self.device)
        ref = self.probabilities(x, amp=False)
        low = self.probabilities(x)
        t5r, t5l = ref.topk(5, 1).indices, low.topk(5, 1).indices
        return {
            "top1_agreement": (t5r[:, 0] == t5l[:, 0]).float().mean().item(),
            "top5_set_agreement": sum(set(a.tolist()) == set(b.tolist()) for a, b in zip(t5r, t5l)) / n,
            "max_prob_diff": (ref - low).abs().max().item(),
        }

    # -- the engine's calls --
    @torch.inference_mode()
    def launch(self, images: list[torch.Tensor]) -> Pending:
        n = len(images)
        if n > self.B:
            raise ValueError(f"batch of {n} > batch size {self.B}")
        if not self.pipelined:
            x = torch.stack(images)
            if self.cuda:
                x = x.to(self.device, non_blocking=True)
            if self.pad and n < self.B:
                x = torch.cat([x, x[:1].expand(self.B - n, -1, -1, -1)])
            scores, idx = self._forward(x)
            return Pending(n, result=(scores[:n].tolist(), idx[:n].tolist()))
        slot = self._next
        if self._busy[slot]:
            raise RuntimeError("device runner: both buffers in flight; finish() one first")
        self._next = 1 - slot
        self._busy[slot] = True
        start = torch.cuda.Event(enable_timing=True)
        done = torch.cuda.Event(enable_timing=True)
        on_gpu = images[0].is_cuda
        if on_gpu:
            # GPU-decoded images: already on the device (the decoder synchronised after them).
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                start.record()
                torch.stack(images, out=self.dev_in[slot][:n])
        else:
            torch.stack(images, out=self.host_in[slot][:n])
            with torch.cuda.stream(self.copy_stream):
                start.record()
                self.dev_in[slot][:n].copy_(self.host_in[slot][:n], non_blocking=True)
            self.stream.wait_stream(self.copy_stream)
        with torch.cuda.stream(self.stream):
            x = self.dev_in[slot]
            if self._graph is not None:
                self._static_in.copy_(x)
                self._graph.replay()
                scores, idx = self._static_scores, self._static_idx
            else:
                scores, idx = self._forward(x if self.pad else x[:n])
            self.host_scores[slot][:n].copy_(scores[:n], non_blocking=True)
            self.host_idx[slot][:n].copy_(idx[:n], non_blocking=True)
            done.record()
        return Pending(n, slot=slot, event=done, start=start)

    def finish(self, p: Pending) -> tuple[list[list[float]], list[list[int]], float | None]:
        """(scores, indices, device milliseconds or None on the CPU) of a launched batch."""
        if p.result is not None:
            return p.result[0], p.result[1], None
        p.event.synchronize()
        ms = p.start.elapsed_time(p.event)
        out = (self.host_scores[p.slot][:p.n].tolist(), self.host_idx[p.slot][:p.n].tolist(), ms)
        self._busy[p.slot] = False
        return out

    def warm_up(self) -> None:
        """One padded batch through the whole path (compilation, cuDNN autotuning) before work."""
        t0 = time.monotonic()
        img = torch.zeros((3, CROP, CROP), dtype=torch.uint8)
        if self.pipelined and not self.pad:
            imgs = [img] * self.B
        else:
            imgs = [img]
        self.finish(self.launch(imgs))
        log.info("device warm-up (batch %d%s%s) took %.1fs", self.B,
                 ", compiled" if self.compiled else "", ", CUDA graphs" if self.graphs else "",
                 time.monotonic() - t0)
