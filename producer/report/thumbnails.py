"""Thumbnails for the report's contact sheets: fetched from the sources with this machine's
credentials (the producer's: S3, local files; http(s) with the usual SSRF guard) and downscaled
with Pillow into JPEG data URIs, so that the page stays one self-contained file.

Pillow is a worker dependency, not the producer's: it is imported only when thumbnails are made,
and without it the page says so where the thumbnails would be.
"""
from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

from hnq.storage import FetchPolicy, fetch
from producer.report.stats import ReportStats

THUMB_PX = 160


def pillow():
    """PIL.Image, or None without Pillow. Imported here, not at the top: Pillow is optional on
    the producer (a worker dependency)."""
    try:
        from PIL import Image
    except ImportError:
        return None
    return Image


def thumbnail(uri: str, Image, px: int = THUMB_PX) -> tuple[str | None, str | None]:
    """(data URI of a JPEG thumbnail, None) or (None, why not)."""
    policy = FetchPolicy(max_bytes=50 * 2**20, timeout_s=20, allow_http=True, http_allow_hosts=("*",),
                         allow_private_networks=False, file_roots=None, s3_client="boto3")
    try:
        data = fetch(uri, policy).data
    except Exception as e:  # noqa: BLE001 - a missing thumbnail is a note, not a failure
        return None, f"{type(e).__name__}: {e}"[:200]
    try:
        Image.MAX_IMAGE_PIXELS = 89_478_485
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (px * 2, px * 2))
            im.thumbnail((px, px))
            im = im.convert("RGB")
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=72)
    except Exception as e:  # noqa: BLE001
        return None, f"not an image Pillow can read ({type(e).__name__})"
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), None


def fetch_thumbnails(uris: list[str], threads: int = 8) -> dict[str, tuple[str | None, str | None]]:
    Image = pillow()
    if Image is None or not uris:
        return {}
    uniq = list(dict.fromkeys(uris))
    with ThreadPoolExecutor(threads, thread_name_prefix="hnq-thumb") as ex:
        return dict(zip(uniq, ex.map(lambda u: thumbnail(u, Image), uniq)))


def thumb_uris(st: ReportStats, sheet_classes: int) -> list[str]:
    uris = []
    for i, _ in st.classes.most_common(sheet_classes):
        res = st.class_examples.get(i)
        uris += [u for u, _ in (res.items if res else [])]
    uris += [u for _, u, _ in st.lowest()]
    return uris
