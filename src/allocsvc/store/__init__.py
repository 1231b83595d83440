"""Persistence: PostgreSQL (schema migrations, typed store) and the embedded server."""

from allocsvc.store.embedded import DEFAULT_DATA_DIR, EmbeddedPostgres
from allocsvc.store.migrations import (
    Migration,
    MigrationChecksumError,
    MigrationError,
    load_migrations,
    migrate,
)
from allocsvc.store.postgres import (
    AssignmentRow,
    ConflictError,
    ConversionRow,
    CountRow,
    ExperimentRow,
    HierarchyRow,
    NotFoundError,
    PostgresStore,
    RecommendationRow,
    SegmentationConfigRow,
    SegmentRow,
    StoreError,
    TrafficRow,
    VariantRow,
    to_signed64,
    to_unsigned64,
)

__all__ = [
    "DEFAULT_DATA_DIR",
    "AssignmentRow",
    "ConflictError",
    "ConversionRow",
    "CountRow",
    "EmbeddedPostgres",
    "ExperimentRow",
    "HierarchyRow",
    "Migration",
    "MigrationChecksumError",
    "MigrationError",
    "NotFoundError",
    "PostgresStore",
    "RecommendationRow",
    "SegmentRow",
    "SegmentationConfigRow",
    "StoreError",
    "TrafficRow",
    "VariantRow",
    "load_migrations",
    "migrate",
    "to_signed64",
    "to_unsigned64",
]
