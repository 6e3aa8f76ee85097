"""Worker settings: one class, every field documented, read from HARDNET_* variables."""
from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from hnq.jobs.inputs import OutputPolicy
from hnq.models import DEFAULT_MODEL, MODELS
from hnq.settings import CommonSettings, ModelSetting
from hnq.storage import FetchPolicy
from hnq.storage.s3.get import obstore_available


class WorkerSettings(CommonSettings):
    model: ModelSetting = Field(DEFAULT_MODEL, description=f"HarDNet variant: {', '.join(MODELS)}.")
    weights: str | None = Field(
        None, description="Override of the official weights: a path, file://, http(s):// URL, or "
        "`random` (untrained; labels meaningless, for tests and demos). Unset = official download "
        "into the torch hub cache ($TORCH_HOME).")
    device: str = Field("auto", description="auto (cuda if available), cpu, cuda or cuda:N.")
    tune_malloc: bool = Field(
        True, description="Torch commands (worker, classify, demo) re-exec themselves with glibc "
        "malloc thresholds that keep the model's buffers in the process (and one arena on the CPU): "
        "1.3-1.6x more images/s on the CPU. `false` turns it off.")
    batch_size: int = Field(
        0, ge=0, le=4096, description="Images per forward pass; 0 = chosen from the device (256 on a "
        "GPU, 32 on the CPU).")
    chunks_in_flight: int = Field(
        4, ge=1, le=64, description="Chunks (Celery messages) one worker process always takes at "
        "once. They share one engine, whose batches mix their images. It takes more (small chunks) "
        "while they hold fewer than HARDNET_IMAGES_IN_FLIGHT images.")
    images_in_flight: int = Field(
        0, ge=0, le=1_000_000, description="A worker keeps taking chunks, beyond "
        "HARDNET_CHUNKS_IN_FLIGHT and up to HARDNET_MAX_CHUNKS_IN_FLIGHT, while the chunks it holds "
        "have fewer images than this (enough in flight to keep the device busy through the store's "
        "latency); 0 = 8 batches: 256 on the CPU, 2048 on a GPU.")
    max_chunks_in_flight: int = Field(
        32, ge=1, le=256, description="Most chunks one worker process holds at once: the threads "
        "pool's size (never below HARDNET_CHUNKS_IN_FLIGHT).")
    batch_wait_ms: float = Field(
        10.0, ge=0, le=10_000, description="How long a short batch may wait for more images while "
        "more are being fetched or decoded (never when nothing else is on its way).")
    compile: bool = Field(False, description="torch.compile the model for the fixed batch shape "
                                             "(short batches padded).")
    cuda_graphs: bool = Field(False, description="Replay the forward pass as a CUDA graph of the "
                                                 "fixed batch shape (CUDA only; short batches padded).")
    torchscript: Literal["auto", "on", "off"] = Field(
        "auto", description="Run the model traced to TorchScript: one call per batch that holds "
        "the GIL only at its ends, instead of hundreds of eager ops that each re-take it while the "
        "worker's fetch and decode threads want it too. `auto` = on the CPU (measured faster "
        "there), off on CUDA and with HARDNET_COMPILE or autocast.")
    amp: bool | None = Field(
        None, description="fp16 autocast + channels_last on CUDA. Unset = on for CUDA, off for CPU.")
    fetch_threads: int = Field(
        0, ge=0, le=1024, description="Most downloads in flight per worker; 0 = 256 on a GPU, 64 on "
        "the CPU. A worker starts 8 fetch threads and adds more, up to this, while every one of "
        "them is waiting on the store and decoding could take more.")
    decode_threads: int = Field(
        0, ge=0, le=256, description="Threads decoding and resizing images; 0 = the CPUs this "
        "process may use (affinity mask and cgroup quota).")
    torch_threads: int = Field(
        0, ge=0, le=1024, description="torch's intra-op threads in the worker process; 0 = 1 when "
        "the model is on a GPU (decoding already runs on one thread per CPU, and torch's default "
        "gave each of them a team of one thread per core: 0.84x the decode rate at that "
        "oversubscription, benchmarks/bench_decode_threads.py) unless OMP_NUM_THREADS is set, "
        "and torch's own count on the CPU (the forward pass uses them).")
    gc_threshold: int = Field(
        10_000, ge=0, le=10_000_000, description="Python's first cyclic-GC threshold (allocations "
        "between young collections) while an engine runs; 0 keeps Python's default (700). Every "
        "image leaves a record of a dozen objects alive until its chunk is written, and with the "
        "default the collector rescans them dozens of times each: 1.3-1.5x the engine's own "
        "images/s at 10,000 (benchmarks/bench_engine.py ceiling). The engine only raises it.")
    fetch_attempts: int = Field(
        4, ge=1, le=100, description="Fetches of one image, in all, when storage answers with "
        "transient errors (503/SlowDown, resets, timeouts) before the image gets its own error "
        "record (throttled, timeout, fetch_error).")
    fetch_deadline: float = Field(
        120.0, gt=0, description="Seconds from an image's first fetch after which no retry starts.")
    fetch_backoff_max: float = Field(
        8.0, gt=0, description="Longest wait (s) between two fetches of one image.")
    fast_jpeg: bool = Field(
        False, description="Decode large JPEGs at reduced DCT scale (≥2× the target size) before the "
        "exact resize: several times faster on big photos, within a few uint8 levels.")
    decode: Literal["cpu", "gpu", "auto"] = Field(
        "cpu", description="Where JPEGs are decoded: `cpu` (libjpeg-turbo/PIL in decode threads), "
        "`gpu` (batched nvJPEG on the worker's CUDA device for baseline 8-bit JPEGs, everything else "
        "still on the CPU; a configuration error without CUDA) or `auto` (gpu when the device is CUDA "
        "and nvJPEG works there, else cpu).")
    max_image_bytes: int = Field(50 * 2**20, ge=1, description="Download size cap per image.")
    bytes_in_flight: int = Field(
        0, ge=0, description="Encoded image bytes one worker process holds at once, across fetch "
        "and decode (a body counts from before it is read until it is decoded; its size is taken "
        "from Content-Length / the object's size before the body is read, an unannounced size "
        "counts as HARDNET_MAX_IMAGE_BYTES). Fetchers wait while it is spent; an object larger "
        "than the whole budget is still labelled, alone. A byte count, or with a unit: `64MiB`, "
        "`2GiB`, `500M`. 0 = a quarter of the memory the process may use (the smallest of its "
        "cgroup's memory limit, HARDNET_MAX_MEMORY_PER_CHILD_MB and physical RAM), at least 64 MiB.")
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
    shutdown_grace: float = Field(
        20.0, ge=0, le=3600, description="Seconds a worker asked to stop (SIGTERM: Kubernetes, "
        "docker stop, a spot notice drained by the Node Termination Handler) lets its running "
        "chunks finish. It takes no new chunk from the moment of the signal; when the grace ends, "
        "every chunk still running is handed back to the queue at once (its finished records "
        "kept, so the next worker labels only the rest) and the process exits. Keep it below the "
        "platform's kill: terminationGracePeriodSeconds / stop_grace_period minus "
        "worker.shutdown.EXIT_MARGIN_S (docs/reliability.md, Preemption). 0 = hand back at once.")
    max_memory_per_child_mb: int | None = Field(
        None, ge=64, description="After a chunk, a worker whose RSS exceeds this restarts itself "
        "(warm shutdown; `hardnet worker` re-executes it, a bare celery worker relies on its supervisor).")
    retry_backoff_max: int = Field(60, ge=1, description="Longest wait before a failed chunk is retried.")
    s3_get_client: Literal["auto", "obstore", "boto3"] = Field(
        "auto", description="What GETs s3:// images: `obstore` (Rust object_store, about a third "
        "of boto3's client CPU per object), `boto3`, or `auto` (obstore when installed, else "
        "boto3). Listing and writes always use boto3.")

    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="Port of the worker's Prometheus endpoint "
        "(http://0.0.0.0:PORT/metrics), started once per worker process when the worker starts. "
        "Unset = no metrics. A port that cannot be bound stops the worker at start-up with a message "
        "naming this variable.")

    @property
    def pool_size(self) -> int:
        """Threads of the Celery pool: the most chunks held at once."""
        return max(self.chunks_in_flight, self.max_chunks_in_flight)

    def retry_policy(self):
        from worker.engine.fetch import RetryPolicy  # worker.engine imports torch: not on `hardnet`'s path

        return RetryPolicy(attempts=self.fetch_attempts, deadline_s=self.fetch_deadline,
                           backoff_s=min(0.5, self.fetch_backoff_max), backoff_max_s=self.fetch_backoff_max)

    output_roots: Annotated[list[str] | None, NoDecode] = Field(
        None, description="Comma-separated directories that file:// destinations must lie in (symlinks "
        "resolved). Unset = workers refuse local destinations. The destination in a message is "
        "checked against this, never trusted.")
    output_buckets: Annotated[list[str] | None, NoDecode] = Field(
        None, description="Comma-separated S3 buckets that results may be written to. Unset = any "
        "bucket the worker's credentials can write.")
    source_buckets: Annotated[list[str] | None, NoDecode] = Field(
        None, description="Comma-separated S3 buckets that s3:// sources may be read from, and the "
        "only buckets whose objects `submit --tag` may tag. Any other s3:// URI gets a `forbidden` "
        "record and is not fetched (a refused tag: a tag_error). Unset = any bucket the worker's "
        "credentials can read. `hardnet report` fetches thumbnails under the same rule.")
    chunk_lease_s: int = Field(
        30, ge=2, description="Seconds a running chunk's lease lasts without renewal (renewed every "
        "third of it while the chunk runs; capped at the visibility timeout). Another delivery of "
        "a chunk whose lease is live waits instead of running it twice; the sweeper and `hardnet "
        "resume` treat a chunk as in flight while its lease is live.")
    sweep_interval: int = Field(
        120, ge=0, description="Seconds between the workers' sweeps for lost chunks (chunks of a live "
        "job neither queued, in flight nor done for longer than the visibility timeout are sent "
        "again; one worker sweeps at a time). 0 = off.")

    max_engines: int = Field(
        3, ge=1, le=32, description="Engines (one per model and weights that jobs ask for: "
        "`submit --model/--weights`) a worker process keeps loaded at once; when full, the least "
        "recently used idle one is closed for a new pair, and a chunk waits while all are in use.")
    job_weights_allow: Annotated[list[str] | None, NoDecode] = Field(
        None, description="Comma-separated directories and URL prefixes (`https://models.example/`) "
        "from which a job's `--weights` may load a checkpoint. `official`, `random` and this "
        "worker's own HARDNET_WEIGHTS are always allowed. Unset = no other checkpoint (such a "
        "job's chunks are dead-lettered with the reason).")
    tag_threads: int = Field(
        16, ge=1, le=256, description="Concurrent S3 tag writes (GetObjectTagging + "
        "PutObjectTagging) per chunk of a `submit --tag` job.")

    def output_policy(self):
        return OutputPolicy(roots=tuple(self.output_roots) if self.output_roots is not None else (),
                            buckets=tuple(self.output_buckets) if self.output_buckets is not None else None)

    def fetch_policy(self):
        return FetchPolicy(
            max_bytes=self.max_image_bytes, timeout_s=self.fetch_timeout, allow_http=self.allow_http,
            http_allow_hosts=tuple(self.http_allow_hosts), allow_private_networks=self.allow_private_networks,
            file_roots=tuple(self.file_roots) if self.file_roots is not None else (),
            s3_client=self.s3_get_client,
            source_buckets=tuple(self.source_buckets) if self.source_buckets is not None else None)

    @field_validator("s3_get_client")
    @classmethod
    def _obstore_installed(cls, v):
        if v == "obstore":
            if not obstore_available():
                raise ValueError("obstore is not installed (pip install 'obstore>=0.12,<0.13')")
        return v

    @field_validator("bytes_in_flight", mode="before")
    @classmethod
    def _byte_size(cls, v):
        """``64MiB``, ``1.5G``, ``1000000``: k/M/G/T are powers of 10, Ki/Mi/Gi/Ti of 2."""
        if not isinstance(v, str):
            return v
        m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$", v)
        unit = m.group(2).lower().removesuffix("b") if m else None
        scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10,
                 "mi": 2**20, "gi": 2**30, "ti": 2**40}.get(unit) if m else None
        if scale is None:
            raise ValueError(f"not a byte size: {v!r} (a number of bytes, optionally with a unit: "
                             "k, M, G, T, KiB, MiB, GiB, TiB)")
        return int(float(m.group(1)) * scale)

    @field_validator("decode", "torchscript", mode="before")
    @classmethod
    def _lower(cls, v):
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("http_allow_hosts", "file_roots", "output_roots", "output_buckets", "job_weights_allow",
                     "source_buckets", mode="before")
    @classmethod
    def _split_commas(cls, v):
        if isinstance(v, str):
            return [x.strip() for x in v.split(",") if x.strip()]
        return v
