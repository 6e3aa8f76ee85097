"""`hardnet report` for a job in each end state (issue 21 item 4), through a real redis-server and a
real worker process (random weights): done (to a directory, two parts, thumbnails), done with
errors (kept in Redis, one part), cancelled (submitted to a queue nobody consumes, then cancelled)
and failed (every image outside HARDNET_FILE_ROOTS). Each page's words are checked, then it is
rendered in headless Chromium to a PNG under the test's tmp_path."""
from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cluster import Worker, base_env, cli, cli_json, image_bytes, wait_state

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(redis_server, tmp_path_factory):
    logdir = tmp_path_factory.mktemp("logs")
    allowed = tmp_path_factory.mktemp("allowed")
    env = base_env(redis_server.url, HARDNET_OUTPUT_ROOTS=str(tmp_path_factory.getbasetemp()),
                   HARDNET_FILE_ROOTS=str(allowed),
                   HARDNET_STATE_DIR=str(tmp_path_factory.mktemp("state")),
                   TORCH_HOME=str(tmp_path_factory.mktemp("torch-home")))
    redis_server.flush()
    w = Worker(env, "report-states", logdir)
    try:
        w.wait_ready()
        yield {"env": env, "allowed": allowed, "worker": w}
    finally:
        w.stop()


def _images(d: Path, n: int, seed: int) -> list[Path]:
    d.mkdir(parents=True)
    out = []
    for i in range(n):
        p = d / f"photo-{seed + i:04d}.jpg"
        p.write_bytes(image_bytes(seed + i))
        out.append(p)
    return out


def _report(env, job: str, tmp_path: Path, *extra: str) -> str:
    f = tmp_path / f"report-{job}.html"
    p = cli(["report", job, "-o", str(f), *extra], env, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == str(f), p.stderr
    return f.read_text()


def _screenshot(page: str, tmp_path: Path, name: str) -> Path:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (scripts/setup.sh installs it with apt-get where apt exists)")
    f = tmp_path / f"{name}.html"
    f.write_text(page)
    shot = tmp_path / f"{name}.png"
    r = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
                        "--window-size=1280,1600", f"--screenshot={shot}", f.as_uri()],
                       capture_output=True, text=True, timeout=180)
    assert shot.exists(), r.stderr[-3000:]
    console = [l for l in r.stderr.splitlines() if "Refused to" in l or "Content Security Policy" in l
               or "Uncaught" in l]
    assert console == [], console
    from PIL import Image

    with Image.open(shot) as im:
        assert im.format == "PNG" and im.size == (1280, 1600)
        colors = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert shot.stat().st_size > 10_000, shot.stat().st_size
    assert colors is not None and len(colors) > 20, "the screenshot is blank"
    return shot


def _header_checks(page: str) -> None:
    for key in ("submitted-at", "started-at", "finished-at"):
        m = re.search(rf'id="{key}">([^<]*)<', page)
        assert m and m.group(1).endswith("UTC"), (key, m and m.group(1))
    assert 'id="duration"' in page
    assert "has not finished" not in page
    assert "the 0 most frequent" not in page


def _error_messages(page: str) -> list[tuple[str, str]]:
    """(linked URI, its message) for each example in the errors table."""
    return [(html.unescape(u), html.unescape(msg)) for u, msg in
            re.findall(r'<a class="name" href="([^"]*)">[^<]*</a>: <small>([^<]*)</small>', page)]


def test_report_of_a_done_job(cluster, tmp_path):
    env = cluster["env"]
    src = cluster["allowed"] / "done"
    imgs = _images(src, 8, 100)
    out = tmp_path / "out"
    rc, s = cli_json(["submit", str(src), "--out", str(out), "--chunk-size", "4", "--wait", "--json"],
                     env, timeout=300)
    assert rc == 0 and s["state"] == "done", s
    page = _report(env, s["job_id"], tmp_path)
    assert '<b id="state">done</b>' in page and "Done: every image was labelled." in page
    assert '<span id="weights">random</span>' in page and 'id="random-weights"' in page
    assert 'id="sources"' in page and html.escape(src.as_uri()) in page
    _header_checks(page)
    assert 'id="label-chart"' in page and 'id="score-chart"' in page and 'id="throughput-chart"' in page
    # captions: the file name, linked to the whole URI, the top-5 on hover
    links = re.findall(r'<a class="name" href="([^"]*)" title="([^"]*)">([^<]*)</a>', page)
    assert links, "no captions"
    for href, title, text in links:
        href = html.unescape(href)
        assert href.startswith("file://") and href.rsplit("/", 1)[1] == text, (href, text)
        assert len(html.unescape(title).split(" · ")) == 5, title
    assert {html.unescape(h) for h, _, _ in links} <= {p.as_uri() for p in imgs}
    assert page.count('src="data:image/jpeg;base64,') >= 8
    shot = _screenshot(page, tmp_path, "done")
    print(f"screenshot: {shot}")


