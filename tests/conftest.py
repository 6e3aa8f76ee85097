from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from servers import MotoS3, RedisServer, s3_env  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"

# Set at import, before any (module-scoped) fixture builds a subprocess environment: the producer's
# job memory stays out of the home directory.
import tempfile  # noqa: E402

os.environ["HARDNET_STATE_DIR"] = tempfile.mkdtemp(prefix="hardnet-test-state-")
SAMPLES = ROOT / "samples"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    return SAMPLES


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A session-wide redis-server of our own (tests flush what they need)."""
    srv = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield srv
    srv.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    redis_server.flush()
    return redis_server.url


@pytest.fixture(scope="session")
def moto_server():
    srv = MotoS3().start()
    yield srv
    srv.stop()


@pytest.fixture
def s3(moto_server, monkeypatch):
    """A clean moto S3 and the env pointing boto3 at it; yields a boto3 client."""
    import boto3

    moto_server.reset()
    for k, v in s3_env(moto_server.url).items():
        monkeypatch.setenv(k, v)
    return boto3.client("s3", endpoint_url=moto_server.url, region_name="us-east-1")


@pytest.fixture(autouse=True)
def _no_internet_weights(monkeypatch, tmp_path_factory):
    """No test may download real weights: point the torch hub cache at a private folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.getbasetemp() / "torch-home"))

    monkeypatch.delenv("HARDNET_WEIGHTS", raising=False)
