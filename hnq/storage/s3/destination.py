"""Results under ``s3://bucket/prefix/``: the S3 :class:`~hnq.storage.base.Destination`, the check
that a destination bucket exists and may be used (before a submit enqueues anything), and the
parsing of an ``s3://`` destination. Calls use the shared client (:mod:`hnq.storage.s3.client`);
errors map through :func:`hnq.storage.s3.errors.destination_error` / ``bucket_error``.
"""
from __future__ import annotations

import botocore.exceptions as bex

from hnq.errors import ConfigError
from hnq.storage.base import Destination, check_relpath
from hnq.storage.s3.client import s3_client
from hnq.storage.s3.errors import bucket_error, code_and_status, destination_error
from hnq.storage.s3.listing import iter_keys
from hnq.uris import InvalidURI, parse_s3


class S3Destination(Destination):
    def __init__(self, bucket: str, prefix: str = ""):
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self.bucket = bucket
        self.prefix = prefix
        self.dest = f"s3://{bucket}/{prefix}"

    def _key(self, relpath: str) -> str:
        return self.prefix + check_relpath(relpath)

    def uri(self, relpath: str = "") -> str:
        return f"s3://{self.bucket}/{self.prefix}{check_relpath(relpath) if relpath else ''}"

    def put(self, relpath: str, data: bytes, content_type: str = "application/json") -> None:
        key = self._key(relpath)
        try:
            s3_client().put_object(Bucket=self.bucket, Key=key, Body=data,
                                   ContentType=content_type)
        except Exception as e:  # noqa: BLE001
            raise destination_error(e, self.uri(relpath)) from None

    def get_versioned(self, relpath: str) -> tuple[bytes, str] | None:
        key = self._key(relpath)
        try:
            resp = s3_client().get_object(Bucket=self.bucket, Key=key)
            try:
                return resp["Body"].read(), resp["ETag"]
            finally:
                resp["Body"].close()
        except bex.ClientError as e:
            code, status = code_and_status(e)
            if code == "NoSuchKey" or (status == 404 and code != "NoSuchBucket"):
                return None
            raise destination_error(e, self.uri(relpath)) from None
        except Exception as e:  # noqa: BLE001
            raise destination_error(e, self.uri(relpath)) from None

    def put_if(self, relpath: str, data: bytes, content_type: str = "application/json", *,
               expect: str | None = None) -> bool:
        """S3's conditional PUT: ``If-None-Match: *`` (create only) or ``If-Match: ETag``; a 412
        (or a 409 from a concurrent conditional write) is False."""
        cond = {"IfNoneMatch": "*"} if expect is None else {"IfMatch": expect}
        try:
            s3_client().put_object(Bucket=self.bucket, Key=self._key(relpath), Body=data,
                                   ContentType=content_type, **cond)
            return True
        except bex.ClientError as e:
            code, status = code_and_status(e)
            if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            if expect is not None and (code == "NoSuchKey" or status == 404):
                return False       # the version we checked is gone
            raise destination_error(e, self.uri(relpath)) from None
        except Exception as e:  # noqa: BLE001
            raise destination_error(e, self.uri(relpath)) from None

    def get(self, relpath: str) -> bytes | None:
        got = self.get_versioned(relpath)      # the same one GET; the ETag is dropped
        return None if got is None else got[0]

    def exists(self, relpath: str) -> bool:
        key = self._key(relpath)
        try:
            s3_client().head_object(Bucket=self.bucket, Key=key)
            return True
        except bex.ClientError as e:
            code, status = code_and_status(e)
            if status == 404 or code in ("NoSuchKey", "404", "NotFound"):
                return False
            raise destination_error(e, self.uri(relpath)) from None
        except Exception as e:  # noqa: BLE001
            raise destination_error(e, self.uri(relpath)) from None

    def delete(self, relpaths: list[str]) -> int:
        keys = [self._key(r) for r in relpaths]
        for i in range(0, len(keys), 1000):      # DeleteObjects takes up to 1,000 keys
            batch = keys[i:i + 1000]
            try:
                resp = s3_client().delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": k} for k in batch], "Quiet": True})
            except Exception as e:  # noqa: BLE001
                raise destination_error(e, self.uri(relpaths[i])) from None
            errors = [x for x in resp.get("Errors", []) if x.get("Code") != "NoSuchKey"]
            if errors:
                first = errors[0]
                raise ConfigError(f"could not delete {len(errors)} object(s) under {self.dest}, e.g. "
                                  f"{first.get('Key')}: {first.get('Code')} {first.get('Message', '')}".rstrip())
        return len(keys)

    def list(self, relprefix: str = "") -> list[str]:
        n = len(self.prefix)
        return sorted(k[n:] for k in iter_keys(self.bucket, self.prefix + relprefix,
                                               images_only=False))


def check_bucket(bucket: str, where: str) -> None:
    """ConfigError unless the bucket exists and we may use it."""
    try:
        s3_client().head_bucket(Bucket=bucket)
    except Exception as e:  # noqa: BLE001 - mapped
        raise bucket_error(e, bucket, where) from None


def parse_destination(dest: str) -> tuple[str, str]:
    try:
        return parse_s3(dest, require_key=False)
    except InvalidURI as e:
        raise ConfigError(f"invalid destination {dest!r}: {e}") from None
