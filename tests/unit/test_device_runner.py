"""The device runner's pipelined bookkeeping (two buffers, streams, buckets, mixed host/device
batches, release on error, CUDA-graph replay) on the CPU: the runner's CUDA calls go through an
injected stand-in (:class:`FakeOps`) whose streams are no-ops, whose events record nothing and whose
"device" tensors (:class:`DevTensor`, CPU tensors underneath) refuse to be stacked or concatenated
with host tensors, as CUDA tensors do. The model is a small seeded conv net (the bookkeeping does
not depend on the model, and hardnet39ds takes seconds a batch on this machine's 2 shared cores)
and, for the padding, the real hardnet39ds (random weights); every result is compared with a
synchronous runner on exactly the same images, unpadded.
What only a GPU can show (speed, cuDNN, real streams, real graphs) is in the CUDA tests of
tests/unit/test_engine.py and scripts/gpu_check.sh."""
from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from cluster import image_bytes
from hnq.errors import ConfigError
from worker.engine import DeviceRunner, Engine, EngineConfig, RetryPolicy
from worker.engine import device as device_mod
from worker.engine.classifier import Classifier
from worker.engine.device import BUCKET, CudaOps, bucket_sizes


class DevTensor(torch.Tensor):
    """A CPU tensor standing for one on the device. Like a CUDA tensor, it cannot be stacked or
    concatenated with host tensors (inputs and ``out``): the error a mixed batch hits on a GPU."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.stack, torch.cat):
            tensors = list(args[0] if args else kwargs["tensors"])
            if kwargs.get("out") is not None:
                tensors.append(kwargs["out"])
            if len({isinstance(t, DevTensor) for t in tensors}) > 1:
                raise RuntimeError("Expected all tensors to be on the same device (fake device)")
        return super().__torch_function__(func, types, args, kwargs)


def on_device(t: torch.Tensor) -> DevTensor:
    return t.clone().as_subclass(DevTensor)


def ptr(t: torch.Tensor) -> int:
    """Which memory a tensor lives in (record_stream works per allocation, views share it)."""
    return t.untyped_storage().data_ptr()


class FakeStream:
    def wait_stream(self, other) -> None:
        pass

    def synchronize(self) -> None:
        pass


class FakeEvent:
    def __init__(self, ops: "FakeOps"):
        self.ops = ops

    def record(self) -> None:
        pass

    def synchronize(self) -> None:
        if self.ops.fail_event_sync:
            self.ops.fail_event_sync = False
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")

    def elapsed_time(self, other) -> float:
        return 0.0


class FakeOps:
    """CudaOps' methods on the CPU; counts what the runner asked for."""

    def __init__(self):
        self.recorded: list[tuple[torch.Tensor, object]] = []
        self.syncs = 0
        self.tuned = False
        self.captures = 0
        self.fail_event_sync = False

    def stream(self):
        return FakeStream()

    def use(self, stream):
        return nullcontext()

    def current_stream(self):
        return FakeStream()

    def event(self):
        return FakeEvent(self)

    def pinned(self, shape, dtype):
        return torch.empty(shape, dtype=dtype)

    def empty(self, shape, dtype):
        return torch.empty(shape, dtype=dtype).as_subclass(DevTensor)

    def on_device(self, t):
        return isinstance(t, DevTensor)

    def record_stream(self, t, stream):
        self.recorded.append((t, stream))

    def synchronize(self):
        self.syncs += 1

    def tune(self):
        self.tuned = True

    def capture(self, fn):
        self.captures += 1
        out = fn()

        def replay():
            for static, new in zip(out, fn()):
                static.copy_(new)
        return replay, out


