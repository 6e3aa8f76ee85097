"""GPU JPEG decoding (worker.image.gpu_decode): header routing, mode resolution and the batch /
retry / CPU-fallback logic on the CPU (libjpeg-turbo standing in for nvJPEG); the real nvJPEG path,
its agreement with decode_image and the allocator-reuse hazard on CUDA only."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision.io
from PIL import Image

from hnq.errors import ConfigError, ErrorCode, ImageError
from worker.image import gpu_decode as gd
from worker.image.decode import decode_image, jpeg_info
from worker.image.gpu_decode import GpuDecoder, gpu_eligible, resolve_decode_mode

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")
MAXPX = 89_478_485

# nvJPEG vs decode_image on the CPU, per image, in uint8 levels. Not a guess: measured on the device,
# image by image, in two parts. (1) The decoders alone: nvJPEG's full-size RGB against libjpeg-turbo's
# (torchvision's CPU decode_jpeg) of the same bytes; printed ("decoders ..."), and held to the mean
# error at which gpu_decode's own start-up probe declares nvJPEG broken (NVJPEG_BROKEN_MEAN). (2) The
# whole path: resize + crop are bilinear with non-negative weights that sum to 1, so they never
# widen a difference in max norm; the result may therefore differ from decode_image by at most the
# decoders' difference on that image + the resize's own (RESIZE_MAX_ABS_LEVELS, measured below on
# the CPU) + 1 level for the rounding between the two passes. The mean is only printed (bounded
# by that max): no derivation bounds it tighter.
NVJPEG_BROKEN_MEAN = 8.0   # worker/image/gpu_decode.py's probe: mean error > 8 levels = a wrong picture
# Our float32 two-pass resize vs the CPU path's uint8 one, same decoded pixels (libjpeg-turbo on
# both sides), measured here (2 CPUs, torch 2.14.1) by the fake-* tests: downscales max 1 level,
# mean <= 0.003; 224 -> 256 upscales max 2, mean 0.043 (the worst case). See their printed lines.
RESIZE_MAX_ABS_LEVELS = 2
RESIZE_MEAN_ABS_LEVELS = 0.05


# ----------------------------------------------------------------------------- inputs


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Photo-like content: smooth colour gradients, sharp-edged blocks, some noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([120 + 100 * np.sin(x / w * 3.1 + y / h * 1.3 + seed),
                    60 + 150 * (x / w) * (y / h),
                    200 - 120 * np.cos(y / h * 4.0 + seed)], axis=-1)
    cell = max(8, w // 12)
    img[(x // cell + y // cell) % 2 == 0] *= 0.7
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def enc(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def sof_offset(data: bytes) -> int:
    i = data.index(b"\xff\xc0")
    assert jpeg_info(data).sof == 0xC0
    return i


def with_sof(data: bytes, marker: int, precision: int | None = None) -> bytes:
    """The same bytes with the SOF0 marker changed (and its precision byte): header-level fakes."""
    b = bytearray(data)
    i = sof_offset(data)
    b[i + 1] = marker
    if precision is not None:
        b[i + 4] = precision
    return bytes(b)


def scanless(data: bytes) -> bytes:
    """A JPEG cut right after its SOF segment, with an EOI: gpu_eligible sends it to nvJPEG; no pixels."""
    i = sof_offset(data)
    seglen = int.from_bytes(data[i + 2:i + 4], "big")
    return data[:i + 2 + seglen] + b"\xff\xd9"


@pytest.fixture(scope="module")
def base() -> bytes:
    return enc(photo(320, 240), quality=90)


# ----------------------------------------------------------------------------- gpu_eligible


def test_gpu_eligible_on_real_files(base):
    im = photo(320, 240)
    yes = {
        "baseline 4:2:0": base,
        "baseline 4:4:4": enc(im, quality=95, subsampling=0),
        "grayscale (1 component)": enc(im.convert("L"), quality=90),
        "extended sequential SOF1": with_sof(base, 0xC1),
        "exactly max_pixels": base,
        "trailing zero padding after EOI": base + b"\0" * 16,
    }
    no = {
        "progressive SOF2": enc(im, quality=90, progressive=True),
        "CMYK (4 components)": enc(im.convert("CMYK"), quality=90),
        "12-bit precision": with_sof(base, 0xC0, precision=12),
        "arithmetic coding SOF9": with_sof(base, 0xC9),
        "lossless SOF3": with_sof(base, 0xC3),
        "PNG": enc(im, "PNG"),
        "WebP": enc(im, "WEBP"),
        "truncated header (no SOF)": base[:20],
        "truncated body (no EOI)": base[:len(base) // 2],
        "empty": b"",
        "not an image": b"<html>no</html>",
        "zero height (DNL)": bytes(bytearray(base[:sof_offset(base) + 5]) + b"\0\0" + base[sof_offset(base) + 7:]),
    }
    for name, data in yes.items():
        assert gpu_eligible(data, 320 * 240 if name == "exactly max_pixels" else MAXPX), name
    for name, data in no.items():
        assert not gpu_eligible(data, MAXPX), name
    assert not gpu_eligible(base, 320 * 240 - 1)  # over max_pixels: too_large comes from the CPU path


def test_jpeg_info_is_the_decode_parser(base):
    info = jpeg_info(base)
    assert (info.sof, info.width, info.height, info.components, info.precision) == (0xC0, 320, 240, 3, 8)
    assert jpeg_info(enc(photo(64, 48), quality=80, progressive=True)).sof == 0xC2
    assert jpeg_info(b"\xff\xd8\xff") is None


# ----------------------------------------------------------------------------- resolve_decode_mode


def test_resolve_decode_mode():
    cpu = torch.device("cpu")
    assert resolve_decode_mode("cpu", cpu) == "cpu"
    assert resolve_decode_mode("auto", cpu) == "cpu"
    assert resolve_decode_mode(" AUTO ", cpu) == "cpu"
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        resolve_decode_mode("gpu", cpu)
    for bad in ("nvjpeg", "", "cuda"):
        with pytest.raises(ConfigError, match="use cpu, gpu or auto"):
            resolve_decode_mode(bad, cpu)
    if not CUDA:
        with pytest.raises(ConfigError, match="not available"):
            resolve_decode_mode("gpu", torch.device("cuda"))
        assert resolve_decode_mode("auto", torch.device("cuda")) == "cpu"
    assert resolve_decode_mode("cpu", torch.device("cuda")) == "cpu"  # never probes


def test_gpu_decoder_refuses_a_cpu_device():
    with pytest.raises(ConfigError, match="CUDA"):
        GpuDecoder(torch.device("cpu"), max_pixels=MAXPX, cpu_decode=decode_image)


def test_worker_setting():
    from worker.settings import WorkerSettings

    assert WorkerSettings().decode == "cpu"
    assert WorkerSettings(decode="GPU").decode == "gpu"
    from hnq.errors import ConfigError

    with pytest.raises(ConfigError, match="HARDNET_DECODE='fast'"):
        WorkerSettings(decode="fast")


# ----------------------------------------------------------------------------- routing, on the CPU


class LibjpegStandIn(GpuDecoder):
    """GpuDecoder's routing, batching, retries and resize with libjpeg-turbo in nvJPEG's place, on
    the CPU. Like nvJPEG's batched call, one undecodable image fails the whole call."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls: list[int] = []

    def _check_device(self, device):
        pass

    def _nvjpeg(self, tensors):
        self.calls.append(len(tensors))
        return [torch.ops.image.decode_jpeg(t, 3, False) for t in tensors]


