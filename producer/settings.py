"""Producer settings: one class, every field documented, read from HARDNET_* variables."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field

from hnq.settings import CommonSettings


class ProducerSettings(CommonSettings):
    model: str = Field("hardnet68", description="Default model for `hardnet submit` (--model overrides).")
    chunk_size: int = Field(
        256, ge=1, le=10_000,
        description="URIs per Celery task. Larger chunks = bigger batches and fewer messages; "
        "smaller = finer load balancing and less work redone after a crash.")
    state_dir: Path = Field(
        Path.home() / ".local" / "state" / "hardnet",
        description="Where the producer remembers the jobs it submitted, so that `hardnet status` can "
        "tell a job whose state Redis lost from a job id that never existed.")
    poll_interval: float = Field(1.0, gt=0, description="Seconds between progress polls of --wait.")
