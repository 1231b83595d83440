"""Settings: one validated object, read once at start (file, then environment, then flags)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
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


# A bearer token shorter than this is refused: it could be guessed.
MIN_TOKEN_CHARS = 16


class AuthSettings(Section):
    """Bearer tokens by role (see allocsvc.api.auth for which role each RPC needs).

    No token in any Admin role leaves the Admin service open (a warning is logged at start);
    no `allocator_tokens` leaves the Allocator open.
    """

    read_only_tokens: tuple[SecretStr, ...] = ()
    admin_tokens: tuple[SecretStr, ...] = ()
    data_protection_tokens: tuple[SecretStr, ...] = ()
    allocator_tokens: tuple[SecretStr, ...] = ()
    # Key of the HMAC that pseudonymises user ids in logs; unset: a random key per process
    # (pseudonyms then do not match between processes or restarts).
    pseudonym_secret: SecretStr | None = None

    @model_validator(mode="after")
    def _long_enough(self) -> AuthSettings:
        for name in (
            "read_only_tokens",
            "admin_tokens",
            "data_protection_tokens",
            "allocator_tokens",
        ):
            self._check(name)
        return self

    def _check(self, name: str) -> None:
        for token in getattr(self, name):
            if len(token.get_secret_value()) < MIN_TOKEN_CHARS:
                raise ValueError(f"{name}: tokens need at least {MIN_TOKEN_CHARS} characters")


class TlsSettings(Section):
    """TLS for the gRPC port; with `client_ca_file`, mutual TLS (clients must present a
    certificate signed by that CA)."""

    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = None

    @model_validator(mode="after")
    def _complete(self) -> TlsSettings:
        if self.enabled and (self.cert_file is None or self.key_file is None):
            raise ValueError("enabled: TLS needs cert_file and key_file")
        return self


class BackpressureSettings(Section):
    """Bounds that turn overload into RESOURCE_EXHAUSTED instead of unbounded queues."""

    # RPCs accepted at once by this process (every service, health included); past it,
    # RESOURCE_EXHAUSTED at once.
    max_in_flight_rpcs: int = Field(default=1000, ge=1)
    # Calls gRPC has read off the connections that no handler has taken yet (they wait while
    # the event loop is busy); past it, gRPC refuses new calls at once, with CANCELLED (gRPC's
    # own status for it). gRPC's default starts refusing at random from 1,000 waiting calls,
    # which a busy second at a few thousand calls/s reaches while the process keeps up.
    # Memory: each accepted or waiting call holds ~15 KiB plus 1.1-1.7x its request
    # (bench/RESULTS.md, "Memory of waiting calls"); lower both bounds for large batches.
    max_waiting_calls: int = Field(default=20_000, ge=1)
    # Assignments waiting in the write-behind buffer; past it, allocations are refused.
    max_pending_assignments: int = Field(default=200_000, ge=1)
    # Assignments written as blocks (a flush of 10,000 or more, `sql/011_assignment_blocks.sql`;
    # about 6 bytes each) and not yet expanded into their table; past it, flushes write rows
    # (slower). A restart reads the blocks' rows without expanding them; a lookup of one user
    # or id reads, and an export or erasure of one user expands, only the blocks whose filter
    # may hold it. 0: never blocks.
    max_unexpanded_assignments: int = Field(default=10_000_000, ge=0)
    # Conversions waiting for their group commit; past it, conversions are refused.
    max_pending_conversions: int = Field(default=50_000, ge=1)


class RegionSettings(Section):
    """One region: its countries and its own stores (personal data stays in them)."""

    code: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9-]*$")
    name: str = ""
    # ISO 3166-1 alpha-2 codes served by this region (case-insensitive).
    countries: tuple[str, ...] = ()
    postgres_dsn: str | None = None
    redis_url: str | None = None
    # Key prefix in Redis (regions may share one Redis server); default "allocsvc-<code>".
    redis_namespace: str | None = None
    gdpr: bool = False
    failover_region: str | None = None


class RegionsSettings(Section):
    """Regions. None configured: one region named by `region` with the server's own stores."""

    regions: tuple[RegionSettings, ...] = ()
    # Region of users whose country no region lists (default: the first region).
    default_region: str | None = None
    # Seconds between cross-region exchanges of aggregate counts (0: off).
    sync_interval: float = Field(default=60.0, ge=0)


