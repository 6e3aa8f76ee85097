"""The Celery app of the workers (thin: configuration only; the work is in worker.tasks).

    celery -A worker.app worker --pool=solo --concurrency=1 -Q hardnet      # one per GPU
    hardnet worker                                                          # the same, wrapped
"""
from __future__ import annotations

from celery import Celery

from hnq.settings import celery_config, lean_messages
from worker import transport
from worker.settings import WorkerSettings

transport.install()

settings = WorkerSettings()
app = Celery("hardnet", include=["worker.tasks", "worker.sweeper"])
app.conf.update(celery_config(settings))
lean_messages(app)  # retries re-send the message: keep it small
