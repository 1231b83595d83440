"""Settings: file < environment < flags, errors that name the setting."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from allocsvc.config import ConfigError, Settings, load_settings

pytestmark = pytest.mark.unit


def test_precedence_file_env_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "allocsvc.yaml"
    config.write_text("port: 6000\nworkers: 2\nmax_batch_items: 50\n")
    assert load_settings(config).port == 6000
    monkeypatch.setenv("ALLOCSVC_PORT", "7000")
    settings = load_settings(config)
    assert (settings.port, settings.workers, settings.max_batch_items) == (7000, 2, 50)
    assert load_settings(config, port=5000, workers=None).port == 5000


def test_json_file_and_defaults(tmp_path: Path) -> None:
    config = tmp_path / "allocsvc.json"
    config.write_text('{"region": "eu-west", "in_memory": true}')
    settings = load_settings(config)
    assert settings.region == "eu-west" and settings.in_memory
    assert settings.max_variants == Settings.model_fields["max_variants"].default


def test_settings_survive_pickling_to_worker_processes(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("port: 6001\n")
    settings = load_settings(config)
    assert type(settings) is Settings
    assert pickle.loads(pickle.dumps(settings)) == settings


@pytest.mark.parametrize(
    ("text", "flags", "named"),
    [
        ("port: -1\n", {}, "port"),
        ("", {"workers": 0}, "workers"),
        ("colour: blue\n", {}, "colour"),
        ("- 1\n- 2\n", {}, "mapping"),
        ("write_behind_interval: 0\n", {}, "write_behind_interval"),
        ("write_behind_interval: 61\n", {}, "write_behind_interval"),
    ],
)
def test_errors_name_the_setting(
    tmp_path: Path, text: str, flags: dict[str, object], named: str
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=named):
        load_settings(config, **flags)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml"):
        load_settings(tmp_path / "nope.yaml")