MIXED_CAP = 1_000_000  # max_pixels for mixed_batch(): only its "too large" image is over it


def mixed_batch() -> dict[str, bytes]:
    good = {
        "500x375": enc(photo(500, 375, 1), quality=90),
        "375x500 portrait": enc(photo(375, 500, 2), quality=90),
        "500x375 again": enc(photo(500, 375, 3), quality=85),
        "1024x768": enc(photo(1024, 768, 4), quality=90),
        "224x224 (upscaled)": enc(photo(224, 224, 5), quality=90),
        "300x256 (short side already 256)": enc(photo(300, 256, 6), quality=90),
        "grayscale 400x300": enc(photo(400, 300, 7).convert("L"), quality=90),
        "4:4:4 333x251": enc(photo(333, 251, 8), quality=95, subsampling=0),
    }
    other = {
        "progressive": enc(photo(480, 360, 9), quality=90, progressive=True),
        "CMYK": enc(photo(400, 300, 10).convert("CMYK"), quality=90),
        "PNG": enc(photo(300, 200, 11), "PNG"),
    }
    bad = {
        "corrupt (header + garbage)": enc(photo(64, 48), quality=90)[:200] + b"\x00garbage" * 20,
        "scanless (eligible, undecodable)": scanless(enc(photo(64, 48), quality=90)),
        "empty": b"",
        "too large": enc(photo(1100, 1000, 12), quality=90),  # over MIXED_CAP
    }
    return {**good, **other, **bad}


