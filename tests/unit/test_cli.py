"""The `hardnet` command line: classify output and exit codes, argument errors, and the promise
that the producer side never imports torch."""
from __future__ import annotations

import json
import shutil

import pytest

from cluster import cli, image_bytes, read_jsonl


def test_classify_json_reports_every_input_and_exits_3_on_failures(env, samples_dir, tmp_path):
    d = tmp_path / "imgs"
    shutil.copytree(samples_dir, d)
    (d / "bad.jpg").write_bytes(b"<html>nope</html>")
    # (a missing path is refused before the model loads: tests/unit/test_cli_messages.py)
    p = cli(["classify", str(d), "--model", "hardnet39ds", "--weights", "random",
             "--device", "cpu", "--json"], env, timeout=180)
    assert p.returncode == 3, p.stderr
    recs = read_jsonl(p.stdout)
    assert len(recs) == 7
    codes = {r["uri"].rsplit("/", 1)[-1]: (r["status"], r.get("error", {}).get("code")) for r in recs}
    assert codes["bad.jpg"] == ("error", "decode_error")
    assert sum(s == "ok" for s, _ in codes.values()) == 6
    for r in recs:
        assert {"uri", "status", "model"} <= set(r) <= {"uri", "status", "top5", "error", "model", "weights", "size", "etag"}
        if r["status"] == "ok":
            assert [set(t) for t in r["top5"]] == [{"index", "label", "score"}] * 5
    assert "RANDOM" in p.stderr  # the meaningless-labels warning is loud


def test_classify_human_output_exit_0(env, samples_dir):
    p = cli(["classify", str(samples_dir / "dog.jpg"), "--model", "hardnet39ds", "--weights", "random"], env, timeout=180)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert "dog.jpg  [random weights: labels meaningless]" in lines[0] and len(lines) == 6


@pytest.mark.parametrize("args, needle", [
    (["submit", "--model", "resnet50", "x"], "invalid choice"),
    (["submit"], "nothing to submit"),
    (["submit", "/definitely/not/here"], "does not exist"),
    (["submit", "s3:///nokey"], ""),
    (["submit", "--out", "ftp://x/y/", "{src}"], "ftp"),
])
def test_submit_argument_errors_exit_2(env, tmp_path, args, needle):
    src = tmp_path / "one"
    src.mkdir()
    (src / "a.jpg").write_bytes(image_bytes(1))
    p = cli([a.replace("{src}", str(src)) for a in args], env)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert needle.lower() in p.stderr.lower()


def test_submit_of_a_directory_without_images(env, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    p = cli(["submit", str(tmp_path / "empty")], env)
    assert p.returncode == 2 and "no images found" in p.stderr


def test_producer_commands_never_import_torch(env, tmp_path):
    """A poisoned `torch` on the path: the producer commands must still work."""
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('the producer must not import torch')\n")
    env = dict(env, PYTHONPATH=str(tmp_path / "fake"))
    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.jpg").write_bytes(image_bytes(i))
    p = cli(["submit", str(src), "--json"], env)
    assert p.returncode == 0, p.stderr
    job = json.loads(p.stdout)["job_id"]
    for args in (["status", job, "--json"], ["status"], ["results", job, "--partial"], ["cancel", job]):
        q = cli(args, env)
        assert q.returncode == 0, (args, q.stderr)
    # and the poison works: classify does need torch
    assert cli(["classify", str(src)], env).returncode != 0


def test_worker_that_cannot_load_its_weights_exits_instead_of_taking_chunks(env, tmp_path):
    env = dict(env, HARDNET_WEIGHTS=str(tmp_path / "missing.pth"))
    p = cli(["worker", "--loglevel", "INFO"], env, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode == 78, out[-2000:]
    assert "cannot start the worker" in out and "missing.pth" in out
    assert " ready." not in out


# ------------------------------------------------------------------------------- CLI habits
def _all_parsers(p, path=("hardnet",)):
    import argparse

    yield path, p
    for act in p._actions:
        if isinstance(act, argparse._SubParsersAction):
            for name, sp in act.choices.items():
                yield from _all_parsers(sp, (*path, name))


def test_every_option_of_every_command_has_help():
    from producer.cli import build_parser

    seen = 0
    for path, p in _all_parsers(build_parser()):
        for act in p._actions:
            if act.dest in ("help", "version") or act.__class__.__name__ == "_SubParsersAction":
                continue
            seen += 1
            assert act.help and act.help.strip(), f"{' '.join(path)} {act.option_strings or act.dest} has no help"
        p.format_help()  # a bad %-format in a help text raises here
    assert seen > 40  # the walk reached the subcommands


def test_help_shows_defaults(env):
    p = cli(["status", "--help"], env)
    assert p.returncode == 0
    assert "(default: 20)" in p.stdout  # --limit
    assert "default: None" not in p.stdout


def test_version(env):
    from importlib.metadata import version

    p = cli(["--version"], env)
    assert p.returncode == 0
    assert p.stdout.startswith(f"hardnet-queue {version('hardnet-queue')} ")


def test_worker_passes_unknown_flags_to_celery():
    from types import SimpleNamespace

    from producer.cli import parse
    from worker.commands import celery_argv

    a = parse(["worker", "--model", "hardnet39ds", "-E", "--max-tasks-per-child", "7", "--hostname", "g0@%h"])
    assert a.model == "hardnet39ds" and a.hostname == "g0@%h"
    argv = celery_argv(a, SimpleNamespace(pool_size=32, queue="q", log_format="text"))
    assert argv[-3:] == ["-E", "--max-tasks-per-child", "7"]
    assert "--hostname=g0@%h" in argv and "--pool=threads" in argv and "--concurrency=32" in argv
    b = parse(["worker", "--", "--autoscale=4,1"])
    assert celery_argv(b, SimpleNamespace(pool_size=32, queue="q", log_format="text"))[-1] == "--autoscale=4,1"


def test_unknown_flags_elsewhere_are_usage_errors(env):
    p = cli(["status", "-E"], env)
    assert p.returncode == 2 and "unrecognized arguments: -E" in p.stderr


@pytest.mark.parametrize("var, value, cmd", [
    ("HARDNET_CHUNK_SIZE", "abc", ["status"]),
    ("HARDNET_VISIBILITY_TIMEOUT", "-3", ["status"]),
    ("HARDNET_LOG_FORMAT", "xml", ["status"]),
    ("HARDNET_S3_MAX_ATTEMPTS", "many", ["submit", "s3://bucket/prefix/", "--out", "s3://bucket/out/"]),
    ("HARDNET_S3_ADDRESSING_STYLE", "sideways", ["submit", "s3://bucket/prefix/", "--out", "s3://bucket/out/"]),
])
def test_a_bad_setting_names_its_variable(env, var, value, cmd):
    p = cli(cmd, {**env, var: value})
    assert p.returncode == 2, p.stderr
    assert f"bad setting: {var}={value!r}" in p.stderr
    assert "Traceback" not in p.stderr


def test_a_bad_setting_never_shows_the_password(env):
    p = cli(["status"], {**env, "HARDNET_BROKER_URL": "redis://:s3cret@localhost:6379/zero"})
    assert "s3cret" not in p.stderr


def test_a_bad_worker_setting_stops_the_worker_with_its_name(env):
    p = cli(["worker"], {**env, "HARDNET_CHUNKS_IN_FLIGHT": "0"}, timeout=60)
    assert p.returncode == 2
    assert "HARDNET_CHUNKS_IN_FLIGHT=" in p.stderr and "Traceback" not in p.stderr