def test_report_of_a_job_with_errors_kept_in_redis(cluster, tmp_path):
    env = cluster["env"]
    src = cluster["allowed"] / "errors"
    _images(src, 5, 200)
    (src / "broken.jpg").write_bytes(b"not an image")
    rc, s = cli_json(["submit", str(src), "--chunk-size", "100", "--wait", "--json"], env, timeout=300)
    assert s["state"] == "done_with_errors", s
    page = _report(env, s["job_id"], tmp_path, "--no-thumbnails")
    assert '<b id="state">done_with_errors</b>' in page and "Done with errors:" in page
    # kept in Redis: the weights are still the records'
    assert '<span id="weights">random</span>' in page and 'id="random-weights"' in page
    _header_checks(page)
    # one part: a sentence, no chart
    assert "results are kept in Redis (no destination)" in page
    assert 'id="one-part"' in page and "One part (6 images" in page and 'id="throughput-chart"' not in page
    errs = _error_messages(page)
    broken = (src / "broken.jpg").as_uri()
    assert [u for u, _ in errs] == [broken], errs
    assert str(src / "broken.jpg") not in errs[0][1] and errs[0][1] != "(no message)", errs
    _screenshot(page, tmp_path, "done_with_errors")


def test_report_of_a_cancelled_job(cluster, tmp_path):
    env = dict(cluster["env"], HARDNET_QUEUE="report-states-nobody", HARDNET_CHECK_WORKERS="false")
    src = cluster["allowed"] / "cancelled"
    _images(src, 6, 300)
    out = tmp_path / "out"
    rc, s = cli_json(["submit", str(src), "--out", str(out), "--chunk-size", "2", "--json"], env, timeout=120)
    assert rc == 0, s
    job = s["job_id"]
    p = cli(["cancel", job], env, timeout=60)
    assert p.returncode == 0, p.stderr
    wait_state(env, job, ("cancelled",), timeout=60)
    page = _report(env, job, tmp_path)
    assert '<b id="state">cancelled</b>' in page and "Cancelled:" in page
    assert "has not finished" not in page
    assert "0 images were done before the cancel, 6 were dropped unlabelled." in page
    assert 'id="no-labels"' in page and 'id="label-chart"' not in page and "the 0 most frequent" not in page
    assert 'id="no-parts"' in page and 'id="throughput-chart"' not in page
    assert '<span id="weights">unknown (no records)</span>' in page and "worker default" not in page
    assert 'id="sources"' in page and 'id="submitted-at"' in page
    assert 'id="no-records"' in page and "every image was labelled" not in page and 'id="no-sheets"' in page
    _screenshot(page, tmp_path, "cancelled")


def test_report_of_a_failed_job(cluster, tmp_path_factory, tmp_path):
    env = dict(cluster["env"], HARDNET_CHECK_WORKERS="false")
    src = tmp_path_factory.mktemp("forbidden") / "in"      # outside the worker's HARDNET_FILE_ROOTS
    _images(src, 4, 400)
    out = tmp_path / "out"
    rc, s = cli_json(["submit", str(src), "--out", str(out), "--wait", "--json"], env, timeout=300)
    assert s["state"] == "failed", s
    page = _report(env, s["job_id"], tmp_path)
    assert '<b id="state">failed</b>' in page and "Failed: the job ended with no image labelled." in page
    _header_checks(page)
    assert 'id="no-labels"' in page and 'id="label-chart"' not in page and 'id="score-chart"' not in page
    assert 'id="one-part"' in page and 'id="throughput-chart"' not in page
    assert "worker default" not in page
    errs = _error_messages(page)
    assert errs and all(u.startswith(src.as_uri()) for u, _ in errs), errs
    for u, msg in errs:
        assert u not in msg and u[len("file://"):] not in msg and msg != "(no message)", (u, msg)
    _screenshot(page, tmp_path, "failed")
