"""Output options end to end (issue 10, items 4-7), through a real redis-server, moto's S3 server
and a real worker process: --format parquet (read back with pyarrow and DuckDB, and by `hardnet
results`), --tag (S3 object tags merged, the 10-tag limit), --top-k and --weights (a job-named
checkpoint, the engine bound), and `hardnet report` rendered in headless Chromium."""
from __future__ import annotations

import hashlib
import html.parser
import json
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cluster import ROOT, Worker, bad_images, base_env, cli, cli_json, image_bytes, read_jsonl
from servers import s3_env

pytestmark = pytest.mark.slow

HOSTILE_KEY = 'in/"><script>alert(1)</script><img src=x onerror=alert(2)>.jpg'
N_GOOD = 40
CHUNK = 16


@pytest.fixture(scope="module")
def cluster(redis_server, moto_server, tmp_path_factory):
    """One worker (hardnet39ds, random weights) that may load job checkpoints from `ckpts` and keeps
    one engine at a time."""
    logdir = tmp_path_factory.mktemp("logs")
    ckpts = tmp_path_factory.mktemp("ckpts")
    env = base_env(redis_server.url, HARDNET_OUTPUT_ROOTS=str(tmp_path_factory.getbasetemp()),
                   HARDNET_FILE_ROOTS=str(tmp_path_factory.getbasetemp()),
                   HARDNET_JOB_WEIGHTS_ALLOW=str(ckpts), HARDNET_MAX_ENGINES="1",
                   HARDNET_STATE_DIR=str(tmp_path_factory.mktemp("state")),
                   TORCH_HOME=str(tmp_path_factory.mktemp("torch-home")), **s3_env(moto_server.url))
    redis_server.flush()
    w = Worker(env, "outputs", logdir)
    try:
        w.wait_ready()
        yield {"env": env, "worker": w, "ckpts": ckpts, "moto": moto_server}
    finally:
        w.stop()


@pytest.fixture(scope="module")
def s3c(cluster):
    import boto3

    return boto3.client("s3", endpoint_url=cluster["moto"].url, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def _put_all(s3c, bucket: str, objs: dict[str, bytes]) -> None:
    s3c.create_bucket(Bucket=bucket)
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda kv: s3c.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), objs.items()))


def _get(s3c, bucket: str, key: str) -> bytes:
    return s3c.get_object(Bucket=bucket, Key=key)["Body"].read()


# ------------------------------------------------------------------------------------ parquet
@pytest.fixture(scope="module")
def parquet_job(cluster, s3c, tmp_path_factory):
    """A Parquet job over an S3 prefix (good images, broken ones, a hostile key), to S3."""
    objs = {f"in/img-{i:03d}.jpg": image_bytes(i) for i in range(N_GOOD)}
    objs.update({f"in/{k}": v for k, v in bad_images().items()})
    objs[HOSTILE_KEY] = image_bytes(999)
    _put_all(s3c, "pq-src", objs)
    s3c.create_bucket(Bucket="pq-out")
    rc, summary = cli_json(["submit", "s3://pq-src/in/", "--out", "s3://pq-out/run/", "--format", "parquet",
                            "--chunk-size", str(CHUNK), "--wait", "--json"], cluster["env"], timeout=600)
    job = summary["job_id"]
    manifest = json.loads(_get(s3c, "pq-out", f"run/{job}/manifest.json"))
    local = tmp_path_factory.mktemp("parts")
    for name in manifest["parts"]:
        (local / name).write_bytes(_get(s3c, "pq-out", f"run/{job}/{name}"))
    uris = sorted(f"s3://pq-src/{k}" for k in objs)
    return {"rc": rc, "summary": summary, "job": job, "manifest": manifest, "local": local, "uris": uris,
            "bad": {f"s3://pq-src/in/{k}" for k in bad_images()}}


