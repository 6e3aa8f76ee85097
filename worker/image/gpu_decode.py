"""Optional GPU JPEG decoding (``HARDNET_DECODE=cpu|gpu|auto``): nvJPEG through torchvision, then the
same resize + center crop as :func:`worker.image.decode.decode_image`, on the device.

    dec = GpuDecoder(torch.device("cuda"), max_pixels=s.max_pixels, cpu_decode=decode_image)
    out = dec.decode_batch(blobs)   # per blob: uint8 [3, 224, 224] on the device, or its ImageError

Routing, per blob (:func:`gpu_eligible`, from our own header parse, :func:`decode.jpeg_info`):

* to nvJPEG: JPEG, sequential (SOF0 baseline / SOF1 extended), 8-bit, 1 or 3 components, declared
  width*height within ``max_pixels``, an EOI marker at the end (a truncated file goes to the CPU,
  whose decoder reports it as ``decode_error``; nvJPEG might return a half-grey picture instead),
  and not so elongated that the CPU path would compute only the crop window (``resize.is_extreme``);
* everything else (progressive, CMYK/YCCK, 12-bit, PNG, WebP, ..., corrupt, empty, too large) to
  ``cpu_decode`` one by one: the same tensor or the same ``ImageError`` as the CPU worker gives.
* The eligible ones are decoded in batched calls (one, unless their decoded RGB would exceed 1 GiB:
  then several, so that big photos do not pile up on the device). nvJPEG's batched call fails as a whole if one
  image is bad (torchvision returns no partial result), so on an exception each image of that call
  is retried alone on the GPU, and those that fail again go to ``cpu_decode``: one bad image costs
  one record, never the batch.

Geometry: shorter side to ``resize`` (``resize.resized_size``, as torchvision's Resize(int)),
bilinear with antialias, center crop ``crop`` -- the CPU path's. On CUDA torch has no uint8
antialiased bilinear kernel (torchvision's ``resize_image`` itself converts uint8 to float32 on
CUDA, in 0.26 as in 0.29), so we resize in float32 and round back to uint8. The CPU path uses
torch's uint8 fixed-point kernel, two single-axis passes rounded to uint8 in between, in PIL's pass
order; we do the same two passes in float32, rounding after each, which brings us to 1 level on
~0.3% of the values of the CPU result (a single 2-D float pass: ~17%). Images of the same decoded
size are resized as one batch.

The nvJPEG hazard, and the guard
--------------------------------
torchvision's CUDA decoder (``decode_jpegs_cuda``) allocates its output tensors with the caching
allocator on the *caller's* current stream but writes them from a private stream that is never
ordered against the caller's (pytorch/vision#9606); and nvJPEG's hardware batched path
(``nvjpegDecodeBatched``, A100/H100 JPEG engine) does not honour stream order at all: it writes its
destinations when the call is made, even with work queued before it on its stream, and a
device-side ``cudaStreamWaitEvent`` does not gate it -- only a host wait does
(meta-pytorch/torchcodec#1634, which adds a ``cudaStreamSynchronize`` before the batched decode;
reproduced on H100, not on A100). So a block freed by the caller while kernels still read it can be
handed to the decoder and overwritten: wrong numbers or NaNs in code that never touched the decoder.

What we do about it:

1. All our decoder work (the nvJPEG call and the resize) runs with a dedicated stream current, so
   the decoder's output blocks come from that stream's pool of the caching allocator (a freed block
   is only reused on the stream it belongs to): blocks that other threads (the model) free on their
   streams are never handed to nvJPEG.
2. Before every nvJPEG call (batched or a single-image retry) the host waits for **our stream**
   (``Stream.synchronize``): by 1., every block nvJPEG can be handed was freed on our stream (or
   was never used), so once the work queued there is done nothing can still be reading it. Not
   the whole device: that would also wait for the model's batches in flight on the runner's
   streams, whose blocks are never ours. After a failed call the host waits for the whole
   device (``torch.cuda.synchronize``; the rare path), as torchvision's private stream may
   still be writing what the failed call allocated before we free it.
3. What we return is our own tensor: rows of one ``[n, 3, crop, crop]`` buffer allocated on the
   caller's stream, never seen by the decoder, filled from the resized images on our stream after
   waiting (device-side) for the caller's stream; we synchronise our stream before returning, so the
   results are complete whatever stream the caller uses them on. Nothing returned aliases a
   decoder output. A consumer on another stream calls ``record_stream`` on them (the engine's
   runner does: worker.engine.device), so that their memory is not reused before it has read them.

The cost: host waits on our own stream, a few per batch of up to a few hundred images.

torchvision 0.29 deprecates its image decoders and warns on every call of the Python wrappers: as
decode.py does, we call the kernel that ``torchvision.io.decode_jpeg(list, device='cuda',
mode=ImageReadMode.RGB)`` itself calls (``torch.ops.image.decode_jpegs_cuda(list, mode, device)``,
same schema in 0.26 and 0.29), and the wrapper only if that op is missing.
"""
from __future__ import annotations

