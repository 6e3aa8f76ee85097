"""worker.metrics and producer.exporter without a worker process: records counted by label set, a
real engine's stages feeding the histograms, the scrape-time collector on a CPU and with (faked)
CUDA answers, the port-in-use error, the exporter's reading of a real redis-server, and the docs,
the Grafana dashboard and the CLI hook kept in agreement with what the code exports.

The worker's metrics live in prometheus_client's default registry (one per process), so these
tests compare values before and after, never absolute values."""
from __future__ import annotations

import argparse
import json
import re
import socket
import threading
import types
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.registry import CollectorRegistry

import worker.metrics as wm
from hnq.errors import ConfigError, ErrorCode
from hnq.schema import Label, ResultRecord
from metric_names import documented_name, exported_series, families, promql_metric_names

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "hardnet-queue.json"


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _ok(uri: str, model: str = "hardnet68") -> ResultRecord:
    return ResultRecord(uri=uri, status="ok", model=model, top5=[Label(index=1, label="x", score=0.5)])


def _err(uri: str, code: ErrorCode, model: str = "hardnet68") -> ResultRecord:
    return ResultRecord.failure(uri, code, "bad", model)


# -- recording ------------------------------------------------------------------------------------
def test_count_records_by_model_status_and_code():
    keys = [("hardnet68", "ok", ""), ("hardnet68", "error", "decode_error"),
            ("hardnet68", "error", "not_found"), ("hardnet85", "ok", "")]
    before = {k: sample("hardnet_images_total", model=k[0], status=k[1], code=k[2]) for k in keys}
    recs = [_ok("a"), _ok("b"), _ok("c"), _err("d", ErrorCode.decode_error),
            _err("e", ErrorCode.decode_error), _err("f", ErrorCode.not_found), _ok("g", "hardnet85")]
    wm.count_records(recs)
    delta = {k: sample("hardnet_images_total", model=k[0], status=k[1], code=k[2]) - before[k] for k in keys}
    assert delta == {keys[0]: 3, keys[1]: 2, keys[2]: 1, keys[3]: 1}


def test_write_part_times_the_write_and_counts_what_it_wrote(tmp_path):
    from worker.chunk import write_part

    n0 = sample("hardnet_stage_seconds_count", stage="write")
    c0 = sample("hardnet_images_total", model="hardnet68", status="error", code="timeout")
    write_part(None, tmp_path.as_uri() + "/", "job-w", 0, [_ok("a"), _err("b", ErrorCode.timeout)])
    assert (tmp_path / "job-w" / "part-00000.jsonl").read_text().count("\n") == 2
    assert sample("hardnet_stage_seconds_count", stage="write") == n0 + 1
    assert sample("hardnet_images_total", model="hardnet68", status="error", code="timeout") == c0 + 1


def test_a_failed_write_counts_nothing(tmp_path):
    from worker.chunk import write_part

    c0 = sample("hardnet_images_total", model="hardnet68", status="error", code="too_large")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(Exception):
        write_part(None, blocker.as_uri() + "/", "job-x", 0, [_err("b", ErrorCode.too_large)])
    assert sample("hardnet_images_total", model="hardnet68", status="error", code="too_large") == c0


def test_an_instrumented_engine_feeds_the_histograms():
    """A real engine (random hardnet39ds on the CPU): each fetch attempt, each decoded image and
    each batch is observed once; the batch sizes add up to the images that reached the device."""
    from cluster import image_bytes
    from hnq.errors import ImageError
    from hnq.storage import Fetched
    from worker.engine import DeviceRunner, Engine, EngineConfig
    from worker.engine.classifier import Classifier

    clf = Classifier("hardnet39ds", "random", device="cpu", batch_size=8)
    blobs = {f"mem://{i}": image_bytes(i) for i in range(20)}
    blobs["mem://broken"] = b"not an image"

    def fetch(uri):
        if uri == "mem://missing":
            raise ImageError("no such object", ErrorCode.not_found)
        return Fetched(data=blobs[uri], etag=None, size=len(blobs[uri]))

    eng = Engine(fetch=fetch, decode=clf.decode, runner=DeviceRunner(clf.net, clf.device, 8, amp=False),
                 record=clf.record, cfg=EngineConfig(batch_size=8, fetch_threads=4, decode_threads=2))
    eng.classifier = clf
    model = "test-instrumented"          # a label set of its own: no other test touches it
    wm.instrument(eng, model)
    before = {s: sample("hardnet_stage_seconds_count", stage=s) for s in ("fetch", "decode", "device")}
    try:
        recs = eng.submit(list(blobs) + ["mem://missing"], job_id="j").result(120)
    finally:
        eng.close()
    ok = sum(r.status == "ok" for r in recs)
    assert ok == 20 and len(recs) == 22
    batches = eng.batches.snapshot()["batches"]
    assert sample("hardnet_stage_seconds_count", stage="fetch") - before["fetch"] == 22
    assert sample("hardnet_stage_seconds_count", stage="decode") - before["decode"] == 21
    assert sample("hardnet_stage_seconds_count", stage="device") - before["device"] == batches
    assert sample("hardnet_batch_size_count", model=model) == batches >= 3
    assert sample("hardnet_batch_size_sum", model=model) == ok
    assert sample("hardnet_batch_capacity_images", model=model) == 8


