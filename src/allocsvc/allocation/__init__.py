"""Allocation: experiments, the hot path, conversions (no gRPC, no SQL)."""