class ClusteringSettings(Section):
    """k-means over recent traffic's feature vectors (allocsvc.learning); `auto` segmentation
    uses the deployed model's clusters."""

    enabled: bool = True
    k_min: int = Field(default=2, ge=2)
    k_max: int = Field(default=8, ge=2, le=64)
    # Recent requests kept in memory as training data (and drift window).
    buffer_size: int = Field(default=20_000, ge=100)
    # Allocations observed for learning: one in `observe_every` on average (random gaps, so
    # periodic traffic cannot alias; at most 8 items of a batch, at random positions); the
    # others cost a counter decrement. 1: every one.
    observe_every: int = Field(default=10, ge=1, le=10_000)
    min_samples: int = Field(default=200, ge=20, description="rows needed to train")
    silhouette_sample: int = Field(default=2000, ge=100, description="silhouette on a sample")
    n_init: int = Field(default=4, ge=1)
    max_sources: int = Field(default=3, ge=1, le=8, description="sources one-hot before 'other'")
    # Quality gate: a model that misses any bound is kept but not deployed.
    min_silhouette: float = Field(default=0.25, ge=-1, le=1)
    max_davies_bouldin: float = Field(default=1.5, gt=0)
    min_cluster_fraction: float = Field(default=0.01, ge=0, lt=1)
    # Drift: largest per-feature PSI between training data and recent traffic.
    drift_threshold: float = Field(default=0.2, gt=0)
    drift_interval: float = Field(default=300.0, ge=0, description="seconds between checks; 0: off")
    # How often a replica looks in Postgres for a model another replica deployed; 0: off.
    model_poll_interval: float = Field(default=5.0, ge=0, description="seconds")
    drift_min_samples: int = Field(default=500, ge=10, description="recent rows needed to judge")
    stale_after_days: float = Field(default=7.0, gt=0)
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _k_range(self) -> ClusteringSettings:
        if self.k_min > self.k_max:
            raise ValueError("k_min: must not exceed k_max")
        return self


class EmbeddingsSettings(Section):
    """PyTorch user embeddings, trained in a separate process (needs the `learning` extra)."""

    enabled: bool = True
    epochs: int = Field(default=30, ge=1, le=1000)
    batch_size: int = Field(default=128, ge=2)
    learning_rate: float = Field(default=1e-3, gt=0)
    loss: str = Field(default="triplet", pattern="^(triplet|contrastive)$")
    margin: float = Field(default=0.5, gt=0)
    patience: int = Field(default=5, ge=1)
    validation_fraction: float = Field(default=0.2, gt=0, lt=1)
    min_users: int = Field(default=50, ge=8, description="users needed to train")
    # Similarity search averages the newest `ensemble_size` models of the same feature width.
    ensemble_size: int = Field(default=1, ge=1, le=16)
    # Where trained models are saved as safetensors; none: kept in memory only.
    model_dir: Path | None = None
    seed: int = Field(default=0, ge=0)


class ContextualSettings(Section):
    """Contextual bandits: posteriors per segment of users (SPEC §5, §6). Experiments carry
    their own segmentation; these are the server's switch, limits and defaults for it
    (`allocsvc.allocation.experiments.SegmentationDefaults` applies them).

    `enabled: false`: every experiment allocates from its global posteriors, whatever its
    segmentation config (which is kept, and applies again once this is back on); RebuildTree
    answers FAILED_PRECONDITION and auto-activation does not switch segmentation on.
    """

    enabled: bool = True
    # Context dimensions `manual` segmentation may use; others are refused (INVALID_ARGUMENT
    # naming segment_by[i]). Empty: every known segment dimension.
    context_features: tuple[str, ...] = ()
    # Samples a segment needs before its own statistics are used: filled into an experiment
    # that gives 0 (and no hierarchy.min_samples_per_level) when it is created or updated.
    min_samples_per_segment: int = Field(default=100, ge=1)

    @model_validator(mode="after")
    def _known_features(self) -> ContextualSettings:
        _check_dimensions("context_features", self.context_features, min_count=0)
        return self