import io
import logging
from contextlib import nullcontext
from functools import lru_cache
from typing import Callable

import torch
import torchvision.io
import torchvision.transforms.v2.functional as TF
from PIL import Image

from hnq.errors import ConfigError, ErrorCode, ImageError
from worker.image.decode import jpeg_info, sniff_format
from worker.image.resize import is_extreme, pillow_vertical_first, resized_size

__all__ = ["DECODE_MODES", "GpuDecoder", "gpu_eligible", "resolve_decode_mode"]

log = logging.getLogger(__name__)

DECODE_MODES = ("cpu", "gpu", "auto")
_GPU_SOF = frozenset({0xC0, 0xC1})   # baseline and extended sequential, Huffman
_RGB = torchvision.io.ImageReadMode.RGB
_EOI_TAIL = 64                       # EOI must lie in the last this-many bytes (trailing padding)
_RESIZE_ELEMS = 1 << 27              # float32 elements per resize call (512 MiB) before splitting
_DECODE_BYTES = 1 << 30              # decoded RGB bytes per nvJPEG call (1 GiB) before splitting


def gpu_eligible(data: bytes, max_pixels: int) -> bool:
    """Can nvJPEG's batched path take these bytes? Pure CPU, header only (see the module doc):
    a sequential 8-bit JPEG with 1 or 3 components, 0 < width*height <= max_pixels, ending in EOI."""
    if not data or sniff_format(data) != "JPEG":
        return False
    info = jpeg_info(data)
    if info is None or info.sof not in _GPU_SOF or info.precision != 8 or info.components not in (1, 3):
        return False
    if info.width <= 0 or info.height <= 0 or info.width * info.height > max_pixels:
        return False
    return data.rfind(b"\xff\xd9", max(0, len(data) - _EOI_TAIL)) != -1


