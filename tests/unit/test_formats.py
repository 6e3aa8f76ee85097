"""The one list of image formats (hnq.formats) against the decoder and Pillow: every listed
extension decodes (a sample of each is made here, written under that extension in any case and
decoded, and agrees with the PIL reference within one level, in unusual modes too: palette, alpha,
16-bit, CMYK), no extension Pillow registers for a listed format is missing, every Pillow format is
either listed or excluded with a reason; HEIC through pillow-heif, and its clear error without it;
--extensions parsing and counting."""
from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from hnq.errors import ErrorCode, ImageError
from hnq.formats import (EXCLUDED_FORMATS, IMAGE_EXTENSIONS, IMAGE_FORMATS, NO_EXTENSION, ExtensionFilter,
                         parse_extensions, skipped_from_fields)
from image_samples import MAKERS, heic_bytes, pil_bytes
from worker.image.decode import accepted_formats, decode_image, heif_available
from worker.image.normalize import STD, normalize
from worker.image.reference import reference_preprocess

ROOT = Path(__file__).resolve().parents[2]
EXT_FORMAT = {ext: fmt for fmt, exts in IMAGE_FORMATS.items() for ext in exts}
#: extensions whose own flavour of the format is written (the rest: the format's sample)
FLAVOURS = {".pgm": lambda: pil_bytes("PPM", "L"), ".pbm": lambda: pil_bytes("PPM", "1"),
            ".pfm": lambda: pil_bytes("PPM", "F"), ".apng": lambda: pil_bytes("PNG", save_all=True,
                                                                             append_images=[Image.new("RGB", (40, 30))])}


def _pillow_extensions() -> dict[str, set[str]]:
    accepted_formats()                 # registers pillow-heif's opener, as a worker does
    out: dict[str, set[str]] = {}
    for ext, fmt in Image.registered_extensions().items():
        out.setdefault(fmt, set()).add(ext)
    return out


def test_pillow_heif_is_installed_here():
    """The worker extra brings pillow-heif; this machine has it (else HEIC would only be the
    decode_error below)."""
    assert heif_available()
    assert "HEIF" in accepted_formats()


@pytest.mark.parametrize("ext", sorted(IMAGE_EXTENSIONS))
def test_every_listed_extension_decodes(ext, tmp_path):
    data = (FLAVOURS.get(ext) or MAKERS[EXT_FORMAT[ext]])()
    for name in (f"p{ext}", f"P{ext.upper()}"):
        path = tmp_path / name
        path.write_bytes(data)
        t = decode_image(path.read_bytes())
        assert tuple(t.shape) == (3, 224, 224) and t.dtype.is_floating_point is False
        assert int(t.max()) > 0            # a picture, not a blank buffer


#: (format, mode) pairs Pillow writes beyond plain RGB: grey, alpha, palette, 16-bit, CMYK, 1-bit
MODES = [("PNG", "LA"), ("PNG", "P"), ("PNG", "I;16"), ("TIFF", "CMYK"), ("TIFF", "I;16"), ("TGA", "P"),
         ("TGA", "LA"), ("JPEG2000", "I;16"), ("JPEG2000", "CMYK"), ("JPEG2000", "LA"), ("PPM", "I;16"),
         ("PPM", "1"), ("SGI", "RGBA"), ("DDS", "LA"), ("AVIF", "RGBA"), ("AVIF", "L"), ("HEIF", "RGBA"),
         ("HEIF", "L"), ("HEIF", "I;16"), ("QOI", "RGBA"), ("ICO", "P"), ("PCX", "P"), ("JPEG", "CMYK")]


@pytest.mark.parametrize("fmt,mode", [(f, "RGB") for f in MAKERS] + MODES)
def test_decoder_agrees_with_pillow(fmt, mode):
    """decode_image (then the device's normalisation) matches the PIL reference transform within
    one uint8 level, in every listed format and in the unusual modes of the common ones."""
    data = MAKERS[fmt]() if mode == "RGB" else pil_bytes(fmt, mode)
    got = normalize(decode_image(data)[None])[0]
    level = 1 / 255 / torch.tensor(STD).view(3, 1, 1)
    off = (got - reference_preprocess(data)).abs() / level
    assert off.max().item() <= 1.0 + 1e-4, off.max().item()