def cpu_reference(blobs: list[bytes], max_pixels) -> list[torch.Tensor | ImageError]:
    out = []
    for b in blobs:
        try:
            out.append(decode_image(b, max_pixels=max_pixels(b)))
        except ImageError as e:
            out.append(e)
    return out


def levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.cpu().int() - b.cpu().int()).abs().float()


def check_against_cpu(names, got, ref, max_abs, mean_abs, label):
    """Every image against its CPU reference; ALL failures listed in one assertion (not the first).
    ``max_abs`` and ``mean_abs``: numbers, or functions of the image's name giving its bound."""
    assert len(got) == len(ref) == len(names)
    worst_max, worst_mean = 0.0, 0.0
    failures = []
    for name, g, r in zip(names, got, ref):
        if isinstance(r, ImageError):
            if not isinstance(g, ImageError):
                failures.append(f"{name}: expected ImageError {r.code}, got {type(g).__name__}")
            elif g.code != r.code:
                failures.append(f"{name}: code {g.code}, the CPU's {r.code}")
            continue
        if not isinstance(g, torch.Tensor):
            failures.append(f"{name}: expected an image, got {g!r}")
            continue
        if g.dtype != torch.uint8 or tuple(g.shape) != (3, 224, 224) or not g.is_contiguous():
            failures.append(f"{name}: {g.dtype} {tuple(g.shape)} contiguous={g.is_contiguous()}")
            continue
        d = levels(g, r)
        mx, mean = d.max().item(), d.mean().item()
        bmax = max_abs(name) if callable(max_abs) else max_abs
        bmean = mean_abs(name) if callable(mean_abs) else mean_abs
        print(f"{label} {name:36s} max {mx:4.0f} (bound {bmax:.0f}) mean {mean:.4f} (bound {bmean:.3f}) "
              f"frac>1 {(d > 1).float().mean().item():.5f}")
        worst_max, worst_mean = max(worst_max, mx), max(worst_mean, mean)
        if mx > bmax or mean > bmean:
            failures.append(f"{name}: max {mx:.0f} > {bmax:.0f} or mean {mean:.4f} > {bmean:.3f}")
    print(f"{label} worst: max {worst_max:.0f} mean {worst_mean:.4f}")
    assert not failures, f"{len(failures)} of {len(names)} images:\n" + "\n".join(failures)


def test_fake_mixed_batch_one_result_per_blob_with_cpu_codes():
    cases = mixed_batch()
    names, blobs = list(cases), list(cases.values())
    maxpx = MIXED_CAP  # one limit for the whole call, as a worker has
    dec = LibjpegStandIn(torch.device("cpu"), max_pixels=maxpx,
                         cpu_decode=lambda b: decode_image(b, max_pixels=maxpx))
    got = dec.decode_batch(blobs)
    ref = cpu_reference(blobs, lambda b: maxpx)
    check_against_cpu(names, got, ref, RESIZE_MAX_ABS_LEVELS, RESIZE_MEAN_ABS_LEVELS, "fake-vs-cpu")
    codes = {n: (g.code if isinstance(g, ImageError) else "ok") for n, g in zip(names, got)}
    assert codes["empty"] == ErrorCode.empty and codes["too large"] == ErrorCode.too_large
    assert codes["corrupt (header + garbage)"] == ErrorCode.decode_error
    assert codes["scanless (eligible, undecodable)"] == ErrorCode.decode_error
    assert all(codes[n] == "ok" for n in ("progressive", "CMYK", "PNG"))
    n_eligible = sum(map(dec.eligible, blobs))
    assert n_eligible == 9  # the 8 good JPEGs + the scanless one
    # one batched call failed (the scanless image), then each eligible image alone
    assert dec.calls == [n_eligible] + [1] * n_eligible
    assert dec.stats == {"gpu": 8, "cpu": len(blobs) - 8, "batch_failures": 1}


