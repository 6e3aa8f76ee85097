"""The one list of image formats we label, and the file extensions a listing keeps (torch-free,
PIL-free: the producer imports it; the worker's decoder derives what it opens from it).

:data:`IMAGE_FORMATS` maps each Pillow format the decoder opens (:mod:`worker.image.decode`) to
the extensions Pillow registers for it (``PIL.Image.registered_extensions()``, with pillow-heif's
opener registered for HEIF). :data:`IMAGE_EXTENSIONS` is their union: what a prefix listing, a
local directory walk and an inventory report keep by default. ``tests/unit/test_formats.py``
checks both directions: every listed extension decodes (a sample of each is made and labelled
through the decoder), and every extension Pillow registers for a listed format is listed.

The decoder opens only these formats, whatever the name of the object (it goes by the bytes).
Pillow formats it refuses, and why (:data:`EXCLUDED_FORMATS`): EPS is rendered by running
Ghostscript on the file; several plugins only identify a file and cannot decode it without a
handler (BUFR, GRIB, HDF5, WMF, MPEG); the others are animations, brushes, game textures, Photo CD
or scientific formats that no sample of ours proves the decoder reads.

``--extensions`` (:class:`ExtensionFilter`): ``any`` keeps every key (also keys without an
extension: content-addressed buckets; an object that is not an image then gets a
``decode_error`` record), a list (``jpg,png``) keeps only those; what is left out is counted per
extension, for the job's manifest (``skipped_by_extension``, ``skipped_extensions``).
"""
from __future__ import annotations

import json
import os
import re
import threading
from collections import Counter

#: Pillow format -> the extensions Pillow registers for it (lower case, with the dot). MPO (the
#: multi-picture JPEG of 3D cameras) is opened by Pillow's JPEG opener; HEIF needs pillow-heif.
IMAGE_FORMATS: dict[str, tuple[str, ...]] = {
    "JPEG": (".jpg", ".jpeg", ".jpe", ".jfif"),
    "MPO": (".mpo",),
    "PNG": (".png", ".apng"),
    "WEBP": (".webp",),
    "GIF": (".gif",),
    "TIFF": (".tif", ".tiff"),
    "BMP": (".bmp",),
    "DIB": (".dib",),
    "HEIF": (".heic", ".heif", ".heics", ".heifs", ".hif"),
    "AVIF": (".avif", ".avifs"),
    "JPEG2000": (".jp2", ".j2k", ".jpc", ".jpf", ".jpx", ".j2c"),
    "PPM": (".pnm", ".ppm", ".pgm", ".pbm", ".pfm"),
    "TGA": (".tga", ".icb", ".vda", ".vst"),
    "DDS": (".dds",),
    "ICO": (".ico",),
    "CUR": (".cur",),
    "ICNS": (".icns",),
    "QOI": (".qoi",),
    "PSD": (".psd",),
    "PCX": (".pcx",),
    "DCX": (".dcx",),
    "SGI": (".sgi", ".rgb", ".rgba", ".bw"),
    "SUN": (".ras",),
    "XBM": (".xbm",),
    "XPM": (".xpm",),
    "MSP": (".msp",),
    "BLP": (".blp",),
    "FITS": (".fit", ".fits"),
}

#: Pillow formats the decoder does not open, and why (see the module doc).
EXCLUDED_FORMATS: dict[str, str] = {
    "EPS": "rendered by running Ghostscript on the file: not for bytes from arbitrary URLs",
    "BUFR": "a stub: no decoder without a handler",
    "GRIB": "a stub: no decoder without a handler",
    "HDF5": "a stub: no decoder without a handler",
    "WMF": "a stub outside Windows: no decoder without a handler",
    "MPEG": "identified only: Pillow has no MPEG decoder",
    "IPTC": "IPTC metadata, not a picture format",
    "FLI": "an animation format (no sample proves it)",
    "FTEX": "a game texture format (no sample proves it)",
    "GBR": "a GIMP brush (no sample proves it)",
    "PCD": "Kodak Photo CD (no sample proves it)",
    "PIXAR": "a Pixar render format (no sample proves it)",
    "SPIDER": "a cryo-EM format without an extension",
    "IMT": "a scientific format without an extension",
    "MCIDAS": "a satellite format without an extension",
    "XVTHUMB": "XV thumbnails, without an extension",
    "IM": "deprecated by Pillow (removed in Pillow 15): every decode would warn",
    "PALM": "written by Pillow, never read",
    "PDF": "written by Pillow, never read",
}

#: What a listing keeps by default: every extension of :data:`IMAGE_FORMATS`.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(e for exts in IMAGE_FORMATS.values() for e in exts)

#: the formats pillow-heif adds to Pillow (the decoder registers its opener lazily)
HEIF_FORMATS = frozenset({"HEIF"})

#: ``--extensions any``
ANY = "any"
#: how a key without an extension is counted in ``skipped_extensions``
NO_EXTENSION = "(none)"
#: the most extensions ``skipped_extensions`` names (the rest are in ``skipped_by_extension`` only)
TOP_SKIPPED = 10

