"""Every setting is documented in the README, under the name the environment uses."""
from __future__ import annotations

from pathlib import Path

import pytest

from producer.settings import ProducerSettings
from worker.settings import WorkerSettings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


@pytest.mark.parametrize("name", sorted(set(WorkerSettings.model_fields) | set(ProducerSettings.model_fields)))
def test_setting_is_in_the_readme(name):
    assert f"`HARDNET_{name.upper()}`" in README


@pytest.mark.parametrize("cls", [WorkerSettings, ProducerSettings])
def test_every_field_has_a_description(cls):
    assert [n for n, f in cls.model_fields.items() if not f.description] == []
