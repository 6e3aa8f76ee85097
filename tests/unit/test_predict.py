"""The Python API the worker and `hardnet classify` share, on the CPU with the deterministic weights."""
from __future__ import annotations

import pytest

from hnq.errors import ConfigError
from worker.engine.classifier import Classifier, describe_weights, resolve_device


@pytest.fixture(scope="module")
def clf():
    return Classifier("hardnet39ds", "random", device="cpu", batch_size=4)


def test_classify_keeps_order_and_one_record_per_input(clf, samples_dir):
    items = [(p.name, p.read_bytes()) for p in sorted(samples_dir.glob("*.*g"))]
    items.insert(2, ("broken.jpg", b"\xff\xd8\xff garbage"))
    items.append(("empty.png", b""))
    recs = clf.classify(items)
    assert [r.uri for r in recs] == [u for u, _ in items]
    by = {r.uri: r for r in recs}
    assert by["broken.jpg"].error.code == "decode_error" and by["empty.png"].error.code == "empty"
    ok = [r for r in recs if r.status == "ok"]
    assert len(ok) == 6
    for r in ok:
        scores = [t.score for t in r.top5]
        assert len(r.top5) == 5 and scores == sorted(scores, reverse=True)
        assert r.weights == "random" and r.model == "hardnet39ds"
    # the deterministic weights depend on the input: not every photo gets the same top-1
    assert len({r.top5[0].index for r in ok}) > 1


def test_batching_does_not_change_results(clf, samples_dir):
    blobs = [p.read_bytes() for p in sorted(samples_dir.glob("*.*g"))]
    batch, errors = clf.preprocess(blobs)
    assert errors == [None] * len(blobs) and batch.dtype.is_floating_point is False
    one_by_one = [clf.predict(batch[i:i + 1])[0] for i in range(len(blobs))]
    together = clf.predict(batch)  # batch_size 4: two forward passes
    for a, b in zip(one_by_one, together):
        assert [t.index for t in a] == [t.index for t in b]
        assert all(abs(x.score - y.score) < 1e-4 for x, y in zip(a, b))


def test_amp_check_compares_against_fp32(clf):
    bf16 = Classifier("hardnet39ds", "random", device="cpu", amp=True)
    rep = bf16.check_amp(n=4)
    assert set(rep) == {"top1_agreement", "top5_set_agreement", "max_prob_diff"}
    assert 0.0 <= rep["max_prob_diff"] < 0.5 and rep["top1_agreement"] >= 0.5
    fp32 = clf.check_amp(n=2)  # amp off: both passes are fp32, so they agree exactly
    assert fp32["top1_agreement"] == 1.0 and fp32["max_prob_diff"] < 1e-6


def test_device_and_weights_descriptions():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ConfigError):
        resolve_device("tpu")
    assert describe_weights(None) == "official" and describe_weights("random") == "random"
    assert describe_weights("file:///x/y/hardnet68-5d684880.pth") == "hardnet68-5d684880.pth"


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA device")
def test_cuda_fp16_channels_last_matches_cpu_fp32(samples_dir):
    """On CUDA the defaults are fp16 autocast + channels_last: same top-1 as the CPU fp32 reference."""
    gpu = Classifier("hardnet68", "random", device="cuda", batch_size=8)
    cpu = Classifier("hardnet68", "random", device="cpu", batch_size=8)
    assert gpu.amp and gpu.amp_check is not None and gpu.amp_check["top1_agreement"] >= 0.75
    items = [(p.name, p.read_bytes()) for p in sorted(samples_dir.glob("*.*g"))]
    for g, c in zip(gpu.classify(items), cpu.classify(items)):
        assert g.top5[0].index == c.top5[0].index
        assert abs(g.top5[0].score - c.top5[0].score) < 0.02


def test_schema_model_names_are_the_registry():
    from hnq.schema import MODELS
    from worker.model.hardnet import ARCHS
    from worker.model.weights import WEIGHTS

    assert list(MODELS) == list(ARCHS) == list(WEIGHTS)
