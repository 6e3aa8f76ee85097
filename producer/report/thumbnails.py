"""Thumbnails for the report's contact sheets: fetched from the sources and downscaled with
Pillow into JPEG data URIs, so that the page stays one self-contained file.

They are fetched under a worker's confinement, read from the same settings in the environment of
whoever runs `hardnet report` (:meth:`worker.settings.WorkerSettings.fetch_policy`): local files
only under HARDNET_FILE_ROOTS (unset: none), http(s) only with HARDNET_ALLOW_HTTP and a host of
HARDNET_HTTP_ALLOW_HOSTS, never to private networks unless HARDNET_ALLOW_PRIVATE_NETWORKS, S3 only
from HARDNET_SOURCE_BUCKETS (unset: any), HARDNET_MAX_IMAGE_BYTES at most. A record's URI is not
trusted to pick what the operator's credentials read. A refused thumbnail shows the reason in its
place. S3 GETs use boto3 (this machine's credentials, within those buckets).

Pillow is a worker dependency, not the producer's: it is imported only when thumbnails are made,
and without it the page says so where the thumbnails would be.
"""
from __future__ import annotations

import base64
import dataclasses
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


def thumb_policy() -> FetchPolicy:
    """A worker's fetch policy from this environment's HARDNET_* settings (ConfigError for a bad
    one), with boto3 for S3."""
    from worker.settings import WorkerSettings   # torch-free; imported here as the demo does

    return dataclasses.replace(WorkerSettings().fetch_policy(), s3_client="boto3")


def thumbnail(uri: str, Image, px: int = THUMB_PX,
              policy: FetchPolicy | None = None) -> tuple[str | None, str | None]:
    """(data URI of a JPEG thumbnail, None) or (None, why not). ``policy``: :func:`thumb_policy`
    when None."""
    policy = policy or thumb_policy()
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
    policy = thumb_policy()
    uniq = list(dict.fromkeys(uris))
    with ThreadPoolExecutor(threads, thread_name_prefix="hnq-thumb") as ex:
        return dict(zip(uniq, ex.map(lambda u: thumbnail(u, Image, policy=policy), uniq)))


def thumb_uris(st: ReportStats, sheet_classes: int) -> list[str]:
    uris = []
    for i, _ in st.classes.most_common(sheet_classes):
        res = st.class_examples.get(i)
        uris += [u for u, *_ in (res.items if res else [])]
    uris += [u for _, u, _ in st.lowest()]
    return uris