def test_gpu_decode_batches_are_observed_apart_from_cpu_images():
    from worker.engine.decode import DecodeStage

    done = threading.Event()
    got = []

    def on_decoded(item):
        got.append(item)
        if len(got) == 3:
            done.set()

    stage = DecodeStage(lambda b: b, 1, on_decoded, lambda *a: None, max_items=16, max_bytes=2**20,
                        batch_decode=lambda blobs: list(blobs), eligible=lambda d: d.startswith(b"J"),
                        batch=8)
    cpu, gpu = [], []
    stage.stats.observer = cpu.append
    stage.batch_observer = gpu.append
    chunk = types.SimpleNamespace(closed=False)
    try:
        for data in (b"J1", b"J2", b"P3"):
            stage.put(types.SimpleNamespace(chunk=chunk, data=data, image=None))
        assert done.wait(30)
    finally:
        stage.close()
    assert len(cpu) == 1 and 1 <= len(gpu) <= 2      # the PNG-like one on the CPU; JPEGs in batches
    assert stage.stats.snapshot()["items"] == 3


# -- scrape-time values ---------------------------------------------------------------------------
class _FakeEngine:
    def __init__(self, model: str, device: str, ready: int, upstream: int, fetchers: int = 8):
        import torch

        self.classifier = types.SimpleNamespace(model_name=model)
        self.fetcher = types.SimpleNamespace(threads=fetchers)
        self.runner = types.SimpleNamespace(device=torch.device(device))
        self.batcher = types.SimpleNamespace(depth=lambda: (ready, upstream))


def _collect(col) -> dict:
    reg = CollectorRegistry()
    reg.register(col)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in reg.collect() for s in f.samples}


def test_runtime_collector_on_a_cpu_worker():
    col = wm.RuntimeCollector(lambda: [_FakeEngine("m1", "cpu", 3, 5), _FakeEngine("m2", "cpu", 0, 2, 40)])
    got = _collect(col)
    assert got == {("hardnet_images_in_flight", (("model", "m1"),)): 8,
                   ("hardnet_images_in_flight", (("model", "m2"),)): 2,
                   ("hardnet_fetch_threads", (("model", "m1"),)): 8,
                   ("hardnet_fetch_threads", (("model", "m2"),)): 40}
    text = generate_latest(_registry_with(col)).decode()
    # the GPU families are described (known to Prometheus and the dashboard) but have no samples
    assert "# TYPE hardnet_gpu_memory_allocated_bytes gauge" in text
    assert "hardnet_gpu_memory_allocated_bytes{" not in text


def _registry_with(col):
    reg = CollectorRegistry()
    reg.register(col)
    return reg


def test_runtime_collector_reads_cuda_only_once_initialised(monkeypatch):
    import torch

    calls = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: calls.append(d) or 1)
    col = wm.RuntimeCollector(lambda: [_FakeEngine("m", "cuda:0", 0, 0)])
    got = _collect(col)
    assert calls == [] and not [k for k in got if k[0].startswith("hardnet_gpu_")]

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 1234)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 4096)
    monkeypatch.setattr(torch.cuda, "utilization", lambda d: 37)
    col.nvml = True
    got = _collect(col)
    assert got[("hardnet_gpu_memory_allocated_bytes", (("device", "cuda:0"),))] == 1234
    assert got[("hardnet_gpu_memory_reserved_bytes", (("device", "cuda:0"),))] == 4096
    assert got[("hardnet_gpu_utilization_ratio", (("device", "cuda:0"),))] == pytest.approx(0.37)

    # NVML missing or broken: utilisation is left out, the rest is still there, nothing raises
    def broken(d):
        raise RuntimeError("NVML Shared Library Not Found")

    monkeypatch.setattr(torch.cuda, "utilization", broken)
    got = _collect(col)
    assert ("hardnet_gpu_utilization_ratio", (("device", "cuda:0"),)) not in got
    assert got[("hardnet_gpu_memory_reserved_bytes", (("device", "cuda:0"),))] == 4096
    col.nvml = False
    monkeypatch.setattr(torch.cuda, "utilization", lambda d: pytest.fail("asked NVML without pynvml"))
    _collect(col)