def test_parquet_parts_schema_and_every_record(parquet_job):
    import pyarrow.parquet as pq

    from hnq.jobs.parts import PARQUET_COLUMNS, arrow_schema

    j = parquet_job
    n = len(j["uris"])
    chunks = -(-n // CHUNK)
    assert j["rc"] == 3 and j["summary"]["state"] == "done_with_errors", j["summary"]
    m = j["manifest"]
    assert m["format"] == "parquet" and m["top_k"] == 5
    assert m["parts"] == [f"part-{c:05d}.parquet" for c in range(chunks)] and m["missing_parts"] == []
    assert m["total"] == n and m["succeeded"] == n - len(j["bad"]) and m["failed"] == len(j["bad"])

    rows = []
    for name in m["parts"]:
        t = pq.read_table(j["local"] / name)
        assert t.schema.remove_metadata() == arrow_schema().remove_metadata(), name
        assert [f.name for f in t.schema] == [c[0] for c in PARQUET_COLUMNS]
        assert t.schema.metadata[b"hardnet.top_k"] == b"5"
        rows += t.to_pylist()
    assert sorted(r["uri"] for r in rows) == j["uris"], "exactly one row per submitted URI"
    for r in rows:
        assert r["model"] == "hardnet39ds" and r["weights"] == "random" and r["job_id"] == j["job"]
        if r["uri"] in j["bad"]:
            assert r["status"] == "error" and r["error_code"] in ("decode_error", "empty"), r
            assert r["error_message"] and r["topk"] is None and r["top1_label"] is None
        else:
            assert r["status"] == "ok" and r["error_code"] is None, r
            assert len(r["topk"]) == 5 and r["size"] > 0 and r["etag"]
            assert (r["top1_index"], r["top1_label"], r["top1_score"]) == tuple(r["topk"][0].values())
            scores = [x["score"] for x in r["topk"]]
            assert scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1
            from worker.model.labels import IMAGENET_CATEGORIES

            assert all(IMAGENET_CATEGORIES[x["index"]] == x["label"] for x in r["topk"])
        assert r["tag_error_code"] is None


def test_parquet_parts_query_in_duckdb_as_documented(parquet_job):
    """The DuckDB queries of docs/output.md, run on the downloaded parts."""
    import duckdb
    import pyarrow.parquet as pq

    j = parquet_job
    glob = str(j["local"] / "part-*.parquet")
    rows = [r for name in j["manifest"]["parts"] for r in pq.read_table(j["local"] / name).to_pylist()]
    con = duckdb.connect()
    n, ok, err = con.execute(
        "SELECT count(*), count(*) FILTER (status = 'ok'), count(*) FILTER (status = 'error') "
        f"FROM read_parquet('{glob}')").fetchone()
    assert (n, ok, err) == (len(rows), sum(r["status"] == "ok" for r in rows), len(j["bad"]))
    # top-1 per class, flat columns
    by_label = dict(con.execute(f"SELECT top1_label, count(*) FROM read_parquet('{glob}') WHERE status = 'ok' "
                                "GROUP BY top1_label").fetchall())
    from collections import Counter

    assert by_label == dict(Counter(r["top1_label"] for r in rows if r["status"] == "ok"))
    # the nested list: 1-based indexing and unnest agree with the flat columns
    assert con.execute(f"SELECT count(*) FROM read_parquet('{glob}') WHERE status = 'ok' AND "
                       "(topk[1].label <> top1_label OR topk[1].index <> top1_index)").fetchone()[0] == 0
    assert con.execute(f"SELECT count(*) FROM (SELECT unnest(topk) FROM read_parquet('{glob}'))").fetchone()[0] == 5 * ok
    # every documented DuckDB query runs
    doc = (ROOT / "docs" / "output.md").read_text()
    queries = re.findall(r"```sql duckdb\n(.*?)```", doc, re.S)
    assert queries, "docs/output.md has DuckDB examples"
    for q in queries:
        con.execute(q.replace("s3://BUCKET/PREFIX/JOB_ID/part-*.parquet", glob)).fetchall()


def test_results_of_a_parquet_job_are_json_lines(parquet_job, cluster):
    import pyarrow.parquet as pq

    j = parquet_job
    p = cli(["results", j["job"]], cluster["env"])
    assert p.returncode == 0, p.stderr
    recs = read_jsonl(p.stdout)
    assert sorted(r["uri"] for r in recs) == j["uris"]
    rows = {r["uri"]: r for name in j["manifest"]["parts"] for r in pq.read_table(j["local"] / name).to_pylist()}
    for r in recs:
        row = rows[r["uri"]]
        assert r["status"] == row["status"] and "topk" not in r
        if r["status"] == "ok":
            assert [x["label"] for x in r["top5"]] == [x["label"] for x in row["topk"]]
            assert all(abs(a["score"] - b["score"]) < 1e-6 for a, b in zip(r["top5"], row["topk"]))
        else:
            assert r["error"]["code"] == row["error_code"]
    failed = read_jsonl(cli(["results", j["job"], "--failed-only"], cluster["env"]).stdout)
    assert sorted(r["uri"] for r in failed) == sorted(j["bad"])


# ------------------------------------------------------------------------------------ report
class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.counts: dict[str, str] = {}
        self.manifest: dict[str, str] = {}
        self.codes: dict[str, str] = {}
        self.imgs: list[str] = []
        self._cur = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        for k, store in (("data-count", self.counts), ("data-manifest", self.manifest), ("data-code", self.codes)):
            if k in a:
                self._cur = (store, a[k])
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        for k in a:
            assert not k.startswith("on"), f"event handler attribute {k} in the page"

    def handle_data(self, data):
        if self._cur:
            self._cur[0][self._cur[1]] = data.strip()
            self._cur = None


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_of_the_parquet_job(parquet_job, cluster, s3c, tmp_path):
    j = parquet_job
    p = cli(["report", j["job"]], cluster["env"], timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"s3://pq-out/run/{j['job']}/report.html"
    page = _get(s3c, "pq-out", f"run/{j['job']}/report.html").decode()
    head = s3c.head_object(Bucket="pq-out", Key=f"run/{j['job']}/report.html")
    assert head["ContentType"].startswith("text/html")

    # the hostile key is shown, escaped; nothing in the page can run or load
    assert "<script" not in page.lower() and "onerror=" not in page.replace("onerror=alert(2)&gt;", "")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "http://" not in page and "https://" not in page, "the page must load nothing"
    parsed = _Page()
    parsed.feed(page)
    assert "script" not in parsed.tags

    # the counts in the page are the manifest's
    m = j["manifest"]
    assert parsed.counts["total"] == str(m["total"]) == parsed.manifest["total"]
    assert parsed.counts["succeeded"] == str(m["succeeded"]) and parsed.counts["failed"] == str(m["failed"])
    assert parsed.counts["parts"] == str(len(m["parts"])) and parsed.counts["missing_parts"] == "0"
    assert {k: int(v) for k, v in parsed.codes.items()} == m["error_codes"]
    # thumbnails: data URIs only, one per shown image that could be fetched
    assert parsed.imgs and all(s.startswith("data:image/jpeg;base64,") for s in parsed.imgs)
    assert len(parsed.imgs) >= 10
    for sec in ("label-chart", "score-chart", "throughput-chart", "low-sheet"):
        assert f'id="{sec}"' in page, sec

    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (scripts/setup.sh installs it with apt-get where apt exists)")
    f = tmp_path / "report.html"
    f.write_text(page)
    shot = tmp_path / "shot.png"
    base = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
            "--window-size=1280,2400"]
    r = subprocess.run(base + [f"--screenshot={shot}", f.as_uri()], capture_output=True, text=True, timeout=180)
    assert shot.exists(), r.stderr[-3000:]
    console = [l for l in r.stderr.splitlines() if "CONSOLE" in l or "Refused to" in l
               or "Content Security Policy" in l or "Uncaught" in l]
    assert console == [], console
    from PIL import Image

    with Image.open(shot) as im:
        assert im.format == "PNG" and im.size == (1280, 2400)
        colors = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50, "the screenshot is blank"
    top = max(colors)[0] / (1280 * 2400)
    assert top < 0.97, f"{top:.1%} of the screenshot is one colour"
    d = subprocess.run(base + ["--dump-dom", f.as_uri()], capture_output=True, text=True, timeout=180)
    dom = _Page()
    dom.feed(d.stdout)
    assert dom.counts == parsed.counts and "script" not in dom.tags and len(dom.imgs) == len(parsed.imgs)


# ------------------------------------------------------------------------------------ tags
def test_tag_write_back_merges_and_respects_the_limit(cluster, s3c):
    from hnq.storage.s3.tags import TAG_KEYS, tag_value

    objs = {"t/plain.jpg": image_bytes(1), "t/two.jpg": image_bytes(2), "t/nine.jpg": image_bytes(3),
            "t/broken.jpg": b"not a jpeg"}
    _put_all(s3c, "tag-src", objs)
    s3c.create_bucket(Bucket="tag-out")
    two = [{"Key": "project", "Value": "blue"}, {"Key": "owner", "Value": "ana@example.org"}]
    nine = [{"Key": f"k{i}", "Value": f"v{i}"} for i in range(9)]
    s3c.put_object_tagging(Bucket="tag-src", Key="t/two.jpg", Tagging={"TagSet": two})
    s3c.put_object_tagging(Bucket="tag-src", Key="t/nine.jpg", Tagging={"TagSet": nine})

    rc, summary = cli_json(["submit", "s3://tag-src/t/", "--out", "s3://tag-out/r/", "--tag", "--wait", "--json"],
                           cluster["env"], timeout=300)
    job = summary["job_id"]
    recs = {r["uri"].rsplit("/", 1)[-1]: r for r in read_jsonl(_get(s3c, "tag-out", f"r/{job}/part-00000.jsonl").decode())}
    manifest = json.loads(_get(s3c, "tag-out", f"r/{job}/manifest.json"))
    assert rc == 3 and summary["state"] == "done_with_errors", summary
    assert summary["succeeded"] == 3 and summary["failed"] == 1 and summary["error_codes"] == {"decode_error": 1, "tag_error": 1}
    assert manifest["tag"] is True and manifest["tag_errors"] == 1 and manifest["state"] == "done_with_errors"

    def tags(key):
        return {t["Key"]: t["Value"] for t in s3c.get_object_tagging(Bucket="tag-src", Key=key)["TagSet"]}

    for name in ("plain.jpg", "two.jpg"):
        r = recs[name]
        assert r["status"] == "ok" and "tag_error" not in r, r
        want = {"hardnet:label": tag_value(r["top5"][0]["label"]), "hardnet:score": f"{r['top5'][0]['score']:.4f}",
                "hardnet:model": "hardnet39ds/random"}
        got = tags(f"t/{name}")
        assert {k: got[k] for k in TAG_KEYS} == want
    assert tags("t/plain.jpg").keys() == set(TAG_KEYS)
    assert tags("t/two.jpg") == {**{t["Key"]: t["Value"] for t in two}, **{k: tags("t/two.jpg")[k] for k in TAG_KEYS}}
    assert len(tags("t/two.jpg")) == 5
    # nine tags + 3 would be 13 > 10: an error on the record, the object's own tags untouched
    r = recs["nine.jpg"]
    assert r["status"] == "ok" and r["top5"] and r["tag_error"]["code"] == "tag_error"
    assert "limit of 10" in r["tag_error"]["message"]
    assert tags("t/nine.jpg") == {t["Key"]: t["Value"] for t in nine}
    # the broken image was not labelled, so not tagged
    assert recs["broken.jpg"]["status"] == "error" and "tag_error" not in recs["broken.jpg"]
    assert s3c.get_object_tagging(Bucket="tag-src", Key="t/broken.jpg")["TagSet"] == []


def test_tag_refuses_non_s3_sources_at_submit(cluster, tmp_path):
    (tmp_path / "a.jpg").write_bytes(image_bytes(1))
    p = cli(["submit", str(tmp_path), "--tag", "--out", str(tmp_path / "out")], cluster["env"])
    assert p.returncode == 2 and "--tag writes S3 object tags" in p.stderr, p.stderr


# ------------------------------------------------------------------------------------ top-k, weights
def _checkpoint(path: Path, seed: int) -> str:
    import torch

    from worker.model.hardnet import build_hardnet

    torch.manual_seed(seed)
    torch.save(build_hardnet("hardnet39ds").state_dict(), path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_top_k_and_a_job_checkpoint_with_one_engine(cluster, tmp_path):
    env, w = cluster["env"], cluster["worker"]
    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):
        (src / f"{i}.jpg").write_bytes(image_bytes(i))
    ckpt = cluster["ckpts"] / "mine-v1.pth"
    sha = _checkpoint(ckpt, 7)
    out = tmp_path / "out"
    rc, s1 = cli_json(["submit", f"file://{src}", "--out", str(out), "--top-k", "3", "--weights", str(ckpt),
                       "--wait", "--json"], env, timeout=300)
    assert rc == 0 and s1["state"] == "done", s1
    recs = read_jsonl((out / s1["job_id"] / "part-00000.jsonl").read_text())
    assert len(recs) == 6
    for r in recs:
        assert r["status"] == "ok" and "top5" not in r and len(r["topk"]) == 3 and r["weights"] == "mine-v1.pth"
    m = json.loads((out / s1["job_id"] / "manifest.json").read_text())
    assert m["top_k"] == 3 and m["weights"] == ["mine-v1.pth"] and m["weights_sha256"] == {"mine-v1.pth": sha}
    assert m["weights_requested"] == str(ckpt)
    _, st = cli_json(["status", s1["job_id"], "--json"], env)
    assert st["options"] == {"top_k": 3, "weights": str(ckpt)}

    # the worker's own weights again, top 20: the one engine is swapped back (HARDNET_MAX_ENGINES=1)
    rc, s2 = cli_json(["submit", f"file://{src}", "--out", str(out), "--top-k", "20", "--wait", "--json"],
                      env, timeout=300)
    assert rc == 0, s2
    recs2 = read_jsonl((out / s2["job_id"] / "part-00000.jsonl").read_text())
    assert all(len(r["topk"]) == 20 and r["weights"] == "random" for r in recs2)
    # same image, other weights: other scores (the checkpoint really was used)
    assert [r["topk"][0]["score"] for r in recs2][:3] != [r["topk"][0]["score"] for r in recs][:3]
    assert w.log().count("closed to make room (HARDNET_MAX_ENGINES=1)") >= 2

    # a checkpoint outside HARDNET_JOB_WEIGHTS_ALLOW: submit refuses it at once, since the live
    # worker says what it accepts (hnq.fleet); sent anyway (the check off), the worker dead-letters
    # it at once, with the reason
    other = tmp_path / "elsewhere.pth"
    _checkpoint(other, 8)
    p = cli(["submit", f"file://{src}", "--out", str(out), "--weights", str(other)], env)
    assert p.returncode == 2 and "HARDNET_JOB_WEIGHTS_ALLOW" in p.stderr, (p.returncode, p.stderr)
    rc, s3 = cli_json(["submit", f"file://{src}", "--out", str(out), "--weights", str(other), "--wait",
                       "--timeout", "120", "--json"], dict(env, HARDNET_CHECK_WORKERS="false"), timeout=300)
    assert rc == 4 and s3["state"] == "failed", s3
    _, st3 = cli_json(["status", s3["job_id"], "--json"], env)
    assert st3["dead_letters"][0]["attempts"] == 1
    assert "HARDNET_JOB_WEIGHTS_ALLOW" in st3["dead_letters"][0]["error"]


@pytest.mark.parametrize("args, needle", [
    (["--top-k", "0"], "--top-k 0"),
    (["--top-k", "21"], "--top-k 21"),
    (["--format", "parquet"], "--format parquet needs --out"),
    (["--weights", "relative/ckpt.pth"], "absolute path"),
    (["--weights", "ftp://host/x.pth"], "unsupported scheme"),
])
def test_bad_options_exit_2(cluster, tmp_path, args, needle):
    (tmp_path / "a.jpg").write_bytes(image_bytes(1))
    p = cli(["submit", str(tmp_path), *args], cluster["env"])
    assert p.returncode == 2 and needle in p.stderr, (p.returncode, p.stderr)


# ------------------------------------------------------------------------------------ no pyarrow
def test_worker_without_pyarrow_dead_letters_parquet_chunks_with_the_reason(redis_server, tmp_path):
    """A worker that cannot import pyarrow: a Parquet job's chunks are dead-lettered on their first
    attempt (a configuration error, no retries) saying what to install; no part is written."""
    fake = tmp_path / "fake" / "pyarrow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named pyarrow (test)')\n")
    queue = "hardnet-nopyarrow"
    env = base_env(redis_server.url, HARDNET_OUTPUT_ROOTS=str(tmp_path), HARDNET_FILE_ROOTS=str(tmp_path),
                   HARDNET_QUEUE=queue, HARDNET_STATE_DIR=str(tmp_path / "state"),
                   TORCH_HOME=str(tmp_path / "torch-home"))
    wenv = dict(env, PYTHONPATH=str(tmp_path / "fake"))
    src = tmp_path / "in"
    src.mkdir()
    for i in range(5):
        (src / f"{i}.jpg").write_bytes(image_bytes(i))
    w = Worker(wenv, "nopyarrow", tmp_path)
    try:
        w.wait_ready()
        rc, s = cli_json(["submit", str(src), "--out", str(tmp_path / "out"), "--format", "parquet", "--wait",
                          "--timeout", "120", "--json"], env, timeout=300)
        _, st = cli_json(["status", s["job_id"], "--json"], env)
        log = w.log()
    finally:
        w.stop()
    assert rc == 4 and s["state"] == "failed", s
    d = st["dead_letters"][0]
    assert d["attempts"] == 1 and "pyarrow" in d["error"] and "hardnet-queue[parquet]" in d["error"], d
    assert not list((tmp_path / "out" / s["job_id"]).glob("part-*")), "no part without pyarrow"
    assert "attempt 2" not in log