def _nvjpeg_op(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    op = getattr(torch.ops.image, "decode_jpegs_cuda", None)
    if op is not None:
        return op(tensors, _RGB.value, device)
    return torchvision.io.decode_jpeg(tensors, mode=_RGB, device=device)


def _probe_jpeg() -> tuple[bytes, torch.Tensor]:
    g = torch.arange(48 * 40, dtype=torch.int64).reshape(40, 48)
    rgb = torch.stack([(g * 5) % 256, (g // 48) * 6, 255 - (g % 48) * 5], dim=-1).to(torch.uint8)
    b = io.BytesIO()
    Image.fromarray(rgb.numpy(), "RGB").save(b, "JPEG", quality=95)
    return b.getvalue(), rgb.permute(2, 0, 1)


@lru_cache(maxsize=8)
def _nvjpeg_works(device: torch.device) -> str | None:
    """None if a small JPEG decodes on `device` with nvJPEG to about the right picture, else why not."""
    try:
        data, want = _probe_jpeg()
        torch.cuda.synchronize(device)
        (got,) = _nvjpeg_op([torch.frombuffer(bytearray(data), dtype=torch.uint8)], device)
        torch.cuda.synchronize(device)
        diff = (got.cpu().int() - want.int()).abs().float().mean().item()
        if tuple(got.shape) != tuple(want.shape) or diff > 8:
            return f"nvJPEG decoded a test image wrongly (shape {tuple(got.shape)}, mean error {diff:.1f})"
        return None
    except Exception as e:  # no nvJPEG in this build, driver trouble, ...
        return f"{type(e).__name__}: {e}"


def resolve_decode_mode(mode: str, device: torch.device) -> str:
    """``HARDNET_DECODE`` -> "cpu" or "gpu". ``auto``: gpu when `device` is CUDA and nvJPEG decodes a
    test image there, else cpu. ``gpu`` where that is not so: :class:`ConfigError` saying why."""
    m = str(mode).strip().lower()
    if m not in DECODE_MODES:
        raise ConfigError(f"unsupported decode mode {mode!r}: use cpu, gpu or auto (HARDNET_DECODE)")
    if m == "cpu":
        return "cpu"
    device = torch.device(device)
    if device.type != "cuda":
        if m == "auto":
            return "cpu"
        raise ConfigError(f"HARDNET_DECODE=gpu needs a CUDA device, but the worker's device is "
                          f"{str(device)!r}; use HARDNET_DECODE=cpu or auto, or a cuda device")
    if not torch.cuda.is_available():
        if m == "auto":
            return "cpu"
        raise ConfigError("HARDNET_DECODE=gpu needs CUDA, which is not available here; "
                          "use HARDNET_DECODE=cpu or auto")
    why = _nvjpeg_works(device)
    if why is None:
        return "gpu"
    if m == "auto":
        log.warning("GPU JPEG decoding unavailable on %s (%s): decoding on the CPU", device, why)
        return "cpu"
    raise ConfigError(f"HARDNET_DECODE=gpu: nvJPEG does not work on {device}: {why}; "
                      "use HARDNET_DECODE=cpu or auto")


def _as_image_error(e: BaseException) -> ImageError:
    if isinstance(e, ImageError):
        return e
    return ImageError(f"internal error decoding the image: {type(e).__name__}: {e}",
                      ErrorCode.internal_error)


class GpuDecoder:
    """Batched nvJPEG decode + resize + center crop on one CUDA device, with per-image CPU fallback.
    Not thread-safe: one decoder per calling thread (the engine calls it from one thread)."""

    def __init__(self, device: torch.device, *, max_pixels: int,
                 cpu_decode: Callable[[bytes], torch.Tensor], resize: int = 256, crop: int = 224):
        device = torch.device(device)
        self._check_device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.max_pixels = max_pixels
        self.cpu_decode = cpu_decode
        self.resize = resize
        self.crop = crop
        self._cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self._cuda else None
        #: counters, for logs and tests: images decoded by nvJPEG / sent to cpu_decode / batched
        #: calls that failed and were retried one by one
        self.stats = {"gpu": 0, "cpu": 0, "batch_failures": 0}

    # -- hooks (tests replace them to run the routing on a CPU) --
    def _check_device(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ConfigError(f"GpuDecoder needs a CUDA device, not {str(device)!r}")

    def _nvjpeg(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return _nvjpeg_op(tensors, self.device)

    def _sync_stream(self) -> None:
        """Host wait for the work queued on our stream (guard 2)."""
        if self._cuda:
            self._stream.synchronize()

    def _sync_device(self) -> None:
        """Host wait for the whole device (after a failed nvJPEG call only)."""
        if self._cuda:
            torch.cuda.synchronize(self.device)

    # -- decoding --
    def eligible(self, data: bytes) -> bool:
        if not isinstance(data, (bytes, bytearray, memoryview)) or not gpu_eligible(bytes(data), self.max_pixels):
            return False
        info = jpeg_info(bytes(data))
        return not is_extreme(info.height, info.width, self.resize, self.crop)

    def _decode_guarded(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """One nvJPEG call behind the host barrier (module doc, guard 2). Called with our stream
        current (decode_batch), so nvJPEG's outputs come from our stream's pool."""
        self._sync_stream()
        try:
            out = self._nvjpeg(tensors)
        except Exception:
            self._sync_device()  # nothing the failed call launched may still be writing
            raise
        # torchvision host-waits for its own stream before returning; this also covers any
        # write queued on our stream that stream order would not show (torchcodec#1634).
        self._sync_stream()
        for t in out:
            if t.dtype != torch.uint8 or t.dim() != 3 or t.shape[0] != 3:
                raise RuntimeError(f"unexpected nvJPEG output {t.dtype} {tuple(t.shape)}")
        return out

    def _gpu_decode(self, blobs: list[bytes]) -> list[torch.Tensor | None]:
        """Decoded [3,H,W] uint8 on the device per blob, None where nvJPEG would not decode it."""
        if not blobs:
            return []
        tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        try:
            return list(self._decode_guarded(tensors))
        except Exception as e:
            if len(tensors) == 1:
                return [None]
            self.stats["batch_failures"] += 1
            log.info("batched nvJPEG decode of %d images failed (%s: %s): retrying one by one",
                     len(tensors), type(e).__name__, e)
        out: list[torch.Tensor | None] = []
        for t in tensors:
            try:
                out.append(self._decode_guarded([t])[0])
            except Exception:
                out.append(None)
        return out

    def _resize_crop(self, imgs: list[torch.Tensor], dst: torch.Tensor) -> None:
        """Resize + center crop same-size decoded images [3,H,W] uint8 into dst [n,3,crop,crop]:
        two single-axis float32 passes, each rounded to integers as the CPU path's uint8 passes are,
        in the order resize.py uses (PIL's). One 2-D float pass instead differs from the CPU result
        by 1 level on ~17% of the values; this on ~0.3% (measured, test_fake_resize_matches_cpu_geometry)."""
        h, w = imgs[0].shape[-2:]
        nh, nw = resized_size(h, w, self.resize)
        steps = []
        if (h, w) != (nh, nw):
            if pillow_vertical_first(w, h, nw, nh):
                steps.append([nh, w])
            elif w != nw and h != nh:
                steps.append([h, nw])
            steps.append([nh, nw])
        per = max(1, _RESIZE_ELEMS // (3 * max(h * w, nh * nw, h * nw, nh * w)))
        for i in range(0, len(imgs), per):
            x = torch.stack(imgs[i:i + per])
            if steps:
                x = x.float()
                for size in steps:
                    x = TF.resize_image(x, size, interpolation=TF.InterpolationMode.BILINEAR,
                                        antialias=True).round_()
                x = x.clamp_(0, 255)
            x = TF.center_crop_image(x, [self.crop, self.crop])
            dst[i:i + x.shape[0]].copy_(x)

    def _chunks(self, idx: list[int], blobs: list[bytes]) -> list[list[int]]:
        """Split the eligible images into nvJPEG calls of at most _DECODE_BYTES of decoded RGB, so
        that a batch of big photos never holds more than that on the device at once."""
        chunks: list[list[int]] = []
        size = 0
        for i in idx:
            info = jpeg_info(blobs[i])
            need = 3 * info.width * info.height
            if chunks and size + need <= _DECODE_BYTES:
                chunks[-1].append(i)
                size += need
            else:
                chunks.append([i])
                size = need
        return chunks

    def decode_batch(self, blobs: list[bytes]) -> list[torch.Tensor | Exception]:
        """One entry per blob, in order: a uint8 [3, crop, crop] tensor ON THE DEVICE, or the
        exception (an hnq.errors.ImageError with its code, as decode.decode_image raises) for that blob."""
        n = len(blobs)
        if n == 0:
            return []
        blobs = [b if isinstance(b, bytes) else bytes(b) if b is not None else b"" for b in blobs]
        results: list[torch.Tensor | Exception | None] = [None] * n
        # guard 3: our own buffer (one row per blob), from the caller's stream pool; written on our
        # stream once that has waited for the caller's; never handed to the decoder.
        out = torch.empty((n, 3, self.crop, self.crop), dtype=torch.uint8, device=self.device)
        on_gpu: set[int] = set()
        caller = torch.cuda.current_stream(self.device) if self._cuda else None
        ctx = torch.cuda.stream(self._stream) if self._cuda else nullcontext()
        with ctx:
            if self._cuda:
                self._stream.wait_stream(caller)
            for chunk in self._chunks([i for i in range(n) if self.eligible(blobs[i])], blobs):
                decoded = self._gpu_decode([blobs[i] for i in chunk])
                groups: dict[tuple[int, int], list[int]] = {}
                for i, t in zip(chunk, decoded):
                    if t is not None:
                        groups.setdefault(tuple(t.shape[-2:]), []).append(i)
                by_index = dict(zip(chunk, decoded))
                for idx in groups.values():
                    tmp = torch.empty((len(idx), 3, self.crop, self.crop), dtype=torch.uint8,
                                      device=self.device)
                    self._resize_crop([by_index[i] for i in idx], tmp)
                    out.index_copy_(0, torch.tensor(idx, device=self.device), tmp)
                    on_gpu.update(idx)
                # this chunk's decoder outputs are freed here, on our stream, with our resize
                # kernels maybe still reading them: the next nvJPEG call host-syncs first.
                del decoded, by_index
            for i in range(n):
                if i in on_gpu:
                    continue
                try:
                    t = self.cpu_decode(blobs[i])
                    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 \
                            or tuple(t.shape) != (3, self.crop, self.crop):
                        raise RuntimeError(f"cpu_decode gave {getattr(t, 'dtype', type(t))} "
                                           f"{tuple(getattr(t, 'shape', ()))}")
                    out[i].copy_(t)
                    results[i] = out[i]
                except Exception as e:
                    results[i] = _as_image_error(e)
            if self._cuda:
                self._stream.synchronize()  # results complete, whatever stream the caller uses
        for i in on_gpu:
            results[i] = out[i]
        self.stats["gpu"] += len(on_gpu)
        self.stats["cpu"] += n - len(on_gpu)
        return results  # type: ignore[return-value]