_EXT_RE = re.compile(r"[a-z0-9][a-z0-9_+\-]{0,15}")


def extension_of(name: str) -> str:
    """The lower-case extension of a path, key or URL path, with its dot; ``""`` for none.
    (``os.path.splitext``: a leading dot is not an extension, ``.jpg.bak`` is ``.bak``.)"""
    return os.path.splitext(name)[1].lower()


def parse_extensions(value: str, option: str = "--extensions") -> frozenset[str] | None:
    """``any`` -> None (every key); ``jpg,PNG,.heic`` -> ``{".jpg", ".png", ".heic"}``.
    ValueError naming ``option`` for an empty list, an empty item, or an item that is not an
    extension (letters, digits, ``_+-``, at most 16, without dots or slashes). An extension outside
    :data:`IMAGE_EXTENSIONS` is accepted (``jpg_large``: the decoder goes by the bytes)."""
    text = (value or "").strip()
    if text.lower() == ANY:
        return None
    if not text:
        raise ValueError(f"{option} {value!r}: give '{ANY}' or a comma-separated list such as jpg,png,heic")
    out = set()
    for item in text.split(","):
        ext = item.strip().lower().removeprefix(".")
        if not ext:
            raise ValueError(f"{option} {value!r}: an empty extension in the list (give e.g. jpg,png)")
        if ext == ANY:
            raise ValueError(f"{option} {value!r}: '{ANY}' takes every key and stands alone")
        if not _EXT_RE.fullmatch(ext):
            raise ValueError(f"{option} {value!r}: {item.strip()!r} is not a file extension (letters, "
                             "digits, '_', '+', '-'; e.g. jpg,png,heic)")
        out.add("." + ext)
    return frozenset(out)


class ExtensionFilter:
    """Which listed names are kept (``extensions``: a set, or None for ``any``), counting those
    left out per extension. Thread-safe (a fanned-out listing calls it from many threads)."""

    def __init__(self, extensions: frozenset[str] | None = IMAGE_EXTENSIONS):
        self.extensions = extensions
        self.skipped: Counter[str] = Counter()
        self._lock = threading.Lock()

    @classmethod
    def of(cls, value: "ExtensionFilter | frozenset[str] | None | str") -> "ExtensionFilter":
        """A filter from what a caller passes: a filter itself, ``"any"``/a list string, a set,
        or None (the default list)."""
        if isinstance(value, ExtensionFilter):
            return value
        if value is None:
            return cls()
        if isinstance(value, str):
            return cls(parse_extensions(value))
        return cls(frozenset(value))

    @property
    def takes_all(self) -> bool:
        return self.extensions is None

    def names_image(self, name: str) -> bool:
        """Whether ``name`` has one of the kept extensions (no count; ``any``: the default list):
        how ``s3://bucket/NAME`` is told from the folder ``NAME/``."""
        return extension_of(name) in (self.extensions if self.extensions is not None else IMAGE_EXTENSIONS)

    def keep(self, name: str) -> bool:
        """Whether a listed ``name`` is kept; one left out is counted."""
        if self.extensions is None:
            return True
        ext = extension_of(name)
        if ext in self.extensions:
            return True
        with self._lock:
            self.skipped[ext or NO_EXTENSION] += 1
        return False

    @property
    def total_skipped(self) -> int:
        with self._lock:
            return sum(self.skipped.values())

    def top(self, n: int = TOP_SKIPPED) -> dict[str, int]:
        """The ``n`` extensions most skipped, most first (ties by name)."""
        with self._lock:
            items = sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0]))
        return dict(items[:n])

    def job_fields(self) -> dict[str, str]:
        """The job hash fields (and job.json keys) that carry the counts to the manifest; empty
        when nothing was skipped."""
        n = self.total_skipped
        if not n:
            return {}
        return {"skipped_by_extension": str(n), "skipped_extensions": json.dumps(self.top())}

    def line(self) -> str:
        """One line for `hardnet submit` (empty when nothing was skipped)."""
        n = self.total_skipped
        if not n:
            return ""
        what = ", ".join(f"{k} {v}" for k, v in self.top(5).items())
        more = ", ..." if len(self.skipped) > 5 else ""
        return (f"the listing skipped {n} objects by extension ({what}{more}); --extensions any takes "
                "every key")


def skipped_from_fields(raw: dict) -> tuple[int, dict[str, int]]:
    """(skipped_by_extension, skipped_extensions) from a job hash or job.json (0, {} when absent
    or unreadable)."""
    try:
        n = int(raw.get("skipped_by_extension") or 0)
    except (TypeError, ValueError):
        n = 0
    top = raw.get("skipped_extensions") or {}
    if isinstance(top, str):
        try:
            top = json.loads(top)
        except ValueError:
            top = {}
    if not isinstance(top, dict):
        top = {}
    try:
        top = {str(k): int(v) for k, v in top.items()}
    except (TypeError, ValueError):
        top = {}
    return n, top
