"""The baseline a user would write without us: one Celery task per image (read the file, PIL
preprocessing as on the Hub page, batch 1, fp32, top-5). Used by benchmarks/bench_gpu.py only.

    HARDNET_BROKER_URL=redis://... NAIVE_MODEL=hardnet68 NAIVE_DEVICE=cuda \\
        celery -A benchmarks.naive_worker worker --pool=solo -Q naive   (from the repository root)

Each finished image increments the Redis counter ``naive:done``."""
from __future__ import annotations

import os

import redis
from celery import Celery

app = Celery("naive", broker=os.environ["HARDNET_BROKER_URL"])
app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True,
                worker_prefetch_multiplier=1, task_acks_late=True, task_default_queue="naive",
                worker_hijack_root_logger=False)

_state: dict = {}


def _model():
    if not _state:
        import torch

        from worker.model import load_model

        dev = torch.device(os.environ.get("NAIVE_DEVICE", "cuda"))
        net = load_model(os.environ.get("NAIVE_MODEL", "hardnet68"), "random", device=str(dev)).eval()
        # all or nothing: a failed load is raised again by the next task, not a KeyError
        _state.update(dev=dev, net=net, r=redis.Redis.from_url(os.environ["HARDNET_BROKER_URL"]))
    return _state


@app.task(name="naive.label")
def label(path: str) -> None:
    import torch

    from worker.image.reference import reference_preprocess

    s = _model()
    with open(path, "rb") as f:
        x = reference_preprocess(f.read()).unsqueeze(0).to(s["dev"])
    with torch.no_grad():
        probs = torch.softmax(s["net"](x), dim=1)
        probs.topk(5, dim=1).indices.tolist()
    s["r"].incr("naive:done")
