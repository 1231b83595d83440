"""Regions: country routing, per-region stores, cross-region aggregate sync, data protection."""

from allocsvc.regions.model import LOCAL, Region, RegionMap, normalise_country

__all__ = ["LOCAL", "Region", "RegionMap", "normalise_country"]
