"""Credentials never reach logs or records; JSON log lines carry the job and chunk."""
from __future__ import annotations

import io
import json
import logging

import pytest

from hnq import logs
from hnq.errors import ErrorCode
from hnq.schema import ResultRecord

PRESIGNED = ("https://bucket.s3.amazonaws.com/photos/cat.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256"
             "&X-Amz-Credential=AKIAEXAMPLESECRET%2F20261201%2Fus-east-1%2Fs3%2Faws4_request"
             "&X-Amz-Date=20261201T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
             "&X-Amz-Security-Token=FwoGZXIvYXdzEXAMPLETOKEN&X-Amz-Signature=0123456789abcdefsig")


@pytest.mark.parametrize("text, secrets, kept", [
    ("redis://:hunter2@redis:6379/0", ["hunter2"], "redis://:***@redis:6379/0"),
    ("http://alice:pa55@host/x.jpg", ["pa55"], "http://alice:***@host/x.jpg"),
    (PRESIGNED, ["AKIAEXAMPLESECRET", "FwoGZXIvYXdzEXAMPLETOKEN", "0123456789abcdefsig"],
     "https://bucket.s3.amazonaws.com/photos/cat.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***"),
    ("https://x.blob.core.windows.net/c/a.png?sv=2022&sig=AzureSecret%3D&se=2027", ["AzureSecret"],
     "https://x.blob.core.windows.net/c/a.png?sv=2022&sig=***&se=2027"),
    ("fetching http://h/a.jpg?token=abc&size=2 failed", ["abc"], "http://h/a.jpg?token=***&size=2 failed"),
])
def test_redact(text, secrets, kept):
    out = logs.redact(text)
    for s in secrets:
        assert s not in out
    assert kept in out


def test_redact_leaves_plain_uris_alone():
    for uri in ("s3://bucket/a/b c.jpg", "file:///data/x%20y.png", "https://h/p.jpg?w=200&key=photos/1",
                "user@example.com wrote"):
        assert logs.redact(uri) == uri


def test_records_never_hold_credentials():
    r = ResultRecord.failure(PRESIGNED, ErrorCode.access_denied, f"HTTP 403 for {PRESIGNED}", "hardnet68")
    text = r.to_json()
    assert "0123456789abcdefsig" not in text and "AKIAEXAMPLESECRET" not in text
    assert r.uri.startswith("https://bucket.s3.amazonaws.com/photos/cat.jpg?")


def _capture(fmt: str) -> tuple[logging.Logger, io.StringIO]:
    buf = io.StringIO()
    lg = logging.getLogger(f"test.logs.{fmt}")
    lg.handlers = [logging.StreamHandler(buf)]
    lg.propagate = False
    lg.setLevel(logging.INFO)
    logs.install(lg, fmt, text_format="%(levelname)s %(message)s")
    return lg, buf


def test_json_lines_name_job_chunk_worker_and_redact():
    lg, buf = _capture("json")
    logs.set_worker("gpu0@host")
    try:
        lg.info("outside any chunk")
        with logs.chunk_context("20261201-000000-abcd", 7):
            lg.info("fetching %s", "http://u:secretpw@h/a.jpg")
            try:
                raise ValueError(f"boom {PRESIGNED}")
            except ValueError:
                lg.exception("failed")
    finally:
        logs.set_worker(None)
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert len(lines) == 3
    assert "job" not in lines[0] and lines[0]["worker"] == "gpu0@host"
    assert lines[1]["job"] == "20261201-000000-abcd" and lines[1]["chunk"] == 7
    assert lines[1]["message"] == "fetching http://u:***@h/a.jpg" and lines[1]["level"] == "info"
    assert lines[2]["level"] == "error" and "ValueError: boom" in lines[2]["exc"]
    assert "0123456789abcdefsig" not in buf.getvalue() and "secretpw" not in buf.getvalue()


def test_text_lines_are_redacted_too():
    lg, buf = _capture("text")
    lg.warning("broker %s", "redis://:hunter2@r:6379/0")
    assert buf.getvalue() == "WARNING broker redis://:***@r:6379/0\n"
