"""Device stage: uint8 batches in, top-k (scores, indices) out. THE forward path: the engine's
device thread and the synchronous :class:`~worker.engine.classifier.Classifier` both run the model
through :class:`DeviceRunner` (one normalisation, one autocast, one softmax/top-k), and
:func:`top_labels` is the one place where (scores, indices) become labels.

On CUDA (the case it is built for):
* each batch is stacked straight into one of two **pinned** host buffers and copied to the GPU
  with a **non-blocking copy on a side stream**, so batch k+1 is prepared and copied while
  batch k runs (``launch`` returns at once, ``finish`` waits for that batch alone). Images that
  GPU decoding left on the device are stacked there (``record_stream`` on the runner's stream);
  a batch mixing both has its host images copied and its device images stacked after them, and
  ``finish`` puts the results back in the images' order. A ``launch`` that fails releases its
  buffer (after waiting for what it had queued), so the next batches run;
* normalisation (uint8 -> (x/255-mean)/std), the forward pass, softmax and **top-k run on the
  device**; one small device->host copy per batch (k scores + k indices per image);
* eager batches are **padded to a bucket** (a multiple of :data:`BUCKET` images, at most the batch
  size; the padding rows' results are dropped) and every bucket is run once by ``warm_up``: with
  ``cudnn.benchmark`` on, each new input shape re-tunes every convolution, and the batcher cuts
  batches of any size, so unbucketed shapes would stall the first batches of every size;
* fp16 autocast + channels_last per the Classifier (whose start-up check against fp32 stays);
* options, each measured both ways by benchmarks/bench_gpu.py: ``torch.compile`` and **CUDA
  graphs** for the fixed batch shape (every batch is padded to it). Both at once
  (``reduce-overhead``) is refused where torch's compiled graphs fail off the main thread.

The CUDA calls go through a :class:`CudaOps` (streams, events, pinned and device buffers, graph
capture); tests pass a CPU stand-in (tests/unit/test_device_runner.py) to run the same bookkeeping.

On the CPU the same calls run synchronously (fp32, or bf16 autocast when asked), and the model is
traced to TorchScript (``HARDNET_TORCHSCRIPT``, on by default there): an eager forward releases and
re-takes the GIL around each of its hundreds of ops, and in a worker, whose fetch, decode and Celery
threads take the GIL thousands of times a second, every re-take can wait. The traced forward is
one call that holds the GIL only at its ends: closer to the model's own rate through the queue
(figures: docs/performance.md#against-its-limits-benchmarksbench_enginepy, ``latency39``); the
same ops, so the same numbers (tests/unit/test_engine.py).

Long: the pipelined path's bookkeeping (two buffers, streams, buckets, mixed batches, release on
error) and the device calls it makes (CudaOps, mirrored by the tests' stand-in) change together."""
from __future__ import annotations

import logging
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from hnq.errors import ConfigError
from worker.image.normalize import MEAN, STD, normalize

log = logging.getLogger("hardnet.worker")

CROP = 224
#: eager CUDA batches are padded to a multiple of this many images (at most the batch size)
BUCKET = 64


@dataclass
class Pending:
    n: int
    slot: int = 0
    event: object = None          # torch.cuda.Event recorded after the device->host copy
    start: object = None          # torch.cuda.Event recorded before the host->device copy
    result: tuple | None = None   # CPU: (scores, indices) lists, computed at launch
    order: list[int] | None = None  # mixed host/device batch: per image, its row in the batch


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


def compiled_graphs_off_main_thread() -> bool:
    """Does this torch run ``torch.compile(mode="reduce-overhead")`` (Inductor's CUDA graph trees)
    from a thread other than the main one? Not before the fix of pytorch/pytorch#123177
    (pytorch#184357: lazy per-thread state and a ``graph_capture_lock``; torch 2.11 asserts
    ``_is_key_in_tls`` in the engine's device thread, 2.14.1 has the fix). Feature-tested, not
    version-tested."""
    from torch._inductor import cudagraph_trees  # only asked when both options are on

    return hasattr(cudagraph_trees, "graph_capture_lock")


def bucket_sizes(batch_size: int, step: int) -> list[int]:
    """The batch shapes an eager CUDA runner uses: multiples of ``step`` below ``batch_size``, and
    ``batch_size`` itself (``step`` 0: every size from 1, i.e. no bucketing)."""
    if step <= 0:
        return list(range(1, batch_size + 1))
    return list(range(step, batch_size, step)) + [batch_size]


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