def test_fake_good_batch_is_one_call_and_results_do_not_alias():
    blobs = [enc(photo(500, 375, s), quality=90) for s in range(4)] + [enc(photo(640, 480, 9), quality=90)]
    dec = LibjpegStandIn(torch.device("cpu"), max_pixels=MAXPX, cpu_decode=decode_image)
    got = dec.decode_batch(blobs)
    assert dec.calls == [5] and dec.stats["cpu"] == 0
    ptrs = {t.data_ptr() for t in got}
    assert len(ptrs) == 5
    # mutating one result leaves the others (and a second decode) untouched
    again = dec.decode_batch(blobs)
    got[0].zero_()
    assert all(torch.equal(a, b) for a, b in zip(got[1:], again[1:]))
    assert dec.decode_batch([]) == []


def test_fake_big_batches_are_split_by_decoded_size(monkeypatch):
    monkeypatch.setattr(gd, "_DECODE_BYTES", 3 * 500 * 375 * 2)  # two 500x375 images per call
    blobs = [enc(photo(500, 375, s), quality=90) for s in range(5)]
    dec = LibjpegStandIn(torch.device("cpu"), max_pixels=MAXPX, cpu_decode=decode_image)
    got = dec.decode_batch(blobs)
    assert dec.calls == [2, 2, 1]
    assert all(torch.equal(g, decode_image(b)) or levels(g, decode_image(b)).max() <= 1
               for g, b in zip(got, blobs))


def test_fake_resize_matches_cpu_geometry():
    """Our float32 resize + crop against decode_image's uint8 one, on the same libjpeg-turbo pixels:
    isolates the resize's share of the GPU-vs-CPU deviation."""
    sizes = [(500, 375), (375, 500), (1024, 768), (256, 256), (224, 300), (1000, 300), (300, 2000),
             (4032, 3024), (257, 1033), (640, 427)]
    blobs = [enc(photo(w, h, i), quality=90) for i, (w, h) in enumerate(sizes)]
    dec = LibjpegStandIn(torch.device("cpu"), max_pixels=MAXPX, cpu_decode=decode_image)
    got = dec.decode_batch(blobs)
    assert dec.stats["cpu"] == 0
    check_against_cpu([f"{w}x{h}" for w, h in sizes], got, cpu_reference(blobs, lambda b: MAXPX),
                      RESIZE_MAX_ABS_LEVELS, RESIZE_MEAN_ABS_LEVELS, "resize-vs-cpu")


def test_extreme_aspect_goes_to_cpu():
    strip = enc(photo(4000, 40), quality=90)  # resized intermediate 25600x256: over 4 Mpx
    dec = LibjpegStandIn(torch.device("cpu"), max_pixels=MAXPX, cpu_decode=decode_image)
    assert gpu_eligible(strip, MAXPX) and not dec.eligible(strip)
    (got,) = dec.decode_batch([strip])
    assert dec.calls == [] and torch.equal(got, decode_image(strip))


def test_cpu_decode_failures_of_any_kind_become_image_errors():
    def broken(b):
        raise ValueError("boom")
    dec = LibjpegStandIn(torch.device("cpu"), max_pixels=MAXPX, cpu_decode=broken)
    (e,) = dec.decode_batch([b"not a jpeg"])
    assert isinstance(e, ImageError) and e.code == ErrorCode.internal_error and "boom" in str(e)


# ----------------------------------------------------------------------------- CUDA


def bare_nvjpeg(blobs: list[bytes], dev) -> list[torch.Tensor]:
    """torchvision's nvJPEG kernel with nothing of ours around it (no stream, no host barrier)."""
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    op = getattr(torch.ops.image, "decode_jpegs_cuda", None)
    if op is not None:
        return op(tensors, torchvision.io.ImageReadMode.RGB.value, dev)
    return torchvision.io.decode_jpeg(tensors, mode=torchvision.io.ImageReadMode.RGB, device=dev)


