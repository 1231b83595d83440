"""Settings: one validated object, read once at start (file, then environment, then flags)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)


class ConfigError(Exception):
    """A setting is missing or invalid; the message names it."""


class Section(BaseModel):
    """A feature's own settings: a mapping under its name in the file, and
    ALLOCSVC_<SECTION>__<NAME> in the environment."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Settings(BaseSettings):
    """Every setting of the server. Environment variables: ALLOCSVC_<NAME>, and
    ALLOCSVC_<SECTION>__<NAME> for the settings of a feature's section."""

    model_config = SettingsConfigDict(
        env_prefix="ALLOCSVC_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64, description="processes sharing the port (SO_REUSEPORT)")
    region: str = "local"
    seed: int | None = Field(None, ge=0, description="seed of the sampler (reproducible runs)")
    grace_seconds: float = Field(10.0, ge=0)
    log_level: str = "INFO"
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Prometheus /metrics")

    # Limits on requests; each violation is INVALID_ARGUMENT naming the field.
    max_variants: int = Field(100, ge=2, le=1024)
    max_batch_items: int = Field(10_000, ge=1)
    max_user_id_chars: int = Field(256, ge=1)
    max_context_entries: int = Field(64, ge=1)
    max_context_key_chars: int = Field(64, ge=1)
    max_context_value_chars: int = Field(256, ge=1)
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    user_agent_cache_size: int = Field(4096, ge=0)

    # Background jobs (seconds between runs; 0 switches a job off).
    eligibility_interval: float = Field(600.0, ge=0)
    eligibility_window_days: int = Field(7, ge=1, le=90)
    tree_rebuild_interval: float = Field(300.0, ge=0)

    # Stores: no DSN means the embedded PostgreSQL under data_dir.
    postgres_dsn: str | None = None
    redis_url: str | None = None
    data_dir: Path = Path("allocsvc-data")
    migrate: bool = True
    in_memory: bool = Field(False, description="keep all state in the process (tests, demos)")


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from an optional YAML/JSON file, the environment, and explicit overrides.

    Precedence: overrides > environment > file > defaults.
    """
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            text = config_file.read_text()
        except OSError as exc:
            raise ConfigError(f"config file {config_file}: {exc.strerror}") from None
        loaded = json.loads(text) if config_file.suffix == ".json" else yaml.safe_load(text)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {config_file}: must hold a mapping of settings")
        values.update(loaded or {})
    unknown = sorted(set(values) - set(Settings.model_fields))
    if unknown:
        raise ConfigError(f"config file: unknown setting {unknown[0]!r}")

    class FileSettings(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, InitSettingsSource(settings_cls, values))

    try:
        merged = FileSettings(**{k: v for k, v in overrides.items() if v is not None})
        # A plain Settings (the local subclass cannot be pickled to worker processes).
        return Settings.model_construct(
            **{name: getattr(merged, name) for name in Settings.model_fields}
        )
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from None
