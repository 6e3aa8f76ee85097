"""`hardnet submit`'s per-job output options (hnq.options): their arguments, and the checks made
before anything is enqueued, so that a bad combination is exit 2 with a reason, not a job of
dead-lettered chunks."""
from __future__ import annotations

import argparse
import sys
from typing import Iterable, Iterator

from hnq.errors import ConfigError
from hnq.jobs.parts import parquet_available
from hnq.options import FORMATS, TOP_K_DEFAULT, TOP_K_MAX, TOP_K_MIN, JobOptions, normalize_weights
from producer.args import int_range


def add_arguments(s: argparse.ArgumentParser) -> None:
    """The options of `hardnet submit` that become the job's JobOptions."""
    s.add_argument("--format", choices=FORMATS, default="jsonl",
                   help="part files: jsonl (DEST/JOB/part-NNNNN.jsonl) or parquet (part-NNNNN.parquet; "
                   "needs --out, and pyarrow on the workers; schema: docs/output.md)")
    s.add_argument("--top-k", type=int_range("--top-k", TOP_K_MIN, TOP_K_MAX), default=TOP_K_DEFAULT, metavar="N",
                   help=f"labels per record, {TOP_K_MIN}..{TOP_K_MAX}; records carry them as `top5` "
                   "when N is 5, as `topk` otherwise")
    s.add_argument("--weights", metavar="W",
                   help="checkpoint for this job: official, random, an absolute path or a file:// / "
                   "http(s):// URL that every worker can load (and that lies under their "
                   "HARDNET_JOB_WEIGHTS_ALLOW); unset: each worker's HARDNET_WEIGHTS")
    s.add_argument("--tag", action="store_true",
                   help="write each image's top-1 label and score back to its S3 object as tags "
                   "(hardnet:label, hardnet:score, hardnet:model), merged with the tags it has; "
                   "every source must be s3://")


def options_from_args(a: argparse.Namespace) -> JobOptions:
    k = a.top_k
    if k is None:
        k = TOP_K_DEFAULT
    if not TOP_K_MIN <= k <= TOP_K_MAX:
        raise ConfigError(f"--top-k {k}: give {TOP_K_MIN} to {TOP_K_MAX}")
    weights = normalize_weights(a.weights)
    return JobOptions(format=a.format or "jsonl", top_k=k, weights=weights, tag=bool(a.tag))


def check_options(options: JobOptions, dest: str | None, sources: list[str] | None = None) -> None:
    """What can be refused before the job exists (``sources``: the SOURCE arguments, ``@FILE`` for
    --from-file, whose lines `hardnet submit` checks before the job too
    (:func:`hnq.sources.check_uri_list`), and ``inventory:URI`` for an inventory report, which
    lists S3 objects)."""
    if options.tag:
        for src in sources or ():
            if not src.startswith(("@", "s3://", "inventory:")):
                raise ConfigError(f"--tag writes S3 object tags, but the source {src[:300]!r} is not "
                                  "s3://; submit the S3 sources alone, or without --tag")
    if options.format == "parquet" and not dest:
        raise ConfigError("--format parquet needs --out DEST (results kept in Redis are JSON Lines)")


def pyarrow_note(options: JobOptions) -> None:
    """With --format parquet: say so when this machine cannot read the parts back."""
    if options.format == "parquet" and not parquet_available():
        # The workers write the parts; this machine reads them (results, report).
        print("hardnet: note: pyarrow is not installed here: the workers can write the Parquet "
              "parts, but `hardnet results` and `hardnet report` need it on this machine too "
              "(pip install 'hardnet-queue[parquet]')", file=sys.stderr)


def only_s3(uris: Iterable[str]) -> Iterator[str]:
    """`--tag` writes S3 object tags: every source must be an S3 object. The first other URI stops
    the submit (the job is cancelled, exit 2) instead of giving half the job tag errors. (`hardnet
    submit` checks its SOURCE arguments and --from-file before the job exists; this is what is
    left for a caller of :func:`producer.submit.submit` and a file changed in between.)"""
    for u in uris:
        if not str(u).startswith("s3://"):   # str: listings and inventories give SourceObjects
            raise ConfigError(f"--tag writes S3 object tags, but {str(u)[:300]!r} is not an s3:// object; "
                              "submit the S3 sources alone, or without --tag")
        yield u
