"""Resize (shorter side, bilinear, antialiased) + center crop of a decoded uint8 image: the geometry
of the standard HarDNet transform, shared by the CPU decode (:mod:`worker.image.decode`) and the GPU
one (:mod:`worker.image.gpu_decode`), which must agree with it.

* The antialiased uint8 bilinear resize of ``torchvision.transforms.v2`` (torch's port of Pillow's
  fixed-point resampler): ~6x faster than PIL's, at most 1 uint8 level off it on typically
  0.05-0.3% of values (its weights have ~14 fractional bits, Pillow's 22); a few scale factors do
  worse (288 -> 256 wide: 0.66% of one pass's values; 1 of 80 random geometries over 0.5%). Both
  resamplers round to uint8 between their two passes, so the pass order matters (~1 value in 10
  off by 1 otherwise): torch always goes horizontal first, Pillow 13 goes vertical first when the
  height shrinks by more than twice as many pixels as the width (e.g. 300x2000, 1080x2400
  portraits); we then do the two passes as two single-axis resizes in PIL's order
  (:func:`pillow_vertical_first`).
* Extreme aspect ratios (resized intermediate over 4 Mpx, i.e. aspect > ~64: 4000x3 would be
  341333x256, :func:`is_extreme`): only the crop window is computed, with PIL's single-axis resizes
  on the source window (a `box`), since a 1x90M-pixel image would need 256 x 23G pixels. Not
  bit-exact either (PIL takes the box as float32), measured <= 1 level on < 0.2% of values.

Why the kernel is called directly (figures: docs/performance.md#decode_images-own-python-direct-resize-and-crop-2026-12-06-third-session).
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

__all__ = ["is_extreme", "pil_to_chw", "pillow_vertical_first", "resize_crop_tensor",
           "resize_crop_window", "resized_size"]

# Resized intermediate over this many pixels (aspect ratio > ~60) -> only the crop window is computed.
_MAX_INTERMEDIATE = 4 * 1024 * 1024


def resized_size(h: int, w: int, resize: int) -> tuple[int, int]:
    """(new_h, new_w) exactly as torchvision's Resize(int) computes it."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = resize, int(resize * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def is_extreme(h: int, w: int, resize: int, crop: int) -> bool:
    """Would the full resized intermediate be big (a very long strip of an image)?"""
    nh, nw = resized_size(h, w, resize)
    return resize >= crop and nh * nw > _MAX_INTERMEDIATE


