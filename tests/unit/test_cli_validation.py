"""Bad command-line input is refused before anything exists (issue 19, item 5): every bad argument or
input file of the job commands exits 2 with one line that names it, and leaves no Redis key, no
DEST/JOB_ID/ object, no job in `hardnet status` and no line in the producer's job memory. And
`hardnet results` of a job that has not finished says so and exits non-zero unless --partial.

Real redis-server (the session's, flushed for each test), the real CLI in a subprocess."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from cluster import ROOT, cli, image_bytes, read_jsonl


def one_line_exit_2(p, *needles: str) -> str:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def assert_nothing_left(env, redis_url, out=None):
    """No key at all in this test's Redis (hnq:* nor a queue), no job listed, nothing under DEST,
    no job remembered by the producer."""
    r = redis.Redis.from_url(redis_url)
    assert list(r.scan_iter("hnq:*")) == []
    assert list(r.scan_iter("*")) == []
    p = cli(["status", "--json"], env)
    assert p.returncode == 0 and json.loads(p.stdout) == [], p.stdout
    if out is not None and out.exists():
        assert list(out.iterdir()) == []
    assert not (Path(env["HARDNET_STATE_DIR"]) / "jobs.jsonl").exists()


# ----------------------------------------------------------------------------------------- submit
O = ["--out", "{out}"]


@pytest.mark.parametrize("args, needles", [
    ([*O, "--chunk-size", "-1"], ["--chunk-size -1: out of range, give 1 to 10000", "HARDNET_CHUNK_SIZE"]),
    ([*O, "--chunk-size", "0"], ["--chunk-size 0: out of range"]),        # 0 is not "the default"
    ([*O, "--chunk-size", "10001"], ["--chunk-size", "10001"]),
    ([*O, "--chunk-size", "1e3"], ["--chunk-size", "not a whole number"]),
    ([*O, "--top-k", "0"], ["--top-k 0", "1 to 20"]),
    ([*O, "--top-k", "21"], ["--top-k", "21"]),
    ([*O, "--top-k", "five"], ["--top-k"]),
    ([*O, "--format", "csv"], ["--format", "invalid choice"]),
    (["--format", "parquet"], ["--format parquet needs --out"]),
    ([*O, "--model", "resnet50"], ["--model", "invalid choice"]),
    ([*O, "--list-threads", "0"], ["--list-threads", "HARDNET_LIST_THREADS"]),
    ([*O, "--list-threads", "257"], ["--list-threads", "1 to 256"]),
    ([*O, "--list-depth", "-1"], ["--list-depth", "0 to 16"]),
    ([*O, "--wait", "--timeout", "-1"], ["--timeout", "above 0"]),
    ([*O, "--wait", "--timeout", "0"], ["--timeout"]),
    ([*O, "--wait", "--timeout", "nan"], ["--timeout"]),
    ([*O, "--weights", "rel/ckpt.pth"], ["--weights", "absolute path"]),
    ([*O, "--weights", "ftp://x/y.pth"], ["--weights", "unsupported scheme"]),
    ([*O, "--tag"], ["--tag", "not s3://"]),
    (["--skip-labelled"], ["--skip-labelled", "need --out"]),
    ([*O, "--since", "../other"], ["--since", "not a job id"]),
    (["--out", "ftp://host/x/"], ["ftp"]),
    (["{src}/../missing-dir", *O], ["does not exist"]),                       # a second SOURCE
    (["s3:///no-bucket", *O], ["invalid source"]),
    (["gopher://x/y.jpg", *O], ["unsupported source"]),
])
def test_bad_submit_argument_exits_2_and_creates_nothing(env, redis_url, src, tmp_path, args, needles):
    out = tmp_path / "out"
    out.mkdir()
    args = [x.replace("{out}", str(out)).replace("{src}", str(src)) for x in args]
    one_line_exit_2(cli(["submit", str(src), *args], env), *needles)
    assert_nothing_left(env, redis_url, out)


def test_chunk_size_bounds_are_the_settings_bounds():
    """--chunk-size shares HARDNET_CHUNK_SIZE's bounds: one place says what a chunk may hold."""
    from producer.args import field_bounds
    from producer.settings import ProducerSettings

    assert field_bounds(ProducerSettings, "chunk_size") == (1, 10_000)


