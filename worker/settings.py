"""Worker settings: one class, every field documented, read from HARDNET_* variables."""
from __future__ import annotations

from typing import Annotated, Literal

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
    s3_get_client: Literal["auto", "obstore", "boto3"] = Field(
        "auto", description="What GETs s3:// images: `obstore` (Rust object_store, about a third "
        "of boto3's client CPU per object), `boto3`, or `auto` (obstore when installed, else "
        "boto3). Listing and writes always use boto3.")

    def fetch_policy(self):
        from hnq.storage import FetchPolicy

        return FetchPolicy(
            max_bytes=self.max_image_bytes, timeout_s=self.fetch_timeout, allow_http=self.allow_http,
            http_allow_hosts=tuple(self.http_allow_hosts), allow_private_networks=self.allow_private_networks,
            file_roots=tuple(self.file_roots) if self.file_roots is not None else (),
            s3_client=self.s3_get_client)

    @field_validator("s3_get_client")
    @classmethod
    def _obstore_installed(cls, v):
        if v == "obstore":
            from hnq.storage.s3 import obstore_available

            if not obstore_available():
                raise ValueError("obstore is not installed (pip install 'obstore>=0.12,<0.13')")
        return v

    @field_validator("http_allow_hosts", "file_roots", mode="before")
    @classmethod
    def _split_commas(cls, v):
        if isinstance(v, str):
            return [x.strip() for x in v.split(",") if x.strip()]
        return v