class SegmentTreeSettings(Section):
    """The segment hierarchy (SPEC §7). `enabled: false` stops the periodic tree rebuild
    (RebuildTree still works on demand). `hierarchy_levels` and `max_depth` are defaults that
    an experiment's own config overrides; they are filled in when it is created or updated."""

    enabled: bool = True
    # Levels in cascade order, level 1 first: the segment_by of a `manual` experiment that
    # names none, and the dimensions auto-activation proposes when nothing else names any.
    hierarchy_levels: tuple[str, ...] = ("country", "device", "source")
    # Deepest level a tree keeps, for experiments that give 0 and have more levels than
    # this; 0 means every level.
    max_depth: int = Field(default=0, ge=0, le=5)
    # While data is young, trees are also rebuilt by growth: when an experiment's allocations
    # reach first_rebuild_at, and each time they have doubled since its last tree (checked as
    # allocations come, and at least every growth_check_interval seconds for other replicas'
    # traffic). 0 switches either off. Until its first tree an experiment is served from its
    # global node only (when trees are rebuilt at all: see tree_rebuild_interval too).
    first_rebuild_at: int = Field(default=1000, ge=0)
    growth_check_interval: float = Field(default=2.0, ge=0)

    @model_validator(mode="after")
    def _levels(self) -> SegmentTreeSettings:
        _check_dimensions("hierarchy_levels", self.hierarchy_levels, min_count=1)
        if self.max_depth > len(self.hierarchy_levels):
            raise ValueError(
                f"max_depth: {self.max_depth} is deeper than the "
                f"{len(self.hierarchy_levels)} hierarchy_levels"
            )
        return self


def _check_dimensions(name: str, values: tuple[str, ...], *, min_count: int) -> None:
    # Imported here: the context package loads the user-agent parser, which `allocsvc
    # --help` does not need.
    from allocsvc.context import SEGMENT_DIMENSIONS

    if not min_count <= len(values) <= 5:
        raise ValueError(f"{name}: give {min_count} to 5 dimensions, got {len(values)}")
    for i, value in enumerate(values):
        if value not in SEGMENT_DIMENSIONS:
            allowed = ", ".join(sorted(SEGMENT_DIMENSIONS))
            raise ValueError(f"{name}[{i}]: unknown dimension {value!r} (one of {allowed})")
        if value in values[:i]:
            raise ValueError(f"{name}[{i}]: duplicate dimension {value!r}")


class DashboardSettings(Section):
    """The read-only operator dashboard, served on the metrics port beside /metrics (`/` and
    `/api/...`); it needs `metrics_port`."""

    enabled: bool = True
    # Seconds between samples of each experiment's allocations (the share-over-time chart).
    history_interval: float = Field(default=10.0, ge=0)
    # Samples kept per experiment (360 at 10 s: the last hour).
    history_points: int = Field(default=360, ge=2, le=100_000)


class ErasureSettings(Section):
    """How an erasure (Admin.DeleteUserData) reaches the memory of every process of the region:
    each polls the region's erasure log (and is woken sooner by a Redis notice)."""

    # Seconds between polls: about the longest another replica or worker still holds an
    # erased user in memory (0: off, only the process that erased forgets the user).
    poll_interval: float = Field(default=1.0, ge=0)


class GcSettings(Section):
    """Python's garbage collector in a serving process."""

    # Once serving, collect and then freeze what exists (gc.freeze: modules, descriptors, the
    # loaded state): a full (generation 2) collection then scans only objects made since.
    # Unfrozen, each full collection scanned the whole start-up heap and held the event loop
    # for tens of milliseconds (bench/load/stalls.py).
    freeze_after_start: bool = True