def decoder_deviation(blobs: dict[str, bytes], dev) -> dict[str, tuple[float, float]]:
    """(max, mean) levels of nvJPEG's full-size RGB against libjpeg-turbo's, per eligible image,
    each decoded alone between host barriers (the measurement, not the hazard)."""
    out = {}
    for name, b in blobs.items():
        if not gpu_eligible(b, MAXPX):
            continue
        torch.cuda.synchronize(dev)
        try:
            (g,) = bare_nvjpeg([b], dev)
        except Exception as e:  # noqa: BLE001 - an image nvJPEG refuses has no deviation to measure
            print(f"decoders {name:36s} nvJPEG refused it: {type(e).__name__}: {e}")
            continue
        torch.cuda.synchronize(dev)
        c = torch.ops.image.decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8), 3, False)
        if tuple(g.shape) != tuple(c.shape):
            out[name] = (float("inf"), float("inf"))
        else:
            d = levels(g, c)
            out[name] = (d.max().item(), d.mean().item())
        print(f"decoders {name:36s} nvJPEG vs libjpeg-turbo, full size: max {out[name][0]:4.0f} "
              f"mean {out[name][1]:.4f}")
    return out


def check_gpu_against_cpu(names, blobs, got, dev, maxpx):
    """check_against_cpu with each image's bound derived from its measured decoder deviation
    (the module's note on GPU vs CPU); the decoders themselves held to NVJPEG_BROKEN_MEAN."""
    dev_dev = decoder_deviation(dict(zip(names, blobs)), dev)
    broken = {n: v for n, v in dev_dev.items() if v[1] > NVJPEG_BROKEN_MEAN}
    assert not broken, f"nvJPEG decodes these far from libjpeg-turbo (max, mean levels): {broken}"

    def bound(name):   # the max bound; the mean is at most the max (only the max has a derivation)
        return dev_dev.get(name, (0.0, 0.0))[0] + RESIZE_MAX_ABS_LEVELS + 1
    check_against_cpu(names, got, cpu_reference(blobs, lambda b: maxpx),
                      bound, bound, "gpu-vs-cpu")


@pytest.fixture(scope="module")
def cuda_decoder():
    dev = torch.device("cuda")
    assert resolve_decode_mode("gpu", dev) == "gpu", gd._nvjpeg_works(dev)
    assert resolve_decode_mode("auto", dev) == "gpu"
    return GpuDecoder(dev, max_pixels=MAXPX, cpu_decode=decode_image)


@needs_cuda
def test_cuda_mixed_batch_against_cpu_decode(cuda_decoder):
    cases = mixed_batch()
    names, blobs = list(cases), list(cases.values())
    maxpx = MIXED_CAP
    dec = GpuDecoder(torch.device("cuda"), max_pixels=maxpx,
                     cpu_decode=lambda b: decode_image(b, max_pixels=maxpx))
    got = dec.decode_batch(blobs)
    print("stats", dec.stats)
    for g in got:
        if isinstance(g, torch.Tensor):
            assert g.device.type == "cuda"
    check_gpu_against_cpu(names, blobs, got, torch.device("cuda"), maxpx)
    assert dec.stats["gpu"] == 8


@needs_cuda
def test_cuda_samples_against_cpu_decode(cuda_decoder, samples_dir):
    paths = sorted(samples_dir.glob("*.*g"))
    blobs = [p.read_bytes() for p in paths]
    got = cuda_decoder.decode_batch(blobs)
    check_gpu_against_cpu([p.name for p in paths], blobs, got, torch.device("cuda"), MAXPX)


@needs_cuda
def test_cuda_scanless_jpeg_is_a_decode_error(cuda_decoder):
    """What nvJPEG itself does with a JPEG that has a frame header and no scan is measured here and
    printed (not assumed); what we require is the CPU worker's answer, decode_error, either way."""
    good = enc(photo(500, 375), quality=90)
    bad = scanless(good)
    assert gpu_eligible(bad, MAXPX)   # it does reach nvJPEG
    dev = torch.device("cuda")
    torch.cuda.synchronize(dev)
    try:
        (t,) = bare_nvjpeg([bad], dev)
        torch.cuda.synchronize(dev)
        print(f"nvJPEG on a scanless JPEG: returned {tuple(t.shape)}, mean level {t.float().mean().item():.1f}")
    except Exception as e:  # noqa: BLE001 - the measurement is which of the two happens
        torch.cuda.synchronize(dev)
        print(f"nvJPEG on a scanless JPEG: raised {type(e).__name__}: {str(e)[:200]}")
    with pytest.raises(ImageError) as cpu:
        decode_image(bad)
    got = cuda_decoder.decode_batch([good, bad, good])
    assert isinstance(got[1], ImageError) and got[1].code == cpu.value.code == ErrorCode.decode_error, got[1]
    assert torch.equal(got[0], got[2])