class Shapes(torch.nn.Module):
    """The model, noting the batch size of every forward; fails while ``fail`` is set."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.seen: list[int] = []
        self.fail = False

    def forward(self, x):
        if self.fail:
            raise RuntimeError("CUDA out of memory (injected)")
        self.seen.append(x.shape[0])
        return self.net(x)


def small_net() -> torch.nn.Module:
    """A seeded conv net with batch norm (eval), 100 classes: milliseconds a batch."""
    g = torch.Generator().manual_seed(18)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 8, stride=8), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 100))
    with torch.no_grad():
        for t in list(net.parameters()) + [net[1].running_mean]:
            t.copy_(torch.randn(t.shape, generator=g))
        net[1].running_var.copy_(torch.rand(8, generator=g) + 0.5)
    return net.eval()


@pytest.fixture(scope="module")
def clf():
    """The CPU Classifier: decoding, records, and hardnet39ds for the padding test."""
    return Classifier("hardnet39ds", "random", device="cpu", batch_size=16)


@pytest.fixture(scope="module")
def net():
    return small_net()


@pytest.fixture(scope="module")
def images(clf, samples_dir):
    """16 distinct decoded images (the samples, their mirror images, a few generated ones)."""
    imgs = [clf.decode(p.read_bytes()) for p in sorted(samples_dir.glob("*.*g"))]
    imgs += [t.flip(-1) for t in imgs]
    imgs += [clf.decode(image_bytes(i, size=(320, 240))) for i in range(16 - len(imgs))]
    return imgs


def unpadded(net, images: list[torch.Tensor], k: int = 20) -> tuple[list, list]:
    """Per image: (scores, indices) of a synchronous runner on the unpadded batch."""
    return DeviceRunner(net, torch.device("cpu"), len(images), amp=False, k=k,
                        pipelined=False).run(torch.stack(images))


@pytest.fixture(scope="module")
def reference(net, images):
    return unpadded(net, images)


def runner(net, ops, *, batch=16, bucket=None, k=20, **kw) -> DeviceRunner:
    r = DeviceRunner(Shapes(net), torch.device("cpu"), batch, amp=False, k=k, ops=ops,
                     bucket=bucket, **kw)
    assert r.pipelined
    return r


def assert_same(got, reference, which: list[int]) -> None:
    """The runner's (scores, indices) for images ``which`` equal the unpadded reference's: the
    same indices, the same scores to float32 rounding."""
    scores, idx, ms = got
    assert ms == 0.0 and len(idx) == len(which)
    assert idx == [reference[1][i] for i in which]
    worst = max(abs(a - b) for i, row in zip(which, scores) for a, b in zip(row, reference[0][i]))
    assert worst < 1e-6, worst


# ----------------------------------------------------------------------------------- the stand-in
def test_the_fake_device_refuses_mixed_stacks_as_cuda_does():
    host, dev = torch.zeros(3, 2, 2), on_device(torch.zeros(3, 2, 2))
    with pytest.raises(RuntimeError, match="same device"):
        torch.stack([dev, host])
    with pytest.raises(RuntimeError, match="same device"):
        torch.stack([host, host], out=on_device(torch.empty(2, 3, 2, 2)))
    assert isinstance(torch.stack([dev, dev]), DevTensor)


def test_the_stand_in_has_every_device_call_of_cuda_ops():
    calls = {n for n in vars(CudaOps) if not n.startswith("_")}
    assert calls <= {n for n in dir(FakeOps) if not n.startswith("_")}, calls


# ----------------------------------------------------------------------------------- errors
def test_a_failed_launch_releases_its_buffer(net, images, reference):
    ops = FakeOps()
    r = runner(net, ops)
    p1 = r.launch(images[:16])                   # in flight in buffer 0
    r.net.fail = True
    with pytest.raises(RuntimeError, match="injected"):
        r.launch(images[:3])                     # fails in the forward, after its copy was queued
    r.net.fail = False
    assert ops.syncs == 1                        # waited for what it had queued, then released
    with pytest.raises(RuntimeError, match="stack expects each tensor to be equal size"):
        r.launch([images[0], images[1][:, :100]])   # fails stacking, before anything is queued
    assert ops.syncs == 2
    # the buffer is free again: batch 1 is still in flight, and the next launch has a buffer
    p2 = r.launch(images[:3])
    assert_same(r.finish(p1), reference, list(range(16)))
    assert_same(r.finish(p2), reference, [0, 1, 2])
    # and the two-in-flight rhythm goes on as before
    prev = r.launch(images[4:9])
    for n in (16, 1, 7, 12):
        p = r.launch(images[:n])
        r.finish(prev)
        prev = p
    assert_same(r.finish(prev), reference, list(range(12)))


def test_a_failed_finish_releases_its_buffer(net, images, reference):
    ops = FakeOps()
    r = runner(net, ops)
    p1 = r.launch(images[:5])
    p2 = r.launch(images[5:9])
    ops.fail_event_sync = True
    with pytest.raises(RuntimeError, match="illegal memory access"):
        r.finish(p1)
    p3 = r.launch(images[9:16])                  # buffer 0 again, free
    assert_same(r.finish(p2), reference, [5, 6, 7, 8])
    assert_same(r.finish(p3), reference, list(range(9, 16)))


def test_both_buffers_in_flight_is_still_refused(net, images):
    r = runner(net, FakeOps())
    r.launch(images[:2])
    r.launch(images[:2])
    with pytest.raises(RuntimeError, match="both buffers in flight"):
        r.launch(images[:2])


# ----------------------------------------------------------------------------------- mixed batches
def test_a_batch_mixing_host_and_device_images(net, images, reference):
    """GPU decoding gives rows of one device buffer; its CPU fallbacks come as host tensors."""
    ops = FakeOps()
    r = runner(net, ops)
    decoded = on_device(torch.stack(images))     # what GpuDecoder.decode_batch returns rows of
    mixed = [decoded[i] if i % 3 else images[i] for i in range(16)]
    assert_same(r.finish(r.launch(mixed)), reference, list(range(16)))
    # record_stream once, on the runner's stream, for the one buffer the device rows come from
    assert [(ptr(t), s is r.stream) for t, s in ops.recorded] == [(ptr(decoded), True)]
    # every image on the device, separate tensors: each recorded; a host-only batch: none
    ops.recorded.clear()
    alone = [on_device(t) for t in images[:6]]
    assert_same(r.finish(r.launch(alone)), reference, list(range(6)))
    assert [ptr(t) for t, _ in ops.recorded] == [ptr(t) for t in alone]
    ops.recorded.clear()
    assert_same(r.finish(r.launch(images[6:11])), reference, list(range(6, 11)))
    assert ops.recorded == []
    # one device image among host ones, and the other way round, with another batch in flight
    p1 = r.launch([images[0], decoded[1], images[2]])
    p2 = r.launch([decoded[13], decoded[14], images[15], decoded[12]])
    assert_same(r.finish(p1), reference, [0, 1, 2])
    assert_same(r.finish(p2), reference, [13, 14, 15, 12])


def test_the_engine_labels_a_gpu_decoded_stream_with_cpu_fallbacks(clf, net):
    """The real engine with the batched-decode wiring: the batched decoder's images come back
    as rows of one "device" buffer, PNGs take the CPU threads, batches mix both."""
    from hnq.storage import Fetched

    blobs = {f"mem://img/{i}": image_bytes(i, "PNG" if i % 3 == 0 else "JPEG", size=(96, 80))
             for i in range(40)}
    _, want = unpadded(net, [clf.decode(b) for b in blobs.values()], k=5)
    ops = FakeOps()
    r = DeviceRunner(net, torch.device("cpu"), 16, amp=False, ops=ops, bucket=8)

    def batch_decode(bs):
        return list(on_device(torch.stack([clf.decode(b) for b in bs])))

    cfg = EngineConfig(batch_size=16, fetch_threads=4, decode_threads=2, batch_wait_s=0.05,
                       retry=RetryPolicy(attempts=1), batch_decode=batch_decode,
                       gpu_eligible=lambda b: b[:2] == b"\xff\xd8")
    eng = Engine(fetch=lambda u: Fetched(data=blobs[u], etag="e", size=len(blobs[u])),
                 decode=clf.decode, runner=r, record=clf.record, cfg=cfg)
    try:
        recs = eng.submit(list(blobs), name="gpu").result(120)
    finally:
        eng.close()
    assert [x.uri for x in recs] == list(blobs)
    assert all(x.status == "ok" for x in recs), [x.error for x in recs if x.status != "ok"]
    assert [[t.index for t in x.top5] for x in recs] == want
    assert ops.recorded                          # device images were consumed on the runner's stream


# ----------------------------------------------------------------------------------- buckets
def test_bucket_sizes():
    assert bucket_sizes(256, BUCKET) == [64, 128, 192, 256]
    assert bucket_sizes(100, 64) == [64, 100]
    assert bucket_sizes(32, 64) == [32]
    assert bucket_sizes(3, 0) == [1, 2, 3]


def test_defaults_bucket_eager_batches_and_pad_fixed_shapes(net):
    ops = FakeOps()
    eager = runner(net, ops, batch=256)
    assert ops.tuned and eager.bucket == BUCKET and not eager.pad
    assert [eager.rows(n) for n in (1, 64, 65, 200, 256)] == [64, 64, 128, 256, 256]
    graphs = runner(net, FakeOps(), batch=8, cuda_graphs=True)
    assert graphs.pad and graphs.bucket == 0 and graphs.rows(3) == 8
    sync = DeviceRunner(net, torch.device("cpu"), 8, amp=False)   # the CPU worker's runner
    assert not sync.pipelined and sync.rows(3) == 3


@pytest.mark.parametrize("batch, expected", [(16, [4, 8, 12, 16]), (10, [4, 8, 10])])
def test_warm_up_runs_every_bucket(net, batch, expected):
    r = runner(net, FakeOps(), batch=batch, bucket=4)
    r.warm_up()
    assert r.net.seen == expected


@pytest.mark.parametrize("model, sizes", [
    ("small", (16, 3, 9, 1, 12, 5, 2, 15, 4, 13, 6, 11, 7, 10, 8, 14)),
    ("hardnet39ds", (16, 3, 9, 1, 6)),           # seconds a batch here: a few sizes
])
def test_bucketed_batches_give_the_unpadded_results(model, sizes, clf, net, images, reference):
    """A batch of n runs as the next multiple of 4 (the padding rows hold whatever the buffer
    held before: an earlier, larger batch's images) and its n images get the top-k of the
    unpadded batch."""
    if model == "hardnet39ds":
        net, reference = clf.net, unpadded(clf.net, images)
    r = runner(net, FakeOps(), bucket=4)
    for n in sizes:
        which = [(i * 7 + n) % 16 for i in range(n)]
        assert_same(r.finish(r.launch([images[i] for i in which])), reference, which)
        assert r.net.seen[-1] == -(-n // 4) * 4
    assert sorted(set(r.net.seen)) == [4, 8, 12, 16]


def test_cuda_graph_replay_pads_to_the_batch(net, images, reference):
    ops = FakeOps()
    r = runner(net, ops, batch=8, cuda_graphs=True)
    assert ops.captures == 1 and ops.syncs == 1
    for n in (8, 3, 1):
        p = r.launch(images[8 - n:8])
        assert_same(r.finish(p), reference, list(range(8 - n, 8)))
    assert set(r.net.seen) == {8}


# ----------------------------------------------------------------------------------- compile + graphs
def test_compile_with_cuda_graphs_is_refused_where_torch_asserts_off_the_main_thread(net, monkeypatch):
    monkeypatch.setattr(device_mod, "compiled_graphs_off_main_thread", lambda: False)
    with pytest.raises(ConfigError) as e:
        runner(net, FakeOps(), batch=8, compile=True, cuda_graphs=True)
    assert "HARDNET_COMPILE" in str(e.value) and "HARDNET_CUDA_GRAPHS" in str(e.value)
    assert "123177" in str(e.value)


def test_the_compiled_graphs_feature_test_on_the_installed_torch():
    """2.11 (the device's) lacks the fix of pytorch#123177, 2.14.1 (ours) has it (this file was run
    with both)."""
    from torch.torch_version import TorchVersion

    v = TorchVersion(torch.__version__)
    got = device_mod.compiled_graphs_off_main_thread()
    print(f"\ntorch {v}: compiled CUDA graphs off the main thread: {got}")
    if v < "2.12":
        assert got is False
    elif v >= "2.14":
        assert got is True
