"""ms/image of the PIL reference vs decode_image vs decode_image(fast_jpeg=True), one thread; then
decode_image's per-call cost on a tiny JPEG against torchvision's resize/crop functions.

    python -m benchmarks.bench_decode [--repeat N]

Images: samples/ photos when present (dog.jpg, chelsea.png) plus generated photo-like JPEGs
(smooth gradients + edges + sensor-like noise, quality 90) of 500x375, 1024x768 and 4032x3024.
Reference = PIL open + convert('RGB') + torchvision's Resize(256)/CenterCrop(224) on the PIL image
(+ToTensor/Normalize). decode_image's timings exclude normalisation (it happens on the device, per
batch); the reference's include ToTensor+Normalize (~0.3 ms). Best of N runs per image.
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks._common import ROOT, photo_like_jpeg
from worker.image.decode import decode_image
from worker.image.reference import reference_preprocess


def best_ms(fn, data: bytes, repeat: int) -> float:
    fn(data)  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(data)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)

    images: list[tuple[str, bytes]] = [
        ("500x375 JPEG (generated)", photo_like_jpeg(500, 375, seed=0)),
        ("1024x768 JPEG (generated)", photo_like_jpeg(1024, 768, seed=0)),
        ("4032x3024 JPEG (generated)", photo_like_jpeg(4032, 3024, seed=0)),
    ]
    for name, label in (("dog.jpg", "1546x1213 JPEG (samples/dog.jpg)"),
                        ("chelsea.png", "451x300 PNG (samples/chelsea.png)")):
        p = ROOT / "samples" / name
        if p.exists():
            images.append((label, p.read_bytes()))

    fns = [
        ("PIL reference", reference_preprocess),
        ("decode_image", decode_image),
        ("decode_image(fast_jpeg)", lambda d: decode_image(d, fast_jpeg=True)),
    ]
    print(f"torch {torch.__version__}, 1 thread, best of {args.repeat}; ms/image (x = speed-up vs PIL reference)")
    print(f"{'image':36s}" + "".join(f"{n:>26s}" for n, _ in fns))
    for label, data in images:
        times = [best_ms(fn, data, args.repeat) for _, fn in fns]
        ref = times[0]
        cells = [f"{times[0]:8.2f} ms" + " " * 9] + [f"{t:8.2f} ms ({ref / t:4.1f}x)" for t in times[1:]]
        print(f"{label:36s}" + "".join(f"{c:>26s}" for c in cells))

    # The per-call cost with almost no pixels (a 20x16 JPEG to 10, cropped to 8): Python and
    # dispatch, which hold the GIL that all of a worker's decode threads share. Against the same
    # decode with torchvision's resize_image + center_crop_image (the path before 2026-12-06).
    import torchvision.transforms.v2.functional as TF

    from worker.image.decode import torchvision_decode

    def via_torchvision(data: bytes) -> torch.Tensor:
        t = torchvision_decode("jpeg", data)
        t = TF.resize_image(t, [10, 12], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        return TF.center_crop_image(t, [8, 8]).contiguous()

    tiny = photo_like_jpeg(20, 16, seed=0)
    assert torch.equal(via_torchvision(tiny), decode_image(tiny, resize=10, crop=8))
    rows = []
    for _ in range(5):  # interleaved; best of many calls each
        rows.append((best_us_many(lambda d: decode_image(d, resize=10, crop=8), tiny),
                     best_us_many(via_torchvision, tiny)))
    ours, theirs = min(r[0] for r in rows), min(r[1] for r in rows)
    print(f"\nper-call cost, 20x16 JPEG -> 10 -> crop 8 (best of 5 x 2000 calls): decode_image "
          f"{ours:.1f} us, with torchvision's resize_image + center_crop_image {theirs:.1f} us "
          f"({theirs - ours:.1f} us more)")


def best_us_many(fn, data: bytes, n: int = 2000) -> float:
    for _ in range(100):
        fn(data)
    t0 = time.perf_counter()
    for _ in range(n):
        fn(data)
    return (time.perf_counter() - t0) / n * 1e6


if __name__ == "__main__":
    main()