def test_runtime_collector_survives_a_broken_engine_list():
    def boom():
        raise RuntimeError("context half built")

    got = _collect(wm.RuntimeCollector(boom))
    assert got == {}


def test_a_port_in_use_is_a_config_error_naming_the_variable():
    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"HARDNET_METRICS_PORT={port}: cannot serve metrics"):
            wm.serve(port)
    assert wm.served_at() is None


def test_metrics_port_setting_is_validated(monkeypatch):
    from hnq.errors import ConfigError
    from worker.settings import WorkerSettings

    assert WorkerSettings().metrics_port is None
    monkeypatch.setenv("HARDNET_METRICS_PORT", "9807")
    assert WorkerSettings().metrics_port == 9807
    for bad in ("0", "70000", "http"):
        monkeypatch.setenv("HARDNET_METRICS_PORT", bad)
        with pytest.raises(ConfigError, match=f"HARDNET_METRICS_PORT='{bad}'"):
            WorkerSettings()


# -- the exporter against a real redis-server ----------------------------------------------------
def test_exporter_collector_reads_queue_jobs_and_dead_letters(redis_url):
    from hnq.jobs.store import JobStore
    from producer.exporter import QueueCollector, make_store

    store = JobStore(redis_url)
    r = store.r
    r.rpush("hardnet", *["m"] * 7)
    r.rpush("other", "m")
    r.hset("unacked", mapping={"t1": "[]", "t2": "[]", "t3": "[]"})
    # a running job: 10 images in 3 chunks, one chunk done with 3 ok + 1 error
    store.create("live", model="hardnet68", dest=None, submitted_at=1000.0)
    store.seal("live", 10, 3)
    store.start_chunk("live", 0)
    store.complete_chunk("live", 0, 3, 1, codes={"decode_error": 1})
    # a failed job with a dead letter, finished long ago: counted in the dead letters, no series
    store.create("old", model="hardnet85", dest=None, submitted_at=900.0)
    store.seal("old", 4, 1)
    store.complete_dead("old", 0, 4, "gave up", 5)
    store.finish("old", "failed")
    r.hset(store.key("old"), "finished_at", 100.0)
    # a job still being listed (total unknown): no pending series yet
    store.create("listing", model="hardnet68", dest=None, submitted_at=1100.0)

    col = QueueCollector(make_store(redis_url), ["hardnet", "other"], keep_finished_s=600,
                         clock=lambda: 2000.0)
    got = _collect(col)

    def v(name, **labels):
        return got.get((name, tuple(sorted(labels.items()))))

    assert v("hardnet_exporter_redis_up") == 1
    assert v("hardnet_queue_messages", queue="hardnet") == 7 and v("hardnet_queue_messages", queue="other") == 1
    assert v("hardnet_queue_unacked_messages") == 3
    assert v("hardnet_dead_letter_chunks") == 1
    assert v("hardnet_jobs", state="running") == 1 and v("hardnet_jobs", state="failed") == 1
    assert v("hardnet_jobs", state="queued") == 1
    assert v("hardnet_job_images", job_id="live", state="ok") == 3
    assert v("hardnet_job_images", job_id="live", state="error") == 1
    assert v("hardnet_job_images", job_id="live", state="pending") == 6
    assert v("hardnet_job_chunks", job_id="live", state="done") == 1
    assert v("hardnet_job_chunks", job_id="live", state="pending") == 2
    assert v("hardnet_job_info", job_id="live", model="hardnet68", state="running") == 1
    assert v("hardnet_job_images", job_id="listing", state="ok") == 0
    assert v("hardnet_job_images", job_id="listing", state="pending") is None
    assert not [k for k in got if dict(k[1]).get("job_id") == "old"]

    # the same job finished a minute ago keeps its series (its last counts reach Prometheus)
    r.hset(store.key("old"), "finished_at", 1940.0)
    got = _collect(col)
    assert got[("hardnet_job_chunks", (("job_id", "old"), ("state", "dead")))] == 1
    assert got[("hardnet_job_images", (("job_id", "old"), ("state", "error")))] == 4

    # only the --jobs most recent jobs are read
    got = _collect(QueueCollector(make_store(redis_url), ["hardnet"], jobs=1, clock=lambda: 2000.0))
    assert {dict(k[1]).get("job_id") for k in got if k[0] == "hardnet_job_info"} == {"listing"}


