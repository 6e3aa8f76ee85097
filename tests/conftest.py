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


@pytest.fixture(params=["boto3", "obstore"])
def s3_get(request, monkeypatch):
    """Runs a test with each S3 GET client. ``s3_get.policy(**kw)`` is a FetchPolicy that asks for
    it; at the end the test fails unless that client did GETs and the other did none (so a silent
    fallback to boto3 cannot pass for obstore)."""
    from hnq.storage import FetchPolicy
    from hnq.storage.s3 import get as s3mod

    name = request.param
    used = {"boto3": 0, "obstore": 0}
    real_boto = s3mod.fetch_s3_boto3

    def boto(*a, **kw):
        used["boto3"] += 1
        return real_boto(*a, **kw)

    monkeypatch.setattr(s3mod, "fetch_s3_boto3", boto)
    if name == "obstore":
        pytest.importorskip("obstore")
    try:
        from hnq.storage.s3 import get_obstore as s3_obstore
    except ImportError:
        s3_obstore = None
    if s3_obstore is not None:
        real_obs = s3_obstore.fetch_obstore

        def obs(*a, **kw):
            try:
                got = real_obs(*a, **kw)
            except Exception:
                used["obstore"] += 1
                raise
            used["obstore"] += got is not None  # None: handed over to boto3
            return got

        monkeypatch.setattr(s3_obstore, "fetch_obstore", obs)

    class S3Get:
        client = name

        @staticmethod
        def policy(**kw) -> FetchPolicy:
            return FetchPolicy(s3_client=name, **kw)

    S3Get.used = used
    yield S3Get
    other = "boto3" if name == "obstore" else "obstore"
    assert used[name] > 0, f"no GET went through {name}: {used}"
    assert used[other] == 0, f"{other} did GETs in a {name} test: {used}"


@pytest.fixture(autouse=True)
def _no_internet_weights(monkeypatch, tmp_path_factory):
    """No test may download real weights: point the torch hub cache at a private folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.getbasetemp() / "torch-home"))

    monkeypatch.delenv("HARDNET_WEIGHTS", raising=False)
