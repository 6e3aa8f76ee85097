"""Decoding of encoded image bytes: the first three steps of the standard HarDNet transform, on the
hot path of the worker and of ``hardnet classify``.

The standard transform (PyTorch Hub HarDNet page; :mod:`worker.image.reference` applies it with PIL):

    RGB conversion -> Resize(256) (shorter side, bilinear, antialiased) -> CenterCrop(224)
    -> ToTensor -> Normalize(MEAN, STD)

:func:`decode_image` does the first three steps (the resize and crop: :mod:`worker.image.resize`)
and returns **uint8** ``[3, 224, 224]``; the last two (:mod:`worker.image.normalize`) happen on the
device, on the whole batch.

Paths, chosen from the bytes (never from a file name):

* JPEG (8-bit, 1 or 3 components) -> ``torchvision`` libjpeg-turbo decode. Bit-identical to PIL's
  decode (same library, same IDCT, fancy upsampling, no EXIF orientation in either).
* PNG -> PIL decode (not torchvision's libpng decoder: it is only ~15% faster, prints libpng
  warnings on stderr for many real files, and crashes the process (SIGSEGV, seen on a
  "bad adaptive filter value" file) on some corrupt PNGs, which a worker fed arbitrary URLs must
  survive). Its IHDR is still parsed here, for the size check.
* WebP (still) -> ``torchvision`` libwebp decode; bit-identical to PIL. (torchvision's JPEG and
  WebP decoders survived 3000 fuzzed files each; the PNG one did not survive 300.)
* Every other format of :data:`hnq.formats.IMAGE_FORMATS` (the one list a listing keeps the
  extensions of: CMYK JPEG, 16-bit PNG, APNG, GIF, TIFF, AVIF, HEIC/HEIF, JPEG 2000, PNM, TGA, DDS,
  ...) -> PIL decode + :func:`to_rgb`; PIL opens those only (:func:`accepted_formats`; EPS, run
  through Ghostscript, and the rest of ``EXCLUDED_FORMATS`` are a ``decode_error``). HEIC/HEIF needs
  pillow-heif (registered once, lazily); without it a HEIF file's error names the package.
* Resize + crop: :mod:`worker.image.resize` (torch's uint8 antialiased resize, in PIL's pass order;
  for extreme aspect ratios only the crop window is computed, with PIL).
* If the fast decoder rejects the bytes, PIL gets them: we accept exactly what PIL accepts, and an
  error message is PIL's own.

Modes: ``to_rgb`` is ``PIL.Image.convert('RGB')`` except for 16-bit/32-bit integer images, which
PIL would clip at 255 (a white picture): I;16* keep their high byte (v >> 8, as PIL does for 16-bit
RGB PNGs), I is clipped to 0..65535 and then keeps its high byte; F is PIL's own conversion.
:func:`worker.image.reference.reference_preprocess` uses the same ``to_rgb``.

Limits: the declared width*height is checked against ``max_pixels`` from our own header parse
(JPEG, PNG, GIF, WebP, BMP) before any pixel is decoded, and for other formats from PIL's lazy
``Image.open`` (header only), before ``load()``. Global PIL state (``MAX_IMAGE_PIXELS``,
``LOAD_TRUNCATED_IMAGES``, warning filters) is never touched: ``decode_image`` is called from a thread
pool. PIL's own bomb guard (``DecompressionBombError``, or its warning when warnings are errors)
becomes ``too_large``; for formats we do not parse ourselves it means the effective cap is
``min(max_pixels, 2 * PIL.Image.MAX_IMAGE_PIXELS)``.

``fast_jpeg=True`` decodes JPEGs whose short side is >= 4x ``resize`` with libjpeg's DCT-domain
downscale (PIL ``Image.draft``, by 2/4/8) to no less than 2x the ``resize`` target, then the usual
resize. Measured on a noisy 4032x3024 q90 JPEG: 45 ms vs 67 ms exact (entropy decoding, which
DCT scaling cannot skip, is the floor); deviation max 3-5 levels at saturated colour edges, mean
0.2-0.3 levels.

torchvision 0.29 deprecates its image decoders (for TorchCodec): we call the ``torch.ops.image``
kernels directly (the Python wrappers warn on every call); if they go away, everything falls back
to PIL.
"""
from __future__ import annotations

