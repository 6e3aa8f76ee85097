"""Issue 19, "Bytes in flight bounded": a real `hardnet worker` process over 40 large images
(about 30 MB each: small JPEGs carrying ~30 MB of COM segments, so that decoding is quick and what
is measured is the bytes held) from local files, with HARDNET_BYTES_IN_FLIGHT=64MiB: every image
is labelled, and the worker's peak RSS (VmHWM) stays within the budget over what the same process
reached labelling small images, plus a stated margin for the transient copies made while a body
is read and decoded. Prints the figures (pytest -s); docs/reliability.md records them."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cluster import Worker, base_env, cli_json, image_bytes, read_jsonl, wait_state

pytestmark = pytest.mark.slow

MiB = 2**20
N_LARGE = 40
BUDGET = 64 * MiB
DECODE_THREADS = 2


def _padded_jpeg(i: int, total: int) -> bytes:
    """A 320x240 JPEG with COM segments after SOI up to ``total`` bytes (each segment at most
    65,535 bytes: its length field). A decoder skips them."""
    jpeg = image_bytes(i, "JPEG", (320, 240))
    pad = total - len(jpeg)
    segs = []
    while pad > 4:
        n = min(65533, pad - 4)
        segs.append(b"\xff\xfe" + (n + 2).to_bytes(2, "big") + bytes([i % 251]) * n)
        pad -= n + 4
    return jpeg[:2] + b"".join(segs) + jpeg[2:]


def _vm(pid: int, field: str) -> int:
    """VmHWM / VmRSS of ``pid`` in bytes."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def _records(out: Path, job: str) -> list[dict]:
    recs = []
    for part in sorted((out / job).glob("part-*.jsonl")):
        recs += read_jsonl(part.read_text())
    return recs


def test_large_objects_stay_within_the_byte_budget(redis_url, tmp_path):
    small, large, out = tmp_path / "small", tmp_path / "large", tmp_path / "out"
    small.mkdir()
    large.mkdir()
    for i in range(32):
        (small / f"s-{i:03d}.jpg").write_bytes(image_bytes(i, "JPEG", (320, 240)))
    sizes = []
    for i in range(N_LARGE):
        blob = _padded_jpeg(i, 30 * MiB + i * 4096)
        sizes.append(len(blob))
        (large / f"big-{i:03d}.jpg").write_bytes(blob)
    env = base_env(redis_url, HARDNET_FILE_ROOTS=str(tmp_path), HARDNET_OUTPUT_ROOTS=str(tmp_path),
                   HARDNET_BYTES_IN_FLIGHT="64MiB", HARDNET_DECODE_THREADS=str(DECODE_THREADS),
                   HARDNET_STATE_DIR=str(tmp_path / "state"))
    w = Worker(env, "budget", tmp_path)
    try:
        w.wait_ready()
        assert "bytes_in_flight=64MiB" in w.log()
        pid = w.proc.pid
        # the model process without the corpus: labelling small images (forward passes included)
        rc, sub = cli_json(["submit", str(small), "--out", str(out), "--chunk-size", "8", "--json"], env)
        assert wait_state(env, sub["job_id"], timeout=120)["succeeded"] == 32
        base = _vm(pid, "VmHWM")
        rc, sub = cli_json(["submit", str(large), "--out", str(out), "--chunk-size", "8", "--json"], env)
        st = wait_state(env, sub["job_id"], states=("done", "done_with_errors", "failed"), timeout=240)
        peak = _vm(pid, "VmHWM")
        rss_after = _vm(pid, "VmRSS")
    finally:
        w.stop()
    recs = _records(out, sub["job_id"])
    assert st["state"] == "done" and st["succeeded"] == N_LARGE, st
    assert len(recs) == N_LARGE and all(r["status"] == "ok" for r in recs)
    assert sorted(r["size"] for r in recs) == sorted(sizes)
    biggest = max(sizes)
    # Beside the budget (which the bodies in flight never exceed), stated margins:
    # - one transient copy of each body in flight (a fetch joins its 1 MiB reads into one bytes
    #   object, parts and body living together for a moment; a decode copies its body into a
    #   writable buffer for torch.frombuffer): at most BUDGET more;
    # - the worker's one malloc arena keeps what is freed (HARDNET_TUNE_MALLOC), and a freed
    #   body's hole is not always reused by the next, larger one: 3 bodies;
    # - 96 MiB: the model process's own spread (VmHWM after the same small-image job, in one
    #   process, ranged 1183-1315 MiB over six runs here), thread stacks, records.
    # Measured while writing this test: +206 and +278 MiB; +343 MiB when fetchers kept their last
    # body alive; +752 MiB (in-process, same corpus and threads) before the budget existed.
    margin = BUDGET + 3 * biggest + 96 * MiB
    grew = peak - base
    print(f"\nMEASURED worker VmHWM after small images {base / MiB:.0f} MiB, after {N_LARGE} x "
          f"{biggest / MiB:.0f} MiB objects {peak / MiB:.0f} MiB (grew {grew / MiB:.0f} MiB; budget "
          f"{BUDGET / MiB:.0f} MiB + margin {margin / MiB:.0f} MiB = {(BUDGET + margin) / MiB:.0f} MiB "
          f"allowed; corpus {sum(sizes) / MiB:.0f} MiB); VmRSS after {rss_after / MiB:.0f} MiB")
    assert grew <= BUDGET + margin, (base, peak)
    manifest = json.loads((out / sub["job_id"] / "manifest.json").read_text())
    assert manifest["succeeded"] == N_LARGE
