"""Per-job output options, chosen at `hardnet submit` and carried to the workers in every chunk
message: the output format, how many labels each record keeps, the checkpoint to label with, and
whether labels are written back to the source objects as S3 tags.

Where they live:
  the chunk message   ``ChunkTask.options`` (absent for a job with the defaults; see below)
  the job's state     ``hnq:job:ID`` field ``options`` (JSON), for re-sends (sweep, redrive, resume)
  the destination     ``DEST/JOB_ID/job.json`` key ``options``, for `hardnet resume` after Redis lost it
  the manifest        ``format``, ``top_k``, ``tag``, ``weights_requested``

**Compatibility.** A job with the default options (jsonl, top 5, the worker's weights, no tags)
sends exactly the version-2 message it always did, so workers of any version label it. A job with
any other option sends a version-3 message with an ``options`` object: a worker older than this
change refuses it (its schema allows only ``v: 2`` and no unknown field) and logs "rejected a
malformed chunk message" with the reason; the chunk is then neither done nor in flight, and the
sweeper re-sends it after the visibility timeout, until a current worker takes it. Old workers are
never allowed to *ignore* an option: writing JSON Lines for a Parquet job, or the official weights
for a job that named its own checkpoint, would be silently wrong output. A current worker refuses a
message of a later version (``v`` > 3) the same way.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hnq.errors import ConfigError
from hnq.models import WEIGHTS_WORDS, weights_key

#: output formats of the part files
FORMATS = ("jsonl", "parquet")
Format = Literal["jsonl", "parquet"]

#: labels per record: the default, and the bounds `--top-k` accepts. The device computes the top
#: ``TOP_K_MAX`` of every batch once; each chunk keeps its own ``top_k`` of them.
TOP_K_DEFAULT = 5
TOP_K_MIN = 1
TOP_K_MAX = 20


def normalize_weights(value: str | None) -> str | None:
    """None (the worker's own setting), 'official', 'random', an absolute path, or a
    file:// / http(s):// URL. ConfigError for anything a worker elsewhere could not load
    (a relative path means nothing on another machine). The spellings of 'official' and
    'random' are hnq.models.weights_key's (the one rule); this adds what a *job* may name."""
    if value is None:
        return None
    v = str(value).strip()
    if not v:
        raise ConfigError("--weights is empty: give official, random, an absolute path or a URL")
    if (key := weights_key(v)) in WEIGHTS_WORDS:
        return key
    if "\x00" in v or len(v) > 2048:
        raise ConfigError("--weights: not a path or URL (NUL byte or over 2048 characters)")
    low = v.lower()
    if low.startswith(("http://", "https://")):
        return v
    if low.startswith("file://"):
        if not low.startswith("file:///"):
            raise ConfigError(f"--weights {v!r}: a file:// URL must be file:///ABSOLUTE/PATH")
        return v
    if "://" in v:
        raise ConfigError(f"--weights {v!r}: unsupported scheme; give official, random, an absolute "
                          "path, file:///PATH or an http(s):// URL the workers can reach")
    if not v.startswith("/"):
        raise ConfigError(f"--weights {v!r}: give an absolute path (the workers load it on their own "
                          "machines, where a relative path means nothing), a file:// or http(s):// URL, "
                          "official or random")
    return v


class JobOptions(BaseModel):
    """What a job asks of the workers beyond its model and destination."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Format = Field("jsonl", description="part files: jsonl (part-NNNNN.jsonl) or parquet "
                           "(part-NNNNN.parquet, schema in docs/output.md)")
    top_k: int = Field(TOP_K_DEFAULT, ge=TOP_K_MIN, le=TOP_K_MAX,
                       description="labels per record (records carry `top5` when 5, else `topk`)")
    weights: str | None = Field(None, max_length=2048, description="checkpoint to label with: "
                                "'official', 'random', an absolute path or a file:// / http(s):// URL "
                                "the workers can load; None = each worker's HARDNET_WEIGHTS")
    tag: bool = Field(False, description="write the top-1 label and score back to each S3 source "
                      "object as object tags (hardnet:label, hardnet:score, hardnet:model)")

    @field_validator("weights")
    @classmethod
    def _weights(cls, v):
        try:
            return normalize_weights(v)
        except ConfigError as e:
            raise ValueError(str(e)) from None

    def is_default(self) -> bool:
        return self == DEFAULT_OPTIONS

    def for_message(self) -> "JobOptions | None":
        """None for the defaults (the message stays version 2), else self."""
        return None if self.is_default() else self

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str | None) -> "JobOptions":
        """The options stored with a job ('' / None: the defaults, as for jobs from before)."""
        if not text:
            return DEFAULT_OPTIONS
        return cls.model_validate_json(text)

    @classmethod
    def from_dict(cls, d: dict | None) -> "JobOptions":
        return cls.model_validate(d) if d else DEFAULT_OPTIONS


DEFAULT_OPTIONS = JobOptions()


def part_name(chunk: int, fmt: str = "jsonl") -> str:
    """The file name of a chunk's part: part-NNNNN.jsonl or part-NNNNN.parquet."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r}")
    return f"part-{chunk:05d}.{fmt}"


def part_relpath(job_id: str, chunk: int, fmt: str = "jsonl") -> str:
    return f"{job_id}/{part_name(chunk, fmt)}"