def churn(decode, blobs: list[bytes], shapes: list[tuple], rounds: int) -> tuple[int, int, list[torch.Tensor]]:
    """Rounds of: a stall queued on the current stream, reductions over 'victim' uint8 tensors of
    exactly the decoder's output shapes (so the caching allocator can hand their blocks straight to
    nvJPEG), the victims freed with those reductions still queued, and `decode` at once. Returns
    (victim sums that changed, decoded images that differ from the first round's, the first round)."""
    dev = torch.device("cuda")
    a = torch.randn(4096, 4096, device=dev)
    bad_sums = bad_images = 0
    first = None
    for rnd in range(rounds):
        victims = [torch.full(s, k % 200 + 1, dtype=torch.uint8, device=dev) for k, s in enumerate(shapes)]
        expect = [v.numel() * float(k % 200 + 1) for k, v in enumerate(victims)]
        for _ in range(6):  # a stall of a few tens of ms queued on the current stream
            a = torch.tanh(a @ a * 1e-4)
        sums = [v.sum(dtype=torch.float64) for v in victims]
        del victims  # freed with their reductions still queued
        got = [t.clone() for t in decode(blobs)]
        scratch = [torch.empty(3 * 224 * 224 * (k + 1), dtype=torch.uint8, device=dev).fill_(rnd % 256)
                   for k in range(4)]
        del scratch
        torch.cuda.synchronize(dev)
        if first is None:
            first = got
        bad_sums += sum(abs(s.item() - e) > 1e-6 * e for s, e in zip(sums, expect))
        bad_images += sum(not torch.equal(g, f) for g, f in zip(got, first))
    return bad_sums, bad_images, first


def churn_blobs() -> list[bytes]:
    return ([enc(photo(500, 375, s), quality=90) for s in range(6)]
            + [enc(photo(1024, 768, 7), quality=90), enc(photo(640, 480, 8).convert("L"), quality=90)])


@needs_cuda
def test_cuda_bare_nvjpeg_is_corrupted_by_allocator_churn():
    """The control for the test below: the same churn around torchvision's bare nvJPEG call, with
    none of our guards, must show the hazard (pytorch/vision#9606, meta-pytorch/torchcodec#1634):
    victim sums that changed after their tensors' blocks were handed to the decoder. If it does
    not, this churn does not provoke the hazard on this device, and the guarded test below passing
    proves nothing here: this test fails to say so."""
    dev = torch.device("cuda")
    blobs = churn_blobs()
    torch.cuda.synchronize(dev)
    shapes = [tuple(t.shape) for t in bare_nvjpeg(blobs, dev)]
    torch.cuda.synchronize(dev)
    bad_sums, bad_images, _ = churn(lambda b: bare_nvjpeg(b, dev), blobs, shapes, 40)
    print(f"churn, bare nvJPEG: 40 rounds, bad victim sums {bad_sums}, images differing from the first {bad_images}")
    assert bad_sums + bad_images > 0, \
        "the bare nvJPEG call survived the churn: this harness does not provoke the hazard on this device"


@needs_cuda
def test_cuda_results_survive_allocator_churn(cuda_decoder):
    """pytorch/vision#9606, meta-pytorch/torchcodec#1634: blocks freed while kernels still read them
    must never be handed to nvJPEG, and nothing we return may be written by a later decode. The
    churn of the control above, around GpuDecoder.decode_batch: every victim sum and every decoded
    image must be exactly what it was."""
    dev = torch.device("cuda")
    blobs = churn_blobs()
    torch.cuda.synchronize(dev)
    shapes = [tuple(t.shape) for t in bare_nvjpeg(blobs, dev)]
    torch.cuda.synchronize(dev)
    kept = cuda_decoder.decode_batch(blobs)  # held across the rounds: must not change either
    kept_copy = [t.clone() for t in kept]
    bad_sums, bad_images, first = churn(cuda_decoder.decode_batch, blobs, shapes, 40)
    print(f"churn, GpuDecoder: 40 rounds, bad victim sums {bad_sums}, images differing from the first {bad_images}")
    assert bad_sums == 0 and bad_images == 0
    assert all(torch.equal(k, c) for k, c in zip(kept, kept_copy))
    assert all(torch.equal(k, f) for k, f in zip(kept, first))