import io
import math
import struct
import threading
from typing import NamedTuple

import numpy as np
import torch
import torchvision.io  # noqa: F401  (loads the image extension: registers torch.ops.image.*)
from PIL import Image, UnidentifiedImageError

from hnq.errors import ErrorCode, ImageError
from hnq.formats import EXCLUDED_FORMATS, HEIF_FORMATS, IMAGE_FORMATS
from worker.image.resize import (
    is_extreme, pil_to_chw, resize_crop_tensor, resize_crop_window, resized_size,
)

__all__ = ["DEFAULT_MAX_PIXELS", "decode_image", "to_rgb", "sniff_format", "JpegInfo", "jpeg_info",
           "accepted_formats", "heif_available"]

# PIL's own default (1 GiB / 4 bytes / 3): a 24-bit image this size is ~256 MiB decoded.
DEFAULT_MAX_PIXELS = 89_478_485

_RGB = 3  # torchvision ImageReadMode.RGB

_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class _Header(NamedTuple):
    fmt: str | None          # "JPEG", "PNG", ... or None (unknown to the sniffer)
    width: int | None
    height: int | None
    fast: str | None         # "jpeg" / "webp": torchvision decoder to try first; None: PIL


# ----------------------------------------------------------------------------- header parsing


def sniff_format(data: bytes) -> str | None:
    """The image format named by the magic bytes, or None."""
    head = data[:16]
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:2] == b"BM":
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head[4:8] == b"ftyp":
        return "HEIF/AVIF"
    if head[:4] == b"\x00\x00\x01\x00":
        return "ICO"
    if head[:2] in (b"P1", b"P2", b"P3", b"P4", b"P5", b"P6", b"P7"):
        return "PPM"
    return None


class JpegInfo(NamedTuple):
    """What the first SOF (start of frame) segment of a JPEG declares."""
    sof: int          # the marker's second byte: 0xC0 baseline, 0xC1 extended, 0xC2 progressive, ...
    width: int
    height: int
    components: int   # 1 grey, 3 YCbCr/RGB, 4 CMYK/YCCK
    precision: int    # bits per sample: 8 or 12 (16 for lossless)


def jpeg_info(data: bytes) -> JpegInfo | None:
    """The first SOF marker's fields, from a walk of the marker segments (no pixel is decoded), or
    None if no SOF comes before the first scan / the end of the bytes / a malformed segment."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        m = data[i + 1]
        if m == 0xFF:                       # fill byte
            i += 1
            continue
        if m == 0x01 or 0xD0 <= m <= 0xD8:  # markers without a length
            i += 2
            continue
        if m in (0xD9, 0xDA):               # EOI / SOS before any SOF
            return None
        if m in _SOF_MARKERS:
            if i + 10 > n:
                return None
            prec, h, w, nc = struct.unpack_from(">BHHB", data, i + 4)
            return JpegInfo(m, w, h, nc, prec)
        (seglen,) = struct.unpack_from(">H", data, i + 2)
        i += 2 + seglen
    return None


def _jpeg_header(data: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, components, precision) from the first SOF marker, or None if not found."""
    info = jpeg_info(data)
    return None if info is None else (info.width, info.height, info.components, info.precision)


def _png_header(data: bytes) -> tuple[int, int]:
    """(width, height) from IHDR. Raises struct.error / ValueError on a short or odd header."""
    if data[12:16] != b"IHDR":
        raise ValueError("no IHDR")
    return struct.unpack_from(">II", data, 16)


def _webp_header(data: bytes) -> tuple[int, int, bool] | None:
    """(width, height, still) or None."""
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack_from("<HH", data, 26)
        return w & 0x3FFF, h & 0x3FFF, True
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        (bits,) = struct.unpack_from("<I", data, 21)
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, True
    if chunk == b"VP8X" and len(data) >= 30:
        flags = data[20]
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h, not (flags & 0x02)
    return None