def test_submit_of_sources_without_images_creates_nothing(env, redis_url, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    out = tmp_path / "out"
    p = cli(["submit", str(tmp_path / "empty"), "--out", str(out)], env)
    one_line_exit_2(p, "no images found")
    assert_nothing_left(env, redis_url, out)


# ------------------------------------------------------------------------------------- --from-file
def _latin1_list(tmp_path, src, good_lines: int) -> tuple:
    """``good_lines`` valid URIs, then one line in Latin-1 (``é`` as the byte 0xe9)."""
    lst = tmp_path / "uris.txt"
    good = "".join(f"{src / f'{i % 3}.jpg'}\n" for i in range(good_lines))
    lst.write_bytes(good.encode() + "caf\xe9.jpg\n".encode("latin-1") + f"{src / '0.jpg'}\n".encode())
    return lst, good_lines + 1


@pytest.mark.parametrize("good_lines", [0, 5, 40_000])   # 40,000 lines: past the first 1 MiB block
def test_from_file_not_utf8_is_refused_before_anything_is_enqueued(env, redis_url, src, tmp_path, good_lines):
    lst, bad_line = _latin1_list(tmp_path, src, good_lines)
    out = tmp_path / "out"
    p = cli(["submit", "--from-file", str(lst), "--out", str(out), "--chunk-size", "2"], env)
    line = one_line_exit_2(p, "--from-file", str(lst), f"line {bad_line} is not UTF-8", "0xe9",
                           "nothing was submitted")
    offset = lst.read_bytes().index(bytes([0xE9]))
    assert f"byte offset {offset})" in line
    assert_nothing_left(env, redis_url, out)


def test_from_file_not_utf8_on_stdin_is_refused(env, redis_url, src, tmp_path):
    lst, bad_line = _latin1_list(tmp_path, src, 7)
    p = subprocess.run([sys.executable, "-m", "producer.cli", "submit", "--from-file", "-"], env=env, cwd=ROOT,
                       input=lst.read_bytes(), capture_output=True, timeout=120)
    p.stderr = p.stderr.decode()
    one_line_exit_2(p, "--from-file", "stdin", f"line {bad_line} is not UTF-8")
    assert_nothing_left(env, redis_url)


def test_from_file_utf8_with_bom_and_stdin_copy_are_submitted(env, redis_url, src, tmp_path):
    """What the check reads is what is submitted: stdin is read once (kept in a temporary file),
    a UTF-8 byte-order mark and non-ASCII names are fine."""
    (src / "café ü.jpg").write_bytes(image_bytes(9))
    text = "\ufeff" + "".join(f"{src / n}\n" for n in ("0.jpg", "1.jpg", "café ü.jpg")) + "# comment\n"
    p = cli(["submit", "--from-file", "-", "--json"], env, stdin=text)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["total"] == 3


def test_from_file_missing_is_refused(env, redis_url, tmp_path):
    p = cli(["submit", "--from-file", str(tmp_path / "nope.txt")], env)
    one_line_exit_2(p, "--from-file", "does not exist")
    assert_nothing_left(env, redis_url)


def test_tag_refuses_a_non_s3_line_of_the_list_before_anything_exists(env, redis_url, src, tmp_path):
    lst = tmp_path / "uris.txt"
    lst.write_text("".join(f"s3://bkt/k{i}.jpg\n" for i in range(5000)) + f"{src / '0.jpg'}\n")
    p = cli(["submit", "--from-file", str(lst), "--tag", "--out", "s3://bkt/out/"], env)
    one_line_exit_2(p, "--tag", "line 5001", "--from-file", "not an s3:// object")
    assert_nothing_left(env, redis_url)


def test_check_uri_list_finds_the_line_of_every_bad_byte_across_block_edges(tmp_path, monkeypatch):
    """Blocks of 7 bytes cut 2-byte characters apart: no false refusal, and a bad byte at any place
    is reported on its own line, at its own offset."""
    import hnq.sources as sources
    from hnq.errors import ConfigError

    monkeypatch.setattr(sources, "_BLOCK", 7)
    good = "s3://b/é.jpg\ns3://b/ü/ß.jpg\n\ns3://b/x.jpg\n".encode()
    f = tmp_path / "l.txt"
    f.write_bytes(good)
    assert sources.check_uri_list(str(f), require_s3=True) == str(f)
    for at in range(len(good) + 1):
        bad = good[:at] + b"\xff" + good[at:]
        f.write_bytes(bad)
        with pytest.raises(ConfigError) as e:
            sources.check_uri_list(str(f))
        with pytest.raises(UnicodeDecodeError) as ref:   # Python's decoder of the whole file, the oracle
            bad.decode("utf-8")
        start = ref.value.start
        line = bad[:start].count(bytes([10])) + 1
        assert f"line {line} is not UTF-8" in str(e.value), (at, str(e.value))
        assert f"byte offset {start})" in str(e.value), (at, str(e.value))
    f.write_bytes(good[:-3] + "é".encode()[:1])   # the file ends inside a character
    with pytest.raises(ConfigError, match="line 4 is not UTF-8"):
        sources.check_uri_list(str(f))


# ------------------------------------------------------------------------------------------ job ids
BAD_IDS = ["..", "../../etc", "a/b", "", "x" * 129, ".hidden", "job id", "job*", "20260101-120000-1a2b3c4d\n"]
JOB_COMMANDS = [["status"], ["results"], ["resume"], ["report"], ["wait"], ["cancel"], ["redrive"], ["sweep"]]


@pytest.mark.parametrize("cmd", JOB_COMMANDS, ids=lambda c: c[0])
@pytest.mark.parametrize("bad", BAD_IDS, ids=lambda b: repr(b[:12]))
def test_a_malformed_job_id_exits_2_in_every_command(env, redis_url, tmp_path, cmd, bad):
    out = tmp_path / "out"
    out.mkdir()
    extra = ["--out", str(out)] if cmd[0] in ("resume", "report") else []
    p = cli([*cmd, bad, *extra], env)
    line = one_line_exit_2(p, f"hardnet {cmd[0]}")
    assert "job id" in line or "at most 128" in line, line
    assert_nothing_left(env, redis_url, out)


@pytest.mark.parametrize("good", ["20260101-120000-1a2b3c4d", "no-such-job", "j1", "a.b_c-d", "x" * 128])
def test_a_well_formed_unknown_job_id_is_unknown_not_malformed(env, redis_url, good):
    """The shape new_job_id makes, and the ids the other tests (and JobStore.create) use, pass the
    check; Redis then says it does not know them (exit 4)."""
    p = cli(["status", good], env)
    assert p.returncode == 4 and "unknown job" in p.stderr, p.stderr


def test_job_ids_that_submit_makes_pass_the_check_and_a_worker_accepts_what_passes():
    from hnq.jobs.store import new_job_id
    from hnq.schema import ChunkTask
    from producer.args import JOB_ID_RE

    for _ in range(100):
        assert JOB_ID_RE.fullmatch(new_job_id())
    for jid in ("20260101-120000-1a2b3c4d", "no-such-job", "x" * 128):
        ChunkTask(job_id=jid, chunk=0, count=1, digest="abcdef0123456789", model="hardnet68")


@pytest.mark.parametrize("args, needle", [
    (["status", "--limit", "0"], "--limit"),
    (["redrive", "j1", "--chunk", "-1"], "--chunk"),
    (["wait", "j1", "--timeout", "-5"], "--timeout"),
    (["resume", "j1", "--timeout", "inf"], "--timeout"),
    (["report", "j1", "--low", "0"], "--low"),
    (["report", "j1", "--classes", "0"], "--classes"),
    (["report", "j1", "--sheets", "-1"], "--sheets"),
    (["report", "j1", "-o", "/no/such/dir/r.html"], "-o"),
    (["results", "j1", "--bogus"], "unrecognized arguments"),
])
def test_other_bad_options_exit_2(env, redis_url, args, needle):
    one_line_exit_2(cli(args, env), needle)
    assert_nothing_left(env, redis_url)


# ------------------------------------------------------------------------------ results, unfinished
def _running_job(env, src) -> str:
    """A job of 3 chunks (no --out: results in Redis) of which chunk 0 is labelled: started and
    completed through the job store's own calls, as a worker makes them."""
    from hnq.jobs.store import JobStore

    p = cli(["submit", str(src), "--chunk-size", "1", "--json"], env)
    assert p.returncode == 0, p.stderr
    job = json.loads(p.stdout)["job_id"]
    store = JobStore(env["HARDNET_BROKER_URL"])
    store.start_chunk(job, 0)
    rec = {"uri": (src / "0.jpg").as_uri(), "status": "ok", "model": "hardnet39ds", "job_id": job,
           "top5": [{"index": 1, "label": "goldfish", "score": 0.9}]}
    store.put_part(job, 0, (json.dumps(rec) + "\n").encode())
    store.complete_chunk(job, 0, 1, 0)
    return job


def test_results_of_a_running_job_exit_5_without_partial_and_0_with_it(env, redis_url, src, tmp_path):
    job = _running_job(env, src)
    st = json.loads(cli(["status", job, "--json"], env).stdout)
    assert st["state"] == "running" and st["chunks_done"] == 1 and st["chunks"] == 3

    p = cli(["results", job], env)
    assert p.returncode == 5, p.stderr
    assert p.stdout == ""                              # nothing that looks like the whole job
    assert re.search(rf"job {job} is running \(1/3 chunks done\).*--partial", p.stderr), p.stderr
    assert not (tmp_path / "r.jsonl").exists()
    p = cli(["results", job, "-o", str(tmp_path / "r.jsonl")], env)
    assert p.returncode == 5 and not (tmp_path / "r.jsonl").exists()

    p = cli(["results", job, "--partial"], env)
    assert p.returncode == 0, p.stderr
    recs = read_jsonl(p.stdout)
    assert [r["uri"] for r in recs] == [(src / "0.jpg").as_uri()]
    assert "2 of 3 chunks have no results yet (job running)" in p.stderr


def test_results_of_a_failed_or_cancelled_job_exit_4_without_partial(env, redis_url, src):
    from hnq.jobs.store import JobStore

    job = _running_job(env, src)
    assert cli(["cancel", job], env).returncode == 0
    p = cli(["results", job], env)
    assert p.returncode == 4 and p.stdout == "" and f"job {job} is cancelled" in p.stderr, p.stderr
    p = cli(["results", job, "--partial"], env)
    assert p.returncode == 0 and len(read_jsonl(p.stdout)) == 1, p.stderr

    job2 = _running_job(env, src)
    JobStore(env["HARDNET_BROKER_URL"]).finish(job2, "failed", "provoked")
    p = cli(["results", job2], env)
    assert p.returncode == 4 and p.stdout == "" and "failed" in p.stderr, p.stderr


def test_results_of_a_queued_job(env, redis_url, src):
    p = cli(["submit", str(src), "--json"], env)
    job = json.loads(p.stdout)["job_id"]
    p = cli(["results", job], env)
    assert p.returncode == 5 and p.stdout == "" and "is queued (0/1 chunks done)" in p.stderr, p.stderr
    p = cli(["results", job, "--partial"], env)
    assert p.returncode == 0 and p.stdout == "", p.stderr
