"""Fixtures of the unit tests that run the `hardnet` CLI as a process."""
import pytest

from cluster import base_env, image_bytes


@pytest.fixture
def env(redis_url, tmp_path):
    """The CLI's environment: the session's redis-server, a state folder of the test's own."""
    return base_env(redis_url, HARDNET_STATE_DIR=str(tmp_path / "state"))


@pytest.fixture
def src(tmp_path):
    """A folder of 3 small JPEGs."""
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(3):
        (d / f"{i}.jpg").write_bytes(image_bytes(i))
    return d
