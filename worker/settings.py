"""Worker settings: one class, every field documented, read from HARDNET_* variables."""
from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from hnq.settings import CommonSettings


class WorkerSettings(CommonSettings):
    model: str = Field("hardnet68", description="HarDNet variant: hardnet39ds, hardnet68ds, hardnet68, hardnet85.")
    weights: str | None = Field(
        None, description="Override of the official weights: a path, file://, http(s):// URL, or "
        "`random` (untrained; labels meaningless, for tests and demos). Unset = official download "
        "into the torch hub cache ($TORCH_HOME).")
    device: str = Field("auto", description="auto (cuda if available), cpu, cuda or cuda:N.")
    batch_size: int = Field(64, ge=1, le=4096, description="Images per forward pass.")
    amp: bool | None = Field(
        None, description="fp16 autocast + channels_last on CUDA. Unset = on for CUDA, off for CPU.")
    fetch_threads: int = Field(16, ge=1, le=256, description="Concurrent downloads per worker.")
    decode_threads: int = Field(
        0, ge=0, le=64, description="Threads decoding and resizing images; 0 = number of CPU cores.")
    fast_jpeg: bool = Field(
        False, description="Decode large JPEGs at reduced DCT scale (≥2× the target size) before the "
        "exact resize: several times faster on big photos, within a few uint8 levels.")
    max_image_bytes: int = Field(50 * 2**20, ge=1, description="Download size cap per image.")
    max_pixels: int = Field(
        89_478_485, ge=1, description="Cap on declared width×height (decompression bombs).")
    fetch_timeout: float = Field(30.0, gt=0, description="Seconds per network call.")
    allow_http: bool = Field(False, description="Allow http(s):// sources at all.")
    http_allow_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Hosts http(s):// sources may use (exact or *.domain), "
        "comma-separated. Empty = none.")
    allow_private_networks: bool = Field(
        False, description="Allow http(s):// to loopback, link-local and private addresses (SSRF guard).")
    file_roots: Annotated[list[str] | None, NoDecode] = Field(
        None, description="Comma-separated directories file:// sources may read (symlinks resolved). "
        "Unset = local files refused by workers.")
    max_memory_per_child_mb: int | None = Field(
        None, ge=64, description="After a chunk, a worker whose RSS exceeds this restarts itself "
        "(warm shutdown; `hardnet worker` re-executes it, a bare celery worker relies on its supervisor).")
    retry_backoff_max: int = Field(60, ge=1, description="Longest wait before a failed chunk is retried.")
    output_roots: Annotated[list[str] | None, NoDecode] = Field(
        None, description="Comma-separated directories that file:// destinations must lie in (symlinks "
        "resolved). Unset = workers refuse local destinations. The destination in a message is "
        "checked against this, never trusted.")
    output_buckets: Annotated[list[str] | None, NoDecode] = Field(
        None, description="Comma-separated S3 buckets that results may be written to. Unset = any "
        "bucket the worker's credentials can write.")
    sweep_interval: int = Field(
        120, ge=0, description="Seconds between the workers' sweeps for lost chunks (chunks of a live "
        "job neither queued, in flight nor done for longer than the visibility timeout are sent "
        "again; one worker sweeps at a time). 0 = off.")

    def output_policy(self):
        from hnq.inputs import OutputPolicy

        return OutputPolicy(roots=tuple(self.output_roots) if self.output_roots is not None else (),
                            buckets=tuple(self.output_buckets) if self.output_buckets is not None else None)

    def fetch_policy(self):
        from hnq.storage import FetchPolicy

        return FetchPolicy(
            max_bytes=self.max_image_bytes, timeout_s=self.fetch_timeout, allow_http=self.allow_http,
            http_allow_hosts=tuple(self.http_allow_hosts), allow_private_networks=self.allow_private_networks,
            file_roots=tuple(self.file_roots) if self.file_roots is not None else ())

    @field_validator("http_allow_hosts", "file_roots", "output_roots", "output_buckets", mode="before")
    @classmethod
    def _split_commas(cls, v):
        if isinstance(v, str):
            return [x.strip() for x in v.split(",") if x.strip()]
        return v
