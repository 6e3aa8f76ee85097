"""Hostile and broken inputs through the real system: `hardnet submit --from-file` -> real Redis ->
one real worker process -> records in a local directory. Sources are moto's S3 server (behind the
fault-injecting proxy, which answers 403 for one object), local files under HARDNET_FILE_ROOTS and
http URLs that the SSRF guard must refuse without connecting.

Every input line gets exactly one record with a stable code, the good images of the same chunk
are still labelled, and the worker neither crashes nor stalls (a second job afterwards works)."""
from __future__ import annotations

import io
import json
import os
import random
import struct
import time
import zlib
from pathlib import Path

import pytest

from cluster import Worker, base_env, cli_json, image_bytes, read_jsonl
from faultproxy import FaultProxy
from servers import LoopbackWeb, without_proxies, s3_env

pytestmark = pytest.mark.slow

BUCKET = "hostile-src"
MAX_BYTES = 2_000_000
MAX_PIXELS = 1_000_000
JOB_TIMEOUT = 120  # seconds the whole hostile job may take, --wait included


# ------------------------------------------------------------------------------- image makers

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, bit_depth: int, colour_type: int, raw: bytes) -> bytes:
    """A PNG written by hand (PIL cannot write 16-bit RGB, nor lie about its size)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(raw, 9)) + _png_chunk(b"IEND", b""))


def _png16_rgb(w: int = 40, h: int = 30) -> bytes:
    rnd = random.Random(16)
    rows = b"".join(b"\x00" + bytes(rnd.randrange(256) for _ in range(w * 6)) for _ in range(h))
    return _png(w, h, 16, 2, rows)


def _bomb_png() -> bytes:
    """Declares 30000x30000 (900 Mpx) in IHDR; only a few rows of pixel data actually follow."""
    return _png(30000, 30000, 8, 0, b"\x00" * (30001 * 4))


def _pil(img, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _cmyk_jpeg() -> bytes:
    from PIL import Image

    img = Image.new("CMYK", (64, 48), (10, 200, 30, 5))
    img.paste((200, 10, 90, 40), (8, 8, 40, 30))
    return _pil(img, "JPEG", quality=90)


def _animated_gif() -> bytes:
    from PIL import Image

    frames = [Image.new("RGB", (48, 32), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return _pil(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)


def _truncated_png() -> bytes:
    data = image_bytes(7, "PNG", size=(200, 150))
    return data[: len(data) // 2]


# ------------------------------------------------------------------------------- fixtures

def _loopback() -> LoopbackWeb:
    """A real HTTP server on 127.0.0.1 that serves a JPEG and counts the requests it gets."""
    body = image_bytes(4242)
    return LoopbackWeb(lambda path: (200, body))


@pytest.fixture(scope="module")
def hostile(redis_server, moto_server, tmp_path_factory):
    """One worker behind the fault proxy (module scope). Buckets are (re)made by each test, after
    the function-scoped ``s3`` fixture has reset moto: the worker only knows the endpoint."""
    proxy = FaultProxy(moto_server.url).start()
    web = _loopback()
    logdir = tmp_path_factory.mktemp("hostile-logs")
    root = tmp_path_factory.mktemp("hostile-root")
    outside = tmp_path_factory.mktemp("hostile-outside")
    env = base_env(
        redis_server.url,
        HARDNET_FILE_ROOTS=str(root),
        HARDNET_MAX_IMAGE_BYTES=str(MAX_BYTES),
        HARDNET_MAX_PIXELS=str(MAX_PIXELS),
        HARDNET_ALLOW_HTTP="true",
        HARDNET_HTTP_ALLOW_HOSTS="127.0.0.1,localhost",
        HARDNET_STATE_DIR=str(tmp_path_factory.mktemp("hostile-state")),
        HARDNET_S3_MAX_ATTEMPTS="2",
        HARDNET_FETCH_TIMEOUT="10",
        **s3_env(proxy.url))
    env.pop("HARDNET_ALLOW_PRIVATE_NETWORKS", None)
    without_proxies(env)  # everything here stays on 127.0.0.1
    w = Worker(env, "hostile", logdir)
    try:
        w.wait_ready()
        yield {"env": env, "worker": w, "proxy": proxy, "web": web, "root": root,
               "outside": outside}
    finally:
        w.stop()
        web.stop()
        proxy.stop()


def _file_uri(path: Path) -> str:
    from hnq.uris import path_to_file_uri

    return path_to_file_uri(path)


def _build_inputs(ctx, s3) -> list[tuple[str, str, str]]:
    """(line in the URI list, URI the record must carry, expected code or 'ok')."""
    root, outside = Path(ctx["root"]), Path(ctx["outside"])
    s3.create_bucket(Bucket=BUCKET)
    jpeg = image_bytes(1)
    objects: dict[str, tuple[bytes, str]] = {
        "good/a.jpg": (image_bytes(100), "ok"),
        "good/b.png": (image_bytes(101, "PNG"), "ok"),
        "good/c.jpg": (image_bytes(102, size=(320, 240)), "ok"),
        "bad/zero.jpg": (b"", "empty"),
        "bad/random.jpg": (bytes(random.Random(1).randrange(256) for _ in range(3000)), "decode_error"),
        "bad/html.jpg": (b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head>"
                         b"<body><h1>502 Bad Gateway</h1><hr>nginx</body></html>\n", "decode_error"),
        "bad/truncated.jpg": (jpeg[: len(jpeg) // 2], "decode_error"),
        "bad/truncated.png": (_truncated_png(), "decode_error"),
        "odd/really-a-jpeg.png": (image_bytes(2), "ok"),
        "odd/bomb.png": (_bomb_png(), "too_large"),
        "odd/at-limit-1000x1000.jpg": (image_bytes(3, size=(1000, 1000)), "ok"),
        "odd/over-limit-1001x1000.jpg": (image_bytes(4, size=(1001, 1000)), "too_large"),
        "odd/one-pixel.png": (image_bytes(5, "PNG", size=(1, 1)), "ok"),
        "odd/sixteen-bit.png": (_png16_rgb(), "ok"),
        "odd/cmyk.jpg": (_cmyk_jpeg(), "ok"),
        "odd/animated.gif": (_animated_gif(), "ok"),
        "odd/huge-zeros.jpg": (b"\x00" * 3_000_000, "too_large"),
        "keys/my cat+dog 100%.jpg": (image_bytes(6), "ok"),
        "keys/caf\u00e9 \u732b \U0001F431.jpg": (image_bytes(7), "ok"),
        "keys/%41%20already-escaped%2F.jpg": (image_bytes(8), "ok"),
        "keys/q?x=1#frag.jpg": (image_bytes(9), "ok"),
        "denied/secret.jpg": (image_bytes(10), "access_denied"),
    }
    for key, (body, _) in objects.items():
        s3.put_object(Bucket=BUCKET, Key=key, Body=body)
    assert s3.head_object(Bucket=BUCKET, Key="keys/my cat+dog 100%.jpg")["ContentLength"] > 0

    cases = [(f"s3://{BUCKET}/{k}", f"s3://{BUCKET}/{k}", code) for k, (_, code) in objects.items()]
    cases += [
        (f"s3://{BUCKET}/bad/missing.jpg", f"s3://{BUCKET}/bad/missing.jpg", "not_found"),
        ("s3:///nokey.jpg", "s3:///nokey.jpg", "invalid_uri"),
        ("s3://", "s3://", "invalid_uri"),                   # once aborted the whole submit
        ("file://otherhost/x.jpg", "file://otherhost/x.jpg", "invalid_uri"),
        ("bad\x00name.jpg", "bad\x00name.jpg", "invalid_uri"),
        ("s3://Bad_Bucket!/k.jpg", "s3://Bad_Bucket!/k.jpg", "invalid_uri"),
        ("gs://bucket/k.jpg", "gs://bucket/k.jpg", "unsupported_scheme"),
        ("ftp://127.0.0.1/k.jpg", "ftp://127.0.0.1/k.jpg", "unsupported_scheme"),
    ]
    web = ctx["web"]
    for url in (f"http://127.0.0.1:{web.port}/cat.jpg", f"http://localhost:{web.port}/cat.jpg",
                "http://169.254.169.254/latest/meta-data/x.jpg"):
        cases.append((url, url, "forbidden"))

    # Local files: one good file inside the root, a `..` escape and a symlink out of the root.
    (root / "in").mkdir()
    good = root / "in" / "good local.jpg"
    good.write_bytes(image_bytes(11))
    plain = root / "in" / "plain #1 100%.png"
    plain.write_bytes(image_bytes(13, "PNG"))
    secret = outside / "secret.jpg"
    secret.write_bytes(image_bytes(12))
    link = root / "in" / "link-out.jpg"
    os.symlink(secret, link)
    escape = f"{_file_uri(root / 'in')}/../../{outside.name}/secret.jpg"
    cases += [
        (_file_uri(good), _file_uri(good), "ok"),
        (str(plain), _file_uri(plain), "ok"),                # a plain path becomes a file:// URI
        (_file_uri(link), _file_uri(link), "forbidden"),
        # The producer makes the path absolute (lexically: `..` collapsed) before enqueueing; the
        # worker then finds it outside the roots.
        (escape, _file_uri(secret), "forbidden"),
        (_file_uri(root / "in" / "nope.jpg"), _file_uri(root / "in" / "nope.jpg"), "not_found"),
    ]
    return cases


def _records(out: Path, job: str) -> tuple[dict, list[dict]]:
    manifest = json.loads((out / job / "manifest.json").read_text())
    recs = [r for part in manifest["parts"] for r in read_jsonl((out / job / part).read_text())]
    return manifest, recs


# ------------------------------------------------------------------------------- tests

def test_hostile_inputs_each_get_one_stable_record(hostile, s3, redis_url, tmp_path):
    env, w, proxy, web = hostile["env"], hostile["worker"], hostile["proxy"], hostile["web"]
    cases = _build_inputs(hostile, s3)
    listing = tmp_path / "uris.txt"
    listing.write_text("# hostile inputs, one per line\n" + "".join(line + "\n" for line, _, _ in cases),
                       encoding="utf-8")
    out = tmp_path / "out"
    proxy.set_fault("403", path=f"/{BUCKET}/denied/")
    web.hits.clear()
    t0 = time.monotonic()
    try:
        rc, summary = cli_json(["submit", "--from-file", str(listing), "--out", f"file://{out}/",
                                "--model", "hardnet39ds", "--chunk-size", "64", "--wait", "--json"],
                               env, timeout=JOB_TIMEOUT)
    finally:
        proxy.clear()
    took = time.monotonic() - t0
    print(f"\nMEASURED hostile job: {len(cases)} inputs in {took:.1f}s")

    expected = {uri: code for _, uri, code in cases}
    assert len(expected) == len(cases), "two inputs map to the same URI: fix the test"
    n_ok = sum(c == "ok" for c in expected.values())
    assert rc == 3, f"exit code {rc}, want 3 (some failed): {summary}"
    assert summary["state"] == "done_with_errors" and summary["chunks_done"] == 1 and not summary["dead_chunks"], summary
    assert summary["total"] == len(cases)
    assert summary["succeeded"] == n_ok and summary["failed"] == len(cases) - n_ok, summary

    manifest, recs = _records(out, summary["job_id"])
    assert manifest["total"] == len(cases) and manifest["succeeded"] == n_ok
    assert manifest["failed"] == len(cases) - n_ok and manifest["parts"] == ["part-00000.jsonl"]
    # one record per input line, in order, carrying exactly the URI that was enqueued
    assert [r["uri"] for r in recs] == [uri for _, uri, _ in cases]
    got = {r["uri"]: ("ok" if r["status"] == "ok" else r["error"]["code"]) for r in recs}
    wrong = {u: (got[u], want) for u, want in expected.items() if got[u] != want}
    assert not wrong, "uri: (got, want)\n" + "\n".join(f"{u!r}: {v}" for u, v in wrong.items()) + \
        "\n" + "\n".join(json.dumps(r) for r in recs if r["uri"] in wrong)
    for r in recs:
        assert r["job_id"] == summary["job_id"] and r["model"] == "hardnet39ds"
        if r["status"] == "ok":
            assert len(r["top5"]) == 5 and r["size"] > 0, r
            scores = [t["score"] for t in r["top5"]]
            assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001, r
        else:
            assert r["status"] == "error" and r["error"]["message"] and not r.get("top5"), r

    # the SSRF guard refused before connecting; the 403 really came from the proxy
    msgs = {r["uri"]: r.get("error", {}).get("message", "") for r in recs}
    assert "non-public address" in msgs[f"http://127.0.0.1:{web.port}/cat.jpg"]
    assert "non-public address" in msgs[f"http://localhost:{web.port}/cat.jpg"]
    assert "HARDNET_HTTP_ALLOW_HOSTS" in msgs["http://169.254.169.254/latest/meta-data/x.jpg"]
    assert "over the limit" in msgs[f"s3://{BUCKET}/odd/bomb.png"]          # header, not a decode
    assert "download cap" in msgs[f"s3://{BUCKET}/odd/huge-zeros.jpg"]
    assert web.hits == [], f"the loopback server was contacted: {web.hits}"
    assert proxy.stats()["by_mode"].get("403", 0) >= 1
    assert took < JOB_TIMEOUT
    assert w.proc.poll() is None, f"worker died:\n{w.log()[-3000:]}"
    assert "Traceback" not in w.log(), w.log()[-3000:]


def test_worker_still_labels_after_the_hostile_job(hostile, s3, redis_url, tmp_path):
    env, w = hostile["env"], hostile["worker"]
    s3.create_bucket(Bucket=BUCKET)
    lines = []
    for i in range(6):
        s3.put_object(Bucket=BUCKET, Key=f"after/{i}.jpg", Body=image_bytes(500 + i))
        lines.append(f"s3://{BUCKET}/after/{i}.jpg")
    local = Path(hostile["root"]) / "after"
    local.mkdir(exist_ok=True)
    for i in range(2):
        p = local / f"{i}.png"
        p.write_bytes(image_bytes(600 + i, "PNG"))
        lines.append(_file_uri(p))
    listing = tmp_path / "uris.txt"
    listing.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    rc, summary = cli_json(["submit", "--from-file", str(listing), "--out", str(out),
                            "--model", "hardnet39ds", "--chunk-size", "64", "--wait", "--json"],
                           env, timeout=60)
    assert rc == 0, summary
    assert summary["state"] == "done" and summary["succeeded"] == len(lines) and summary["failed"] == 0
    _, recs = _records(out, summary["job_id"])
    assert [r["uri"] for r in recs] == lines and all(len(r["top5"]) == 5 for r in recs)
    assert w.proc.poll() is None