def pil_to_chw(im: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 [3,H,W] (a view of a writable HWC array)."""
    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)


_VFIRST_PROBE: list[bool] = []


def pillow_vertical_first(w: int, h: int, nw: int, nh: int) -> bool:
    """Does PIL's resize of (w, h) to (nw, nh) do its vertical pass first?

    Both passes round to uint8, so the order shows in about 1 value in 10 (by 1 level). Pillow
    did the horizontal pass first up to 12.x; Pillow 13 does the vertical one first when the height
    shrinks by more than twice as many pixels as the width (measured on 660 random geometries).
    Which behaviour this Pillow has is probed once, on a tiny image."""
    if w == nw or h == nh:
        return False  # one pass only
    if not _VFIRST_PROBE:
        rng = np.random.default_rng(1234)
        im = Image.fromarray(rng.integers(0, 256, (40, 12, 3), dtype=np.uint8), "RGB")
        bl = Image.Resampling.BILINEAR
        got = np.asarray(im.resize((10, 20), bl))
        vh = np.asarray(im.resize((12, 20), bl).resize((10, 20), bl))
        hv = np.asarray(im.resize((10, 40), bl).resize((10, 20), bl))
        _VFIRST_PROBE.append(bool((got == vh).all() and not (got == hv).all()))
    return _VFIRST_PROBE[0] and nh < h and (h - nh) > 2 * (w - nw)


@lru_cache(maxsize=1)
def _native_uint8_resize() -> bool:
    """Does torchvision run torch's uint8 antialiased bilinear kernel on this CPU (AVX2, AVX512 or
    ARM64)? Asked of torchvision itself, once; elsewhere it resizes in float32 and rounds, and so
    do we (through its function)."""
    try:
        from torchvision.transforms.v2.functional._geometry import _do_native_uint8_resize_on_cpu
    except ImportError:
        return False
    return (_do_native_uint8_resize_on_cpu(TF.InterpolationMode.BILINEAR)
            and hasattr(torch._C._nn, "_upsample_bilinear2d_aa"))


def _tensor_resize(t: torch.Tensor, size: list[int]) -> torch.Tensor:
    """uint8 [3,H,W] -> [3,*size]: what ``TF.resize_image(t, size, BILINEAR, antialias=True)``
    computes, with the kernel called directly where torchvision would call it. The wrapper's
    Python (checks, interpolate's dispatch) was most of its time per call, all of it holding the
    GIL, which a GPU worker's decode threads share (figures: docs/performance.md#decode_images-own-python-direct-resize-and-crop-2026-12-06-third-session;
    tests/unit/test_decode.py checks the two agree bit for bit)."""
    if not (_native_uint8_resize() and t.dtype == torch.uint8 and t.dim() == 3 and t.numel()):
        return TF.resize_image(t, size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    c, h, w = t.shape
    x = t.unsqueeze(0)
    st = x.stride()
    if st[0] != x.numel() and x.is_contiguous(memory_format=torch.channels_last):
        # torchvision's restride (pytorch#68430): keeps a decoder's HWC layout channels_last
        # through the kernel instead of a repacking copy; the values are the same either way.
        x = x.as_strided((1, c, h, w), (x.numel(),) + st[1:])
    return torch._C._nn._upsample_bilinear2d_aa(x, size, False, None)[0]


def resize_crop_tensor(t: torch.Tensor, size: tuple[int, int], crop: int) -> torch.Tensor:
    """uint8 [3,H,W] -> resized to `size` (h, w) -> center crop. torch's uint8 antialiased kernel
    (a port of Pillow's, horizontal pass then vertical) does the passes in PIL's order."""
    h, w = t.shape[-2:]
    nh, nw = size
    if (h, w) != (nh, nw):
        if pillow_vertical_first(w, h, nw, nh):
            t = _tensor_resize(t, [nh, w])
        t = _tensor_resize(t, [nh, nw])
    if crop <= min(nh, nw):
        top, left = int(round((nh - crop) / 2.0)), int(round((nw - crop) / 2.0))  # as TF's anchor
        t = t[:, top:top + crop, left:left + crop]
    else:
        t = TF.center_crop_image(t, [crop, crop])  # pads
    return t.contiguous()


def resize_crop_window(im: Image.Image, size: tuple[int, int], crop: int) -> torch.Tensor:
    """Resize to `size` (h, w) + center crop, computing only the crop window, for images whose full
    resized intermediate would be huge (1x100000 -> 256 x 25.6M). Cuts the source window the crop's
    filter taps lie in (plus a margin) and runs PIL's single-axis passes on it, with a source `box`
    in window coordinates (small numbers: PIL passes the box as float32), in PIL's pass order.
    Same filter taps and weights as the full resize up to float rounding of the box."""
    w, h = im.size
    nh, nw = size
    top = int(round((nh - crop) / 2.0))
    left = int(round((nw - crop) / 2.0))
    sx, sy = w / nw, h / nh

    def window(off: int, scale: float, n: int) -> tuple[int, int]:
        margin = max(1.0, scale) + 2.0  # bilinear support is max(1, scale) source pixels
        return (max(0, math.floor(off * scale - margin)),
                min(n, math.ceil((off + crop) * scale + margin)))

    x0, x1 = window(left, sx, w)
    y0, y1 = window(top, sy, h)
    win = im.crop((x0, y0, x1, y1))
    ww, wh = x1 - x0, y1 - y0
    hb = (left * sx - x0, (left + crop) * sx - x0)
    vb = (top * sy - y0, (top + crop) * sy - y0)
    bl = Image.Resampling.BILINEAR
    if pillow_vertical_first(w, h, nw, nh):
        win = win.resize((ww, crop), bl, box=(0, vb[0], ww, vb[1]))
        out = win.resize((crop, crop), bl, box=(hb[0], 0, hb[1], crop))
    else:
        win = win.resize((crop, wh), bl, box=(hb[0], 0, hb[1], wh))
        out = win.resize((crop, crop), bl, box=(0, vb[0], crop, vb[1]))
    return pil_to_chw(out).contiguous()
