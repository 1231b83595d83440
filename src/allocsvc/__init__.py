"""allocsvc: experiment allocation with hierarchical Thompson sampling, served over gRPC."""

__version__ = "0.1.0"
