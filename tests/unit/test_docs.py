"""Every setting is documented in the README, under the name the environment uses."""
from __future__ import annotations

from pathlib import Path

import pytest

from hnq.settings import S3Settings
from producer.settings import ProducerSettings
from worker.settings import WorkerSettings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


SETTINGS = [WorkerSettings, ProducerSettings, S3Settings]
ENV_NAMES = sorted({f"{cls.model_config['env_prefix']}{n.upper()}" for cls in SETTINGS for n in cls.model_fields})


@pytest.mark.parametrize("name", ENV_NAMES)
def test_setting_is_in_the_readme(name):
    assert f"`{name}`" in README


def test_no_other_hardnet_variable_is_read_from_the_environment():
    """Every HARDNET_* variable goes through a settings class: no `os.environ` read of one
    anywhere else in the code."""
    import re

    root = Path(__file__).resolve().parents[2]
    offenders = []
    for pkg in ("hnq", "worker", "producer"):
        for path in (root / pkg).rglob("*.py"):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"(os\.environ(\.get)?|os\.getenv)\s*[\[(]\s*[\"']HARDNET_", line):
                    offenders.append(f"{path.relative_to(root)}:{i}: {line.strip()}")
    assert offenders == []


@pytest.mark.parametrize("cls", SETTINGS)
def test_every_field_has_a_description(cls):
    assert [n for n, f in cls.model_fields.items() if not f.description] == []