# ------------------------------------------------------------------------------------ resume, Redis
def test_parquet_job_resumed_from_storage_keeps_its_options(cluster, redis_server, tmp_path):
    """Redis loses the job and a part is gone: `hardnet resume --out` rebuilds the job from job.json
    and re-sends the chunk with the job's options, so the part comes back as Parquet with top 3."""
    import pyarrow.parquet as pq
    import redis

    env = cluster["env"]
    src = tmp_path / "in"
    src.mkdir()
    for i in range(8):
        (src / f"{i}.jpg").write_bytes(image_bytes(100 + i))
    out = tmp_path / "out"
    rc, s = cli_json(["submit", str(src), "--out", str(out), "--format", "parquet", "--top-k", "3",
                      "--chunk-size", "4", "--wait", "--json"], env, timeout=300)
    assert rc == 0, s
    job = s["job_id"]
    first = pq.read_table(out / job / "part-00001.parquet").to_pylist()
    (out / job / "part-00001.parquet").unlink()
    (out / job / "manifest.json").unlink()
    r = redis.Redis.from_url(redis_server.url)
    r.delete(*list(r.scan_iter(f"hnq:job:{{{job}}}*")))
    p = cli(["resume", job, "--out", str(out), "--wait", "--timeout", "240"], env, timeout=300)
    assert p.returncode == 0 and "state rebuilt from storage" in p.stderr, p.stderr
    again = pq.read_table(out / job / "part-00001.parquet")
    assert again.schema.metadata[b"hardnet.top_k"] == b"3"
    assert [(x["uri"], [l["index"] for l in x["topk"]]) for x in again.to_pylist()] == \
        [(x["uri"], [l["index"] for l in x["topk"]]) for x in first]
    m = json.loads((out / job / "manifest.json").read_text())
    assert m["format"] == "parquet" and m["top_k"] == 3 and m["parts"] == ["part-00000.parquet", "part-00001.parquet"]
    assert m["state"] == "done" and m["succeeded"] == 8
    # and a report from storage alone, once Redis forgot the job again
    r.delete(*list(r.scan_iter(f"hnq:job:{{{job}}}*")))
    p = cli(["report", job, "--out", str(out), "--no-thumbnails"], env, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == str(out / job / "report.html"), p.stderr
    page = _Page()
    page.feed((out / job / "report.html").read_text())
    assert page.counts["total"] == page.manifest["total"] == "8" and page.counts["parts"] == "2"


def test_report_of_a_job_kept_in_redis(cluster, tmp_path):
    env = cluster["env"]
    src = tmp_path / "in"
    src.mkdir()
    for i in range(5):
        (src / f"{i}.jpg").write_bytes(image_bytes(200 + i))
    (src / "broken.jpg").write_bytes(b"no")
    rc, s = cli_json(["submit", str(src), "--chunk-size", "3", "--wait", "--json"], env, timeout=300)
    assert rc == 3, s
    page_path = tmp_path / "r.html"
    p = cli(["report", s["job_id"], "-o", str(page_path), "--no-thumbnails"], env, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == str(page_path), p.stderr
    page = _Page()
    page.feed(page_path.read_text())
    assert page.counts["total"] == "6" and page.counts["succeeded"] == "5" and page.counts["failed"] == "1"
    assert page.counts["parts"] == "2" and page.codes == {"decode_error": "1"}
    text = page_path.read_text()
    assert 'id="throughput-chart"' in text, "chunk completion times come from the job state"
    assert "Thumbnails were turned off" in text and not page.imgs