class CudaOps:
    """The CUDA calls of the pipelined runner. Its stand-in for tests has the same methods
    (tests/unit/test_device_runner.py: streams that are no-ops, events that record nothing,
    "device" tensors that refuse to be stacked with host ones, as CUDA ones do)."""

    def __init__(self, device: torch.device):
        self.device = device

    def stream(self):
        return torch.cuda.Stream(self.device)

    def use(self, stream):
        return torch.cuda.stream(stream)

    def current_stream(self):
        return torch.cuda.current_stream(self.device)

    def event(self):
        return torch.cuda.Event(enable_timing=True)

    def pinned(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype).pin_memory()

    def empty(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)

    def on_device(self, t: torch.Tensor) -> bool:
        return t.is_cuda

    def record_stream(self, t: torch.Tensor, stream) -> None:
        t.record_stream(stream)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def tune(self) -> None:
        torch.backends.cudnn.benchmark = True

    def capture(self, fn: Callable[[], tuple]) -> tuple[Callable[[], None], tuple]:
        """``fn``'s work captured as a CUDA graph: (replay, its static outputs). Thread-local
        capture mode: other threads' CUDA calls (another engine, the GPU decoder) during the
        capture neither break it nor are refused."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = fn()
        return graph.replay, out


class DeviceRunner:
    """A model on a device. ``launch``/``finish``: the engine's two-batches-in-flight calls;
    ``run``: one batch now, synchronously (the Classifier's). ``pipelined=False`` (the Classifier):
    no pinned buffers, side streams or CUDA graphs on CUDA; ``launch`` then runs synchronously.
    ``mean``/``std``: the normalisation of the model's weights entry (its ``preprocess``).
    ``ops``: the device calls of the pipelined path (default :class:`CudaOps` on CUDA; none on
    the CPU, which runs synchronously). ``bucket``: eager pipelined batches are padded to a
    multiple of it (default :data:`BUCKET`; 0: no padding)."""

    def __init__(self, net: torch.nn.Module, device: torch.device, batch_size: int, *,
                 amp: bool, k: int = 5, compile: bool = False, cuda_graphs: bool = False,
                 torchscript: str = "off", pipelined: bool = True,
                 mean: Sequence[float] = MEAN, std: Sequence[float] = STD,
                 ops: CudaOps | None = None, bucket: int | None = None):
        self.device = device
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.cuda = device.type == "cuda"
        if ops is None and self.cuda:
            ops = CudaOps(device)
        self.ops = ops
        self.pipelined = pipelined and ops is not None
        self.B = batch_size
        self.k = k
        self.amp = amp
        self.channels_last = self.cuda or amp
        self.compiled = compile
        self.graphs = cuda_graphs and self.pipelined
        if cuda_graphs and not self.pipelined:
            log.warning("CUDA graphs asked for on %s%s: ignored", device,
                        "" if self.cuda else " without pipelining")
        if compile and self.graphs and not compiled_graphs_off_main_thread():
            raise ConfigError(
                f"HARDNET_COMPILE=true with HARDNET_CUDA_GRAPHS=true needs a torch whose compiled CUDA "
                f"graphs run outside the main thread (pytorch/pytorch#123177; torch "
                f"{torch.__version__} has not the fix): set one of them to false")
        self.torchscript = use_torchscript(torchscript, device, amp=amp, compile=compile)
        self.net = trace(net, device) if self.torchscript else net
        if compile:
            # Both options: Inductor's own CUDA graphs ("reduce-overhead") on the fixed shape.
            mode = "reduce-overhead" if self.graphs else None
            self.net = torch.compile(net, mode=mode, dynamic=False)
        # Fixed shapes (padding to the batch size) whenever something specialises on the shape;
        # else, on the pipelined path, bucketed shapes (padding to the next bucket).
        self.pad = compile or self.graphs
        self.bucket = 0 if self.pad or not self.pipelined else BUCKET if bucket is None else bucket
        self._replay = None
        if self.pipelined:
            ops.tune()   # cuDNN autotuning: a few shapes only (the buckets or the batch size)
            self.copy_stream = ops.stream()
            self.stream = ops.stream()
            self.host_in = [ops.pinned((batch_size, 3, CROP, CROP), torch.uint8) for _ in range(2)]
            self.host_scores = [ops.pinned((batch_size, k), torch.float32) for _ in range(2)]
            self.host_idx = [ops.pinned((batch_size, k), torch.int64) for _ in range(2)]
            self.dev_in = [ops.empty((batch_size, 3, CROP, CROP), torch.uint8) for _ in range(2)]
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
        ops = self.ops
        self._static_in = ops.empty((self.B, 3, CROP, CROP), torch.uint8)
        self._static_in.zero_()
        side = ops.stream()
        side.wait_stream(ops.current_stream())
        with ops.use(side):
            for _ in range(3):  # warm-up: cuDNN autotuning and allocations happen outside the graph
                self._forward(self._static_in)
        ops.current_stream().wait_stream(side)
        self._replay, (self._static_scores, self._static_idx) = ops.capture(
            lambda: self._forward(self._static_in))
        ops.synchronize()
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
    def rows(self, n: int) -> int:
        """The batch shape a launch of ``n`` images runs: the batch size when padded, the next
        bucket on the bucketed path, else ``n``."""
        if self.pad:
            return self.B
        if self.bucket:
            return min(self.B, -(-n // self.bucket) * self.bucket)
        return n

    @torch.inference_mode()
    def launch(self, images: list[torch.Tensor]) -> Pending:
        n = len(images)
        if n > self.B:
            raise ValueError(f"batch of {n} > batch size {self.B}")
        if not self.pipelined:
            if self.cuda:
                images = [t.to(self.device, non_blocking=True) for t in images]
            x = torch.stack(images)
            if self.pad and n < self.B:
                x = torch.cat([x, x[:1].expand(self.B - n, -1, -1, -1)])
            scores, idx = self._forward(x)
            return Pending(n, result=(scores[:n].tolist(), idx[:n].tolist()))
        slot = self._next
        if self._busy[slot]:
            raise RuntimeError("device runner: both buffers in flight; finish() one first")
        self._busy[slot] = True
        try:
            pending = self._launch(images, slot)
        except BaseException:
            self._release_after_error(slot)
            raise
        self._next = 1 - slot   # a failed launch leaves the next one on its (released) buffer
        return pending

    def _release_after_error(self, slot: int) -> None:
        """A launch failed: wait for whatever it had queued on this buffer, then free the buffer
        (the error path only: the device-wide wait costs nothing on the way batches go)."""
        try:
            self.ops.synchronize()
        except Exception:  # noqa: BLE001 - a broken device: the launch's own error is the news
            log.exception("device runner: synchronising after a failed launch failed too")
        finally:
            self._busy[slot] = False

    def _launch(self, images: list[torch.Tensor], slot: int) -> Pending:
        ops, n = self.ops, len(images)
        on_device = [ops.on_device(t) for t in images]
        d = sum(on_device)
        order = None
        if 0 < d < n:
            # mixed (GPU decoding with CPU fallbacks): host images in rows [0, c), device ones after
            staged = [i for i in range(n) if not on_device[i]] + [i for i in range(n) if on_device[i]]
            order = [0] * n
            for row, i in enumerate(staged):
                order[i] = row
            images = [images[i] for i in staged]
        c = n - d
        buf = self.dev_in[slot]
        start, done = ops.event(), ops.event()
        if c:
            torch.stack(images[:c], out=self.host_in[slot][:c])
            with ops.use(self.copy_stream):
                start.record()
                buf[:c].copy_(self.host_in[slot][:c], non_blocking=True)
        if d:
            # GPU-decoded images: already on the device (the decoder synchronised after them).
            self.stream.wait_stream(ops.current_stream())
            with ops.use(self.stream):
                if not c:
                    start.record()
                self._keep_until_used(images[c:])
                torch.stack(images[c:], out=buf[c:n])
        if c:
            self.stream.wait_stream(self.copy_stream)
        with ops.use(self.stream):
            if self._replay is not None:
                self._static_in.copy_(buf)
                self._replay()
                scores, idx = self._static_scores, self._static_idx
            else:
                scores, idx = self._forward(buf[:self.rows(n)])
            self.host_scores[slot][:n].copy_(scores[:n], non_blocking=True)
            self.host_idx[slot][:n].copy_(idx[:n], non_blocking=True)
            done.record()
        return Pending(n, slot=slot, event=done, start=start, order=order)

    def _keep_until_used(self, images: list[torch.Tensor]) -> None:
        """Device images are read on the runner's stream but were allocated on another (the
        decoder's caller's): ``record_stream`` keeps their memory from being handed out again
        before that read is done. Once per underlying buffer (the decoder returns rows of one)."""
        seen: set[int] = set()
        for t in images:
            base = t if t._base is None else t._base
            if id(base) not in seen:
                seen.add(id(base))
                self.ops.record_stream(base, self.stream)

    def finish(self, p: Pending) -> tuple[list[list[float]], list[list[int]], float | None]:
        """(scores, indices, device milliseconds or None on the CPU) of a launched batch."""
        if p.result is not None:
            return p.result[0], p.result[1], None
        try:
            p.event.synchronize()
            ms = p.start.elapsed_time(p.event)
            scores = self.host_scores[p.slot][:p.n].tolist()
            idx = self.host_idx[p.slot][:p.n].tolist()
        finally:
            self._busy[p.slot] = False
        if p.order is not None:
            scores = [scores[row] for row in p.order]
            idx = [idx[row] for row in p.order]
        return scores, idx, ms

    def warm_up(self) -> None:
        """Each batch shape the runner will use (the buckets, or the padded batch) once through
        the whole path before work: compilation, cuDNN autotuning."""
        t0 = time.monotonic()
        img = torch.zeros((3, CROP, CROP), dtype=torch.uint8)
        sizes = bucket_sizes(self.B, self.bucket) if self.pipelined and not self.pad else [1]
        for m in sizes:
            self.finish(self.launch([img] * m))
        log.info("device warm-up (batch %d%s%s%s) took %.1fs", self.B,
                 ", compiled" if self.compiled else "", ", CUDA graphs" if self.graphs else "",
                 f", shapes {sizes}" if len(sizes) > 1 else "", time.monotonic() - t0)
