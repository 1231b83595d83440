"""config.example.yaml loads, documents every section, and the feature sections validate."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from allocsvc.config import ConfigError, Settings, load_settings

pytestmark = pytest.mark.unit

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.yaml"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("ALLOCSVC_"):
            monkeypatch.delenv(name)


def test_example_loads_with_the_values_it_shows() -> None:
    raw = yaml.safe_load(EXAMPLE.read_text())
    settings = load_settings(EXAMPLE)
    for name, value in raw.items():
        loaded = getattr(settings, name)
        if isinstance(loaded, BaseModel):
            for field, given in value.items():
                shown = getattr(loaded, field)
                if isinstance(shown, tuple) and field != "regions":
                    shown = list(shown)
                if field == "regions":
                    assert [r.code for r in shown] == [r["code"] for r in given]
                elif isinstance(given, str) and not isinstance(shown, str):
                    assert str(shown) == given, f"{name}.{field}"
                else:
                    assert shown == given, f"{name}.{field}"
        elif isinstance(loaded, Path):
            assert loaded == Path(value)
        else:
            assert loaded == value, name


def test_example_shows_every_feature_section() -> None:
    raw = yaml.safe_load(EXAMPLE.read_text())
    sections = {
        name
        for name, field in Settings.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
    }
    assert sections >= {"contextual", "hierarchy", "clustering", "embeddings", "regions"}
    assert sections <= set(raw), f"missing from the example: {sorted(sections - set(raw))}"
    for name in ("contextual", "hierarchy", "clustering", "embeddings"):
        assert "enabled" in raw[name], name


def test_environment_beats_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALLOCSVC_HIERARCHY__MAX_DEPTH", "1")
    monkeypatch.setenv("ALLOCSVC_CONTEXTUAL__ENABLED", "false")
    settings = load_settings(EXAMPLE)
    assert settings.hierarchy.max_depth == 1
    assert settings.hierarchy.hierarchy_levels == ("country", "device", "source")
    assert settings.contextual.enabled is False
    assert load_settings(EXAMPLE, port=6000).port == 6000


@pytest.mark.parametrize(
    ("section", "value", "named"),
    [
        ("contextual", {"context_features": ["country", "shoe_size"]}, "context_features[1]"),
        ("contextual", {"context_features": ["device", "device"]}, "duplicate dimension"),
        ("contextual", {"min_samples_per_segment": 0}, "contextual.min_samples_per_segment"),
        ("contextual", {"surprise": 1}, "contextual.surprise"),
        ("hierarchy", {"hierarchy_levels": []}, "hierarchy_levels"),
        ("hierarchy", {"hierarchy_levels": ["country"] * 6}, "hierarchy_levels"),
        ("hierarchy", {"hierarchy_levels": ["country", "device"], "max_depth": 3}, "max_depth"),
        ("dashboard", {"history_points": 1}, "dashboard.history_points"),
    ],
)
def test_bad_sections_name_the_setting(
    tmp_path: Path, section: str, value: dict[str, object], named: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({section: value}))
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert named in str(err.value)


def test_defaults_are_valid_without_a_file() -> None:
    settings = load_settings()
    assert settings.contextual.enabled and settings.hierarchy.enabled
    assert set(settings.contextual.context_features) <= {
        "channel",
        "source",
        "device",
        "country",
    }
    assert settings.hierarchy.max_depth == 0


def test_hierarchy_levels_must_be_context_features(tmp_path: Path) -> None:
    path = tmp_path / "levels.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "contextual": {"context_features": ["device", "source"]},
                "hierarchy": {"hierarchy_levels": ["device", "country"]},
            }
        )
    )
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert "hierarchy.hierarchy_levels[1]" in str(err.value)
