"""README's "Using it" runs as written, on one machine, against a real redis-server and a real
worker; and `submit` refuses at once a job that the live workers cannot run (hnq.fleet).

The README test takes the fenced ``bash`` block under "## Using it" from README.md itself (so the
two cannot drift): every line from its top to the line before ``# a fleet`` — the venv, `hardnet
classify`, a worker started with the folders it may read and write, `submit --wait`, `status`,
`results`, stopping the worker — and runs them with ``bash -e`` in a fresh temporary directory
that holds a copy of ``samples/`` and ``.venv`` (a link to the environment running the tests).
Nothing in the commands is changed: their relative paths (``samples/``, ``labels/``,
``all.jsonl``) are already temporary there. The environment adds only the broker
(``HARDNET_BROKER_URL``: the test's redis-server), ``HARDNET_WEIGHTS=random`` (no internet),
``HARDNET_DEVICE=cpu`` and a state directory; it has no ``HARDNET_FILE_ROOTS`` /
``HARDNET_OUTPUT_ROOTS`` of its own: what the worker may read and write is what README says."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from cluster import ROOT, Worker, base_env, cli, read_jsonl

pytestmark = pytest.mark.slow

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def readme_local_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Using it\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("\n```", 1)[0]
    lines = block.splitlines()
    end = next(i for i, line in enumerate(lines) if line.startswith("# a fleet"))
    return lines[:end]


def _env(redis_url: str, tmp: Path) -> dict[str, str]:
    env = base_env(redis_url, HARDNET_STATE_DIR=str(tmp / "state"))
    for k in ("HARDNET_FILE_ROOTS", "HARDNET_OUTPUT_ROOTS", "HARDNET_MODEL", "HARDNET_BATCH_SIZE",
              "HARDNET_FETCH_THREADS", "HARDNET_VISIBILITY_TIMEOUT", "VIRTUAL_ENV"):
        env.pop(k, None)      # the README's defaults, and its own roots
    return env


def test_readme_using_it_runs_as_written(redis_url, samples_dir, tmp_path):
    lines = readme_local_commands()
    worker_lines = [l for l in lines if re.match(r"^\S*=?\S* ?.*hardnet worker\b", l)]
    assert worker_lines and "HARDNET_FILE_ROOTS=" in worker_lines[0], "README's local worker line"
    assert any(" submit " in l and "--wait" in l for l in lines) and any("hardnet results" in l for l in lines)

    work = tmp_path / "home"
    work.mkdir()
    shutil.copytree(samples_dir, work / "samples")
    os.symlink(sys.prefix, work / ".venv")
    script = work / "using-it.sh"
    script.write_text("set -e\n" + "\n".join(lines) + "\n")
    out_path = tmp_path / "using-it.log"
    with open(out_path, "w") as out:
        proc = subprocess.Popen(["bash", str(script)], cwd=work, env=_env(redis_url, tmp_path), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=540)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)     # the background worker, if the script stopped early
            except ProcessLookupError:
                pass
    log = out_path.read_text(errors="replace")
    print(log[-6000:])
    assert rc == 0, f"a README command failed (bash -e): rc={rc}\n{log[-4000:]}"

    # The worker said what it accepts; the job ended done with one record per sample image.
    assert "accepts: reads local files under" in log and f"{work}/samples" in log
    images = sorted(p.name for p in (work / "samples").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    assert len(images) == 6
    jobs = [p for p in (work / "labels").iterdir() if p.is_dir()]
    assert len(jobs) == 1, jobs
    manifest = json.loads((jobs[0] / "manifest.json").read_text())
    assert manifest["state"] == "done" and manifest["succeeded"] == 6 and manifest["failed"] == 0, manifest
    records = read_jsonl((work / "all.jsonl").read_text())
    assert sorted(Path(r["uri"]).name for r in records) == images
    assert all(r["status"] == "ok" and r["job_id"] == jobs[0].name and len(r["top5"]) == 5 for r in records)


def _job_keys(redis_url: str) -> list[str]:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return sorted(k for k in r.keys("hnq:*") if not k.startswith("hnq:worker:"))
    finally:
        r.close()


def test_submit_refuses_what_no_live_worker_can_read_then_waits_when_none_is_live(redis_url, samples_dir, tmp_path):
    env = _env(redis_url, tmp_path)
    out = tmp_path / "labels"
    w = Worker(dict(env, HARDNET_OUTPUT_ROOTS=str(tmp_path)), "noroots", tmp_path)   # reads no local files
    try:
        w.wait_ready()
        assert "refuses local files (HARDNET_FILE_ROOTS unset)" in w.log()
        p = cli(["submit", str(samples_dir), "--out", str(out), "--wait"], env, timeout=120)
        left_in_redis = _job_keys(redis_url)
        left_in_dest = sorted(out.iterdir()) if out.exists() else []
        # Sent anyway (the check off), the same job gets a `forbidden` record per image: with no
        # image labelled it ends `failed` (exit 4), not done_with_errors, and its error says so.
        forced = cli(["submit", str(samples_dir), "--out", str(tmp_path / "forced"), "--wait", "--json"],
                     dict(env, HARDNET_CHECK_WORKERS="false"), timeout=300)
    finally:
        w.stop()
    summary = json.loads(forced.stdout.strip().splitlines()[-1])
    assert forced.returncode == 4 and summary["state"] == "failed", (forced.returncode, summary, forced.stderr)
    assert summary["succeeded"] == 0 and summary["error_codes"] == {"forbidden": 6}, summary
    assert "no image was labelled (forbidden=6)" in summary["error"], summary
    manifest = json.loads((tmp_path / "forced" / summary["job_id"] / "manifest.json").read_text())
    assert manifest["state"] == "failed" and manifest["dead_chunks"] == [], manifest
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert f"no live worker may read {samples_dir}" in lines[0] and f"HARDNET_FILE_ROOTS={samples_dir}" in lines[0], lines
    assert p.stdout == ""
    assert left_in_redis == [], "nothing in Redis"
    assert left_in_dest == [], "nothing under DEST"

    # The worker has stopped (its heartbeat deleted): the job is taken and waits for a worker.
    p = cli(["submit", str(samples_dir), "--out", str(out)], env, timeout=120)
    assert p.returncode == 0, p.stderr
    job = p.stdout.strip()
    assert "no live worker consumes queue 'hardnet'" in p.stderr and "hardnet worker" in p.stderr, p.stderr
    st = json.loads(cli(["status", job, "--json"], env).stdout)
    assert st["state"] == "queued" and st["total"] == 6, st
    assert cli(["cancel", job], env).returncode == 0