class Settings(BaseSettings):
    """Every setting of the server. Environment variables: ALLOCSVC_<NAME>, and
    ALLOCSVC_<SECTION>__<NAME> for the settings of a feature's section."""

    model_config = SettingsConfigDict(
        env_prefix="ALLOCSVC_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64, description="processes sharing the port (SO_REUSEPORT)")
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop", description="event loop of each serving process (uvloop is faster)"
    )
    # gRPC servers per process on the port, each taking calls on its own (a grpc.aio server
    # takes the next call only once the last one reached the event loop). The backpressure
    # bounds are the process's, shared evenly by them.
    accept_loops: int = Field(
        4, ge=1, le=32, description="gRPC servers per process taking calls (SO_REUSEPORT)"
    )
    # Seconds a client connection is served before the server asks the client to reconnect
    # (HTTP/2 GOAWAY after gRPC's own +-10% jitter; calls under way finish first). The kernel
    # gives each new connection to a worker (and gRPC server) by a hash of its addresses, so a
    # few long-lived connections can stay split unevenly for good; reconnecting draws again.
    # 0: never.
    max_connection_age: float = Field(
        10.0, ge=0, description="seconds before a connection is asked to reconnect (0: never)"
    )
    # With `workers` > 1 on Linux: new connections drawn to the workers with weights from
    # their CPU over the last quarter second (a BPF program on the port's SO_REUSEPORT group),
    # not by the kernel's hash alone; reconnections after `max_connection_age` then even out
    # the split. Off by default: on a saturated machine a worker starved of a core uses less
    # CPU, looks idle and was sent more (bench/RESULTS.md item 77).
    steer_connections: bool = Field(
        False, description="send new connections to the least busy workers (Linux, workers > 1)"
    )
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
    # Assignments held in memory for sticky answers and conversions (about 190 bytes each);
    # past it the oldest are evicted and read back from PostgreSQL when asked for (never fewer
    # than twice backpressure.max_pending_assignments are held). 0: no bound.
    max_held_assignments: int = Field(1_000_000, ge=0)

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
    # Seconds between write-behind flushes: answered assignments, their counts and traffic go
    # to PostgreSQL in one transaction each interval, so a crash of the process (not a stop,
    # which flushes everything) loses at most that much of them; conversions are written
    # before they are answered, whatever this is. Each flush costs PostgreSQL CPU beside the
    # event loop: on the 2-core bench, durable unary calls ran at 0.96-0.98 of a server without
    # PostgreSQL with a flush every 1 s, 0.92 every 0.1 s (bench/RESULTS.md items 67, 80). Keep
    # backpressure.max_pending_assignments above what an interval of your peak rate allocates,
    # or allocations are refused between flushes.
    write_behind_interval: float = Field(
        0.1, gt=0, le=60, description="seconds between write-behind flushes (a crash's window)"
    )

    auth: AuthSettings = AuthSettings()
    tls: TlsSettings = TlsSettings()
    backpressure: BackpressureSettings = BackpressureSettings()
    regions: RegionsSettings = RegionsSettings()
    clustering: ClusteringSettings = ClusteringSettings()
    embeddings: EmbeddingsSettings = EmbeddingsSettings()
    contextual: ContextualSettings = ContextualSettings()
    hierarchy: SegmentTreeSettings = SegmentTreeSettings()
    dashboard: DashboardSettings = DashboardSettings()
    erasure: ErasureSettings = ErasureSettings()
    gc: GcSettings = GcSettings()

    @model_validator(mode="after")
    def _levels_allowed(self) -> Settings:
        allowed = self.contextual.context_features
        for i, level in enumerate(self.hierarchy.hierarchy_levels):
            if allowed and level not in allowed:
                raise ValueError(
                    f"hierarchy.hierarchy_levels[{i}]: {level!r} is not among "
                    "contextual.context_features"
                )
        return self


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
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
            if err["loc"]
            else err["msg"].removeprefix("Value error, ")
            for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from None