def _parse_header(data: bytes) -> _Header:
    fmt = sniff_format(data)
    try:
        if fmt == "JPEG":
            info = _jpeg_header(data)
            if info is not None:
                w, h, nc, prec = info
                fast = "jpeg" if nc in (1, 3) and prec == 8 and w and h else None
                return _Header(fmt, w, h, fast)
        elif fmt == "PNG":
            w, h = _png_header(data)
            return _Header(fmt, w, h, None)
        elif fmt == "WEBP":
            info = _webp_header(data)
            if info is not None:
                w, h, still = info
                return _Header(fmt, w, h, "webp" if still else None)
        elif fmt == "GIF":
            w, h = struct.unpack_from("<HH", data, 6)
            return _Header(fmt, w, h, None)
        elif fmt == "BMP":
            (dib,) = struct.unpack_from("<I", data, 14)
            if dib == 12:
                w, h = struct.unpack_from("<HH", data, 18)
            else:
                w, h = struct.unpack_from("<ii", data, 18)
            return _Header(fmt, abs(w), abs(h), None)
    except (struct.error, ValueError, IndexError):
        pass
    return _Header(fmt, None, None, None)


# ----------------------------------------------------------------------------- helpers


def _check_size(w: int, h: int, max_pixels: int, fmt: str | None) -> None:
    if w * h > max_pixels:
        raise ImageError(
            f"{fmt or 'image'} of {w}x{h} = {w * h} pixels is over the limit of {max_pixels} pixels",
            ErrorCode.too_large,
        )


def _decode_error(fmt: str | None, why: object) -> ImageError:
    what = f"cannot decode {fmt} image" if fmt else "not a recognised image"
    return ImageError(f"{what}: {why}", ErrorCode.decode_error)