def test_no_extension_pillow_registers_for_a_listed_format_is_missing():
    pillow = _pillow_extensions()
    for fmt, exts in IMAGE_FORMATS.items():
        assert set(exts) == pillow.get(fmt, set()), fmt
    assert IMAGE_EXTENSIONS == {e for exts in IMAGE_FORMATS.values() for e in exts}


def test_every_pillow_format_is_listed_or_excluded_with_a_reason():
    accepted_formats()
    known = set(IMAGE_FORMATS) | set(EXCLUDED_FORMATS)
    pillow = set(Image.ID) | set(_pillow_extensions())
    assert pillow - known == set(), "a Pillow format that hnq/formats.py does not mention"
    assert not set(IMAGE_FORMATS) & set(EXCLUDED_FORMATS)
    assert all(EXCLUDED_FORMATS.values())


def test_the_decoder_opens_the_listed_formats_only():
    # MPO has no opener of its own: Pillow's JPEG opener makes MPO images
    assert set(accepted_formats()) == set(IMAGE_FORMATS) - {"MPO"}
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\nshowpage\n"
    with pytest.raises(ImageError) as e:
        decode_image(eps)
    assert e.value.code == ErrorCode.decode_error


def test_heic_made_with_pillow_heif_decodes():
    data = heic_bytes()
    assert data[4:12] == b"ftypheic"
    t = decode_image(data)
    assert tuple(t.shape) == (3, 224, 224)
    # the picture's red (200, 40, 90) survives HEVC within a few levels
    r, g, b = (int(t[c, 112, 100]) for c in range(3))
    assert r > 150 and g < 90 and b < 130, (r, g, b)


def test_heic_without_pillow_heif_names_the_package(tmp_path):
    """A worker without pillow-heif: a decode_error whose message says what to install."""
    f = tmp_path / "x.heic"
    f.write_bytes(heic_bytes())
    code = ("import sys; sys.modules['pillow_heif'] = None\n"   # import fails: not installed
            "from worker.image.decode import decode_image, heif_available\n"
            "from hnq.errors import ImageError\n"
            "assert not heif_available()\n"
            f"try:\n    decode_image(open({str(f)!r}, 'rb').read())\n"
            "except ImageError as e:\n    print(e.code.value, '|', e)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    code_, message = p.stdout.strip().split(" | ", 1)
    assert code_ == "decode_error" and "pillow-heif" in message and "HEIC" in message


@pytest.mark.parametrize("value,want", [
    ("any", None), ("ANY", None), (" any ", None),
    ("jpg,png", {".jpg", ".png"}), (".HEIC, jpg", {".heic", ".jpg"}), ("jpg_large", {".jpg_large"}),
])
def test_parse_extensions(value, want):
    assert parse_extensions(value) == (None if want is None else frozenset(want))


@pytest.mark.parametrize("value,why", [
    ("", "give 'any'"), ("jpg,,png", "empty extension"), ("any,jpg", "stands alone"),
    ("a/b", "not a file extension"), ("tar.gz", "not a file extension"), ("j pg", "not a file extension"),
])
def test_parse_extensions_refuses(value, why):
    with pytest.raises(ValueError) as e:
        parse_extensions(value)
    assert str(e.value).startswith("--extensions") and why in str(e.value)


def test_filter_counts_what_it_skips():
    f = ExtensionFilter()
    names = ["a.JPG", "b.heic", "c.txt", "d.TXT", "blob", "e.json", "f.jp2", ".hidden"]
    assert [n for n in names if f.keep(n)] == ["a.JPG", "b.heic", "f.jp2"]
    assert f.skipped == Counter({".txt": 2, NO_EXTENSION: 2, ".json": 1})
    assert f.total_skipped == 5 and list(f.top(2)) == ["(none)", ".txt"]   # ties by name
    assert skipped_from_fields(f.job_fields()) == (5, {".txt": 2, "(none)": 2, ".json": 1})
    assert "skipped 5 objects by extension" in f.line() and "--extensions any" in f.line()
    every = ExtensionFilter.of("any")
    assert all(every.keep(n) for n in names) and every.total_skipped == 0 and every.job_fields() == {}
    assert every.names_image("x.jpg") and not every.names_image("photos")
    only = ExtensionFilter.of("png")
    assert not only.keep("a.jpg") and only.keep("b.PNG") and only.skipped == Counter({".jpg": 1})
    assert skipped_from_fields({}) == (0, {}) and skipped_from_fields({"skipped_extensions": "{bad"}) == (0, {})
