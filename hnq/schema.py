"""Pydantic models for everything that crosses a process boundary: the Celery task message, the
result record (one per input image), the job summary and the manifest. JSON only."""
from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hnq.errors import ErrorCode
from hnq.logs import redact, redact_uri
from hnq.models import MODELS
from hnq.options import DEFAULT_OPTIONS, JobOptions

#: A chunk's model: one of the registry's variants (``MODELS`` is hnq.models.MODELS; the CLI reads
#: its ``--model`` choices from here).
ModelName = Literal[MODELS]

#: Bumped when a message or record changes incompatibly; workers refuse messages of another version.
SCHEMA_VERSION = 2   # 2: the claim check (URIs stored with the job, not in the message)
#: 3: the message carries the job's options (hnq.options); sent only for jobs with non-default
#: options, so a default job stays readable by version-2 workers.
SCHEMA_VERSION_OPTIONS = 3


class Label(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int = Field(description="ImageNet class index, 0..999")
    label: str = Field(description="human-readable ImageNet class name")
    score: float = Field(description="softmax probability")


class RecordError(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: ErrorCode
    message: str

    @field_validator("message")
    @classmethod
    def _no_credentials(cls, v: str) -> str:
        return redact(v)


class ResultRecord(BaseModel):
    """One line of output per input URI: a top-k label list or an explained error. The labels are
    in ``top5`` for a job of the default top 5, in ``topk`` for a job that asked another k
    (`submit --top-k`); a record has at most one of them."""

    model_config = ConfigDict(extra="forbid", use_enum_values=True)
    uri: str
    status: Literal["ok", "error"]
    top5: list[Label] | None = None
    topk: list[Label] | None = Field(None, description="the labels when the job's top_k is not 5")
    error: RecordError | None = None
    tag_error: RecordError | None = Field(
        None, description="`submit --tag`: why the labels could not be written to the object's S3 "
        "tags (the labels themselves stand: status stays ok)")
    model: str
    weights: str | None = Field(
        None, description="'official', 'random' (labels meaningless) or the checkpoint's file name")
    job_id: str | None = None
    etag: str | None = Field(None, description="source object's ETag where the store gives one")
    size: int | None = Field(None, description="source object's size in bytes where known")

    @field_validator("uri")
    @classmethod
    def _no_credentials(cls, v: str) -> str:
        # Results are shared more widely than credentials: a presigned URL keeps its path, not its
        # signature; a user:password@ keeps the user. Nothing else changes: the URI is the object's
        # exact name (an S3 key or a file path with "token=" in it is a name, not a credential), so
        # that --tag, --skip-labelled and readers find the object it names.
        return redact_uri(v)

    @classmethod
    def failure(cls, uri: str, code: ErrorCode | str, message: str, model: str, **kw) -> "ResultRecord":
        return cls(uri=uri, status="error", error=RecordError(code=ErrorCode(code), message=message),
                   model=model, **kw)

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True)

    @property
    def labels(self) -> list[Label] | None:
        """The top-k labels, whichever field holds them."""
        return self.topk if self.topk is not None else self.top5


class ChunkTask(BaseModel):
    """The body of one Celery task: a claim check for one chunk of a job. The URIs themselves are
    stored with the job (:mod:`hnq.jobs.inputs`); ``count`` and ``digest`` let the worker verify them."""

    model_config = ConfigDict(extra="forbid")
    v: Literal[2, 3] = SCHEMA_VERSION
    job_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    chunk: int = Field(ge=0, description="chunk index within the job; names the output part")
    count: int = Field(ge=1, description="URIs in the chunk")
    digest: str = Field(pattern=r"^[0-9a-f]{8,64}$", description="hnq.jobs.inputs digest of the URI list")
    model: ModelName
    dest: str | None = Field(None, description="s3://… or file://… output prefix; None = Redis results")
    options: JobOptions | None = Field(
        None, description="the job's options (format, top_k, weights, tag); absent = the defaults. "
        "Present only with v=3")

    @model_validator(mode="before")
    @classmethod
    def _version_for_options(cls, data):
        # Built in code with options and no version: it is a version-3 message.
        if isinstance(data, dict) and data.get("options") is not None and "v" not in data:
            data = {**data, "v": SCHEMA_VERSION_OPTIONS}
        return data

    @model_validator(mode="after")
    def _options_need_v3(self):
        if self.options is not None and self.v < SCHEMA_VERSION_OPTIONS:
            raise ValueError("a message with options must have v=3")
        return self

    @property
    def opts(self) -> JobOptions:
        """The job's options (the defaults when the message has none)."""
        return self.options or DEFAULT_OPTIONS


#: done: every image labelled; done_with_errors: some images have error records; failed: chunks
#: dead-lettered or the output could not be written; cancelled; lost: Redis no longer knows the job;
#: abandoned: its submit died while listing (ended until `hardnet resume` seals it: hnq.jobs.liveness).
JobStateName = Literal["queued", "running", "done", "done_with_errors", "failed", "cancelled", "lost",
                       "abandoned"]
FINAL_STATES = ("done", "done_with_errors", "failed", "cancelled", "abandoned")


class JobInfo(BaseModel):
    """What `hardnet status JOB --json` prints."""

    job_id: str
    state: JobStateName
    model: str | None = None
    dest: str | None = None
    total: int | None = Field(None, description="URIs submitted (None while still listing)")
    chunks: int | None = None
    chunks_done: int = 0
    succeeded: int = 0
    failed: int = 0
    dead_chunks: int = 0
    skipped: int = Field(0, description="objects not fetched: labelled by an earlier job (--skip-labelled)")
    skipped_by_extension: int = Field(0, description="files and keys the listing left out by their "
                                      "extension (--extensions)")
    skipped_extensions: dict[str, int] = Field(default_factory=dict, description="the extensions "
                                               "most skipped -> count ('(none)': no extension)")
    submitted_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    rate: float | None = Field(None, description="images per second since the first chunk started")
    eta_s: float | None = None
    error: str | None = Field(None, description="why the job failed, when it was not its chunks")
    error_codes: dict[str, int] = Field(default_factory=dict, description="error records per code")
    options: dict | None = Field(None, description="the job's non-default options (format, top_k, "
                                 "weights, tag), as submitted")
    priority: Literal["high", "normal", "low"] = Field(
        "normal", description="its share of the fleet (`submit --priority`; docs/operations.md)")


class DeadChunk(BaseModel):
    chunk: int
    count: int
    attempts: int
    error: str


class Reused(BaseModel):
    """Records of an earlier job that a --skip-labelled job relies on instead of labelling again."""

    job: str = Field(description="the job whose parts hold the records")
    records: int = Field(description="objects skipped because that job labelled them")
    parts: list[str] = Field(description="its parts that hold them (DEST/JOB/PART)")


class Manifest(BaseModel):
    """DEST/JOB_ID/manifest.json, written last (after every part, before the job's final state),
    atomically, by whoever finishes the job. ``parts`` lists only parts that exist."""

    job_id: str
    model: str
    weights: list[str] = Field(default_factory=list, description="weights the records were made with")
    weights_sha256: dict[str, str] = Field(
        default_factory=dict, description="weights -> sha256 of the checkpoint file (for 'random': of the "
        "tensors), as the workers loaded them")
    state: JobStateName
    total: int
    succeeded: int
    failed: int
    error_codes: dict[str, int] = Field(default_factory=dict)
    skipped: int = Field(0, description="objects not in total: labelled by an earlier job (--skip-labelled)")
    reused: list[Reused] = Field(default_factory=list, description="where the skipped objects' records are")
    skipped_by_extension: int = Field(0, description="files and keys the listing left out by their "
                                      "extension (--extensions); not in total")
    skipped_extensions: dict[str, int] = Field(default_factory=dict, description="the extensions "
                                               "most skipped -> count ('(none)': no extension)")
    parts: list[str]
    missing_parts: list[int] = Field(default_factory=list, description="chunks without a part")
    dead_chunks: list[DeadChunk] = Field(default_factory=list)
    sources: list[str] = Field(default_factory=list)
    error: str | None = None
    format: str = Field("jsonl", description="format of the parts: jsonl or parquet")
    top_k: int = Field(5, description="labels per record (`top5` when 5, else `topk`)")
    tag: bool = Field(False, description="labels were written back as S3 object tags (`--tag`)")
    tag_errors: int = Field(0, description="records whose S3 tags could not be written")
    weights_requested: str | None = Field(
        None, description="the job's `--weights` (None: each worker's own HARDNET_WEIGHTS)")
    submitted_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    created_at: datetime