def to_rgb(im: Image.Image) -> Image.Image:
    """``im.convert('RGB')``, except that 16/32-bit integer images keep their high byte instead of
    being clipped at 255 by PIL (which turns a 16-bit photo white)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im)
        if mode == "I":
            a = np.clip(a, 0, 65535)
        g = (a.astype(np.uint32) >> 8).astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(np.repeat(g[:, :, None], 3, axis=2)), "RGB")
    return im.convert("RGB")


def torchvision_decode(kind: str, data: bytes) -> torch.Tensor:
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    ops = torch.ops.image
    if kind == "jpeg":
        t = ops.decode_jpeg(buf, _RGB, False)
    else:
        t = ops.decode_webp(buf, _RGB)
    if t.dtype != torch.uint8 or t.dim() != 3 or t.shape[0] != 3:
        raise RuntimeError(f"unexpected decoder output {t.dtype} {tuple(t.shape)}")
    return t


_PIL_FORMATS: list[tuple[str, ...]] = []
_formats_lock = threading.Lock()
#: ISO-BMFF brands of HEIF images (the ``ftyp`` box): told apart from AVIF for the error message
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"})
_HEIF_HINT = ("HEIC/HEIF image: this worker cannot decode it without pillow-heif "
              "(pip install pillow-heif, or 'hardnet-queue[worker]')")


def _register_heif() -> bool:
    try:
        import pillow_heif  # optional: the worker extra brings it
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def _pil_formats() -> tuple[str, ...]:
    if not _PIL_FORMATS:
        with _formats_lock:
            if not _PIL_FORMATS:
                _register_heif()
                Image.init()  # registers every plugin (what Image.open does lazily anyway)
                # MPO is opened by the JPEG opener (it has none of its own)
                formats = tuple(f for f in IMAGE_FORMATS if f in Image.ID)
                assert not set(formats) & set(EXCLUDED_FORMATS), formats
                _PIL_FORMATS.append(formats)
    return _PIL_FORMATS[0]


def accepted_formats() -> tuple[str, ...]:
    """The PIL formats :func:`decode_image` opens: those of :data:`hnq.formats.IMAGE_FORMATS` that
    this PIL has (HEIF only with pillow-heif; MPO through the JPEG opener)."""
    return _pil_formats()


def heif_available() -> bool:
    """Whether pillow-heif is installed here (HEIC/HEIF decodes)."""
    _pil_formats()
    return bool(set(HEIF_FORMATS) & set(_PIL_FORMATS[0]))


def _is_heif(data: bytes) -> bool:
    return data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS


def _pil_open(data: bytes, fmt: str | None, max_pixels: int) -> Image.Image:
    try:
        im = Image.open(io.BytesIO(data), formats=_pil_formats())
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{fmt or 'image'}: {e}", ErrorCode.too_large) from None
    except UnidentifiedImageError:
        if _is_heif(data) and not heif_available():
            raise ImageError(_HEIF_HINT, ErrorCode.decode_error) from None
        hint = ""
        if not fmt:
            start = data[:256].lstrip().lower()
            if start.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")):
                hint = " (looks like an HTML/XML document)"
            elif start[:1] in (b"{", b"["):
                hint = " (looks like JSON)"
        raise _decode_error(fmt, f"unidentified data{hint}") from None
    except Exception as e:  # PIL plugins raise many types on bad headers
        raise _decode_error(fmt, f"{type(e).__name__}: {e}") from None
    w, h = im.size
    _check_size(w, h, max_pixels, im.format or fmt)
    if w <= 0 or h <= 0:
        raise _decode_error(im.format or fmt, f"empty {w}x{h} image")
    return im


def _pil_load_rgb(im: Image.Image, fmt: str | None) -> Image.Image:
    fmt = im.format or fmt
    try:
        im.load()
        return to_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{fmt or 'image'}: {e}", ErrorCode.too_large) from None
    except MemoryError:
        raise ImageError(f"{fmt or 'image'}: out of memory decoding it", ErrorCode.too_large) from None
    except Exception as e:
        raise _decode_error(fmt, f"{type(e).__name__}: {e}") from None


# ----------------------------------------------------------------------------- public API


def decode_image(data: bytes, *, resize: int = 256, crop: int = 224,
                 max_pixels: int = DEFAULT_MAX_PIXELS, fast_jpeg: bool = False) -> torch.Tensor:
    """Encoded image bytes -> uint8 ``[3, crop, crop]`` contiguous tensor: RGB, shorter side resized
    to ``resize`` (bilinear, antialiased), center-cropped. Within 1 uint8 level of
    :func:`reference_transform` (before its ToTensor/Normalize). Pure: safe from many threads.

    Raises :class:`ImageError` only: ``empty``, ``too_large`` (declared width*height > max_pixels,
    checked before decoding pixels) or ``decode_error``.
    """
    if data is None or len(data) == 0:
        raise ImageError("empty image (0 bytes)", ErrorCode.empty)
    if not isinstance(data, bytes):
        data = bytes(data)
    try:
        return _decode(data, resize, crop, max_pixels, fast_jpeg)
    except ImageError:
        raise
    except MemoryError:
        raise ImageError("out of memory decoding the image", ErrorCode.too_large) from None
    except Exception as e:  # a bug of ours: still one image's error, never a chunk failure
        raise ImageError(f"internal error decoding the image: {type(e).__name__}: {e}",
                         ErrorCode.internal_error) from None


def _decode(data: bytes, resize: int, crop: int, max_pixels: int, fast_jpeg: bool) -> torch.Tensor:
    hdr = _parse_header(data)
    if hdr.width is not None and hdr.height is not None:
        _check_size(hdr.width, hdr.height, max_pixels, hdr.fmt)

    if hdr.fast and not is_extreme(hdr.height, hdr.width, resize, crop):
        use_draft = (fast_jpeg and hdr.fmt == "JPEG"
                     and min(hdr.width, hdr.height) >= 4 * resize)
        if not use_draft:
            try:
                t = torchvision_decode(hdr.fast, data)
            except Exception:  # RuntimeError from libjpeg/libwebp; or the ops are gone
                t = None  # let PIL decide (and word the error)
            if t is not None:
                return resize_crop_tensor(t, resized_size(t.shape[1], t.shape[2], resize), crop)

    im = _pil_open(data, hdr.fmt, max_pixels)
    w, h = im.size
    size = resized_size(h, w, resize)
    if fast_jpeg and im.format in ("JPEG", "MPO") and min(w, h) >= 4 * resize:
        # DCT-domain downscale by 2/4/8, keeping >= 2x oversampling of the resize target.
        s = min(w, h)
        try:
            im.draft("RGB", (math.ceil(w * 2 * resize / s), math.ceil(h * 2 * resize / s)))
        except Exception as e:
            raise _decode_error(im.format, f"{type(e).__name__}: {e}") from None
    rgb = _pil_load_rgb(im, hdr.fmt)
    if is_extreme(h, w, resize, crop):
        return resize_crop_window(rgb, size, crop)
    return resize_crop_tensor(pil_to_chw(rgb), size, crop)