def test_exporter_collector_without_redis_reports_it_down():
    from producer.exporter import QueueCollector, make_store

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]          # nothing listens there once closed
    got = _collect(QueueCollector(make_store(f"redis://127.0.0.1:{port}/0"), ["hardnet"]))
    assert got[("hardnet_exporter_redis_up", ())] == 0
    assert not [k for k in got if k[0] == "hardnet_queue_messages"]


def test_exporter_register_adds_the_command():
    from producer import exporter

    p = argparse.ArgumentParser()
    exporter.register(p.add_subparsers(dest="cmd"))
    a = p.parse_args(["exporter", "--port", "9999", "--queue", "a", "--queue", "b"])
    assert a.fn is exporter.cmd_exporter and a.port == 9999 and a.queue == ["a", "b"]
    assert p.parse_args(["exporter"]).port == exporter.DEFAULT_PORT
    with pytest.raises(ConfigError, match="--port 0"):
        exporter.cmd_exporter(p.parse_args(["exporter", "--port", "0"]))
    with pytest.raises(ConfigError, match="--jobs 0"):
        exporter.cmd_exporter(p.parse_args(["exporter", "--jobs", "0"]))


def test_exporter_is_torch_free():
    import subprocess
    import sys

    code = "import sys, producer.exporter; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60).returncode == 0


# -- docs and dashboard agree with the code --------------------------------------------------------
def test_every_metric_is_documented():
    text = (ROOT / "deploy" / "README.md").read_text()
    section = text[text.index("## Metrics"):]
    missing = [documented_name(f) for f in families() if f"`{documented_name(f)}" not in section]
    assert missing == []


def test_promql_names_lint():
    assert promql_metric_names(
        'sum by (code) (rate(hardnet_images_total{status="error", code!~"a|b"}[$__rate_interval]))'
    ) == {"hardnet_images_total"}
    assert promql_metric_names(
        "histogram_quantile(0.95, sum by (le, stage) (rate(hardnet_stage_seconds_bucket[5m]))) "
        "/ on (instance) group_left max(hardnet_x) + 2 * up offset 5m") == \
        {"hardnet_stage_seconds_bucket", "hardnet_x", "up"}
    # the check bites: a misspelt name is reported
    assert "hardnet_imagez_total" in promql_metric_names("rate(hardnet_imagez_total[5m])")
    assert "hardnet_imagez_total" not in exported_series()


def _dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())

    def walk(panels):
        for p in panels:
            yield p
            yield from walk(p.get("panels", []))

    return [(p["title"], t["expr"]) for p in walk(dash["panels"]) for t in p.get("targets", [])]


def test_dashboard_uses_only_exported_metrics():
    exported = exported_series()
    exprs = _dashboard_exprs()
    assert len(exprs) >= 15
    used = set()
    for title, expr in exprs:
        names = promql_metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        unknown = names - exported
        assert not unknown, f"panel {title!r} uses {unknown}, which the code does not export"
        used |= names
    # what the brief asks the dashboard to show is on it
    for name in ("hardnet_images_total", "hardnet_stage_seconds_bucket", "hardnet_batch_size_sum",
                 "hardnet_gpu_memory_allocated_bytes", "hardnet_gpu_utilization_ratio",
                 "hardnet_queue_messages", "hardnet_chunks_in_flight", "hardnet_job_images"):
        assert name in used, name


def test_dashboard_is_importable_grafana_json():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    (var,) = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    ids = set()
    for p in dash["panels"]:
        assert p["id"] not in ids
        ids.add(p["id"])
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${%s}" % var["name"]
            assert all(t["datasource"]["uid"] == "${%s}" % var["name"] for t in p["targets"])
            assert all(re.fullmatch(r"[A-Z]", t["refId"]) for t in p["targets"])
