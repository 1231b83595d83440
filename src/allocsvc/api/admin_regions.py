"""Admin RPCs of regions and data protection (ExportUserData, DeleteUserData)."""

from __future__ import annotations

import hashlib
import json

import grpc

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc.api.auth import bearer_token
from allocsvc.api.errors import maps_errors
from allocsvc.errors import FailedPrecondition, InvalidRequest
from allocsvc.regions.model import Region, normalise_country
from allocsvc.regions.router import Regions

Context = grpc.aio.ServicerContext
ANONYMOUS = "anonymous"


def caller(context: grpc.aio.ServicerContext[object, object]) -> str:
    """Who asked, for the audit log: the fingerprint of the bearer token the auth interceptor
    checked (never the token itself), or "anonymous" on an open server."""
    token = bearer_token(context.invocation_metadata())
    if not token:
        return ANONYMOUS
    return f"token:{hashlib.sha256(token).hexdigest()[:16]}"


class AdminRegionsMixin:
    """Region and data-protection handlers; `bind_regions` gives them the regions served."""

    _regions: Regions | None = None

    def bind_regions(self, regions: Regions) -> None:
        self._regions = regions

    def _served(self) -> Regions:
        if self._regions is None:
            raise FailedPrecondition("regions are not set up on this server")
        return self._regions

    def _region_pb(self, region: Region) -> pb.Region:
        regions = self._served()
        serving = regions.serving(region.code)
        return pb.Region(
            code=region.code,
            name=region.name,
            countries=sorted(region.countries),
            postgres_dsn=region.postgres_dsn or "",
            redis_url=region.redis_url or "",
            gdpr=region.gdpr,
            failover_region=region.failover_region or "",
            is_default=region.code == regions.map.default,
            serving=serving,
            healthy=serving and regions.runtime(region.code).healthy(),
        )

    @maps_errors
    async def ListRegions(
        self,
        request: pb.ListRegionsRequest,
        context: Context[pb.ListRegionsRequest, pb.ListRegionsResponse],
    ) -> pb.ListRegionsResponse:
        regions = self._served()
        return pb.ListRegionsResponse(
            regions=[self._region_pb(r) for _, r in sorted(regions.map.regions.items())],
            default_region=regions.map.default,
        )

    @maps_errors
    async def GetRegion(
        self, request: pb.GetRegionRequest, context: Context[pb.GetRegionRequest, pb.Region]
    ) -> pb.Region:
        if not request.code:
            raise InvalidRequest("code", "must not be empty")
        return self._region_pb(self._served().map.get(request.code))

    @maps_errors
    async def UpsertRegion(
        self, request: pb.UpsertRegionRequest, context: Context[pb.UpsertRegionRequest, pb.Region]
    ) -> pb.Region:
        r = request.region
        if not r.code or len(r.code) > 64 or not all(c.isalnum() or c == "-" for c in r.code):
            raise InvalidRequest("region.code", "1 to 64 letters, digits or '-'")
        countries = frozenset(normalise_country(c) for c in r.countries)
        if any(len(c) != 2 or not c.isalpha() for c in countries):
            raise InvalidRequest("region.countries", "ISO 3166-1 alpha-2 codes")
        region = Region(
            code=r.code,
            name=r.name,
            countries=countries,
            postgres_dsn=r.postgres_dsn or None,
            redis_url=r.redis_url or None,
            gdpr=r.gdpr,
            failover_region=r.failover_region or None,
        )
        return self._region_pb(await self._served().upsert(region))

    @maps_errors
    async def ExportUserData(
        self,
        request: pb.ExportUserDataRequest,
        context: Context[pb.ExportUserDataRequest, pb.ExportUserDataResponse],
    ) -> pb.ExportUserDataResponse:
        exports = await self._served().export(
            request.user_id,
            request.region,
            caller(context),  # type: ignore[arg-type]
        )
        return pb.ExportUserDataResponse(
            user_id=request.user_id,
            regions=[e.region for e in exports if e.sources],
            json=json.dumps([e.as_json_data() for e in exports], default=str, sort_keys=True),
            records=sum(e.record_count for e in exports),
        )

    @maps_errors
    async def DeleteUserData(
        self,
        request: pb.DeleteUserDataRequest,
        context: Context[pb.DeleteUserDataRequest, pb.DeleteUserDataResponse],
    ) -> pb.DeleteUserDataResponse:
        if len(request.reason) > 1000:
            raise InvalidRequest("reason", "longer than 1000 characters")
        if request.user_id and request.user_id in request.reason:
            raise InvalidRequest("reason", "must not contain the user id (it is kept)")
        erasures = await self._served().erase(
            request.user_id,
            request.region,
            caller(context),  # type: ignore[arg-type]
            request.reason,
        )
        # One receipt for the whole request: the regions' receipts joined.
        return pb.DeleteUserDataResponse(
            receipt_id=",".join(e.receipt for e in erasures),
            regions=[e.region for e in erasures],
            removed={
                f"{e.region}/{kind}": n for e in erasures for kind, n in e.removed.items() if n
            },
        )
