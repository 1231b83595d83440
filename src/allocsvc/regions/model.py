"""Regions and the country -> region lookup."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from allocsvc.errors import InvalidRequest, NotFound

# Name of the one region of a server with no regions configured.
LOCAL = "local"


@dataclass(frozen=True, slots=True)
class Region:
    code: str
    name: str = ""
    # upper-case ISO 3166-1 alpha-2 codes
    countries: frozenset[str] = field(default_factory=frozenset)
    postgres_dsn: str | None = None
    redis_url: str | None = None
    redis_namespace: str | None = None
    gdpr: bool = False
    failover_region: str | None = None


def normalise_country(code: str) -> str:
    return code.strip().upper()


class RegionMap:
    """Which region serves a country; unknown or missing countries go to the default region."""

    def __init__(self, regions: Iterable[Region], default: str | None = None) -> None:
        self._regions: dict[str, Region] = {}
        for region in regions:
            if region.code in self._regions:
                raise InvalidRequest("regions", f"region {region.code!r} given twice")
            self._regions[region.code] = region
        if not self._regions:
            raise InvalidRequest("regions", "at least one region is needed")
        self.default = default or next(iter(self._regions))
        if self.default not in self._regions:
            raise InvalidRequest("default_region", f"no region {self.default!r}")
        self._by_country: dict[str, str] = {}
        self._index()

    def _index(self) -> None:
        by_country: dict[str, str] = {}
        for region in self._regions.values():
            if region.failover_region is not None and (
                region.failover_region == region.code or region.failover_region not in self._regions
            ):
                raise InvalidRequest(
                    "failover_region", f"region {region.code!r}: {region.failover_region!r}"
                )
            for country in region.countries:
                other = by_country.get(country)
                if other is not None and other != region.code:
                    raise InvalidRequest(
                        "countries", f"{country} is in both {other!r} and {region.code!r}"
                    )
                by_country[country] = region.code
        self._by_country = by_country

    @property
    def regions(self) -> Mapping[str, Region]:
        return self._regions

    def get(self, code: str) -> Region:
        found = self._regions.get(code)
        if found is None:
            raise NotFound(f"region {code!r} does not exist")
        return found

    def for_country(self, country: str | None) -> str:
        if not country:
            return self.default
        return self._by_country.get(normalise_country(country), self.default)

    def upsert(self, region: Region) -> None:
        """Add or change a region; refused (and nothing changed) when the result is
        inconsistent."""
        before = dict(self._regions)
        self._regions[region.code] = region
        try:
            self._index()
        except InvalidRequest:
            self._regions = before
            self._index()
            raise
