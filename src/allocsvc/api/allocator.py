"""The public Allocator service."""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf.message import DecodeError

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc._proto import allocsvc_pb2_grpc as pb_grpc
from allocsvc.allocation.service import (
    Allocation,
    AllocationRequest,
    AllocationService,
    ConversionRequest,
    ConversionResult,
)
from allocsvc.api import convert
from allocsvc.api.errors import field_of, maps_errors, status_number, tries_first
from allocsvc.core import batch_items
from allocsvc.errors import AllocsvcError, InvalidRequest
from allocsvc.regions.router import Regions

Context = grpc.aio.ServicerContext
SERVICE = "allocsvc.v1.Allocator"
# At most this many sampled items of a fast-path batch feed learning. Learning keeps a window
# of recent contexts (clustering.buffer_size, 20,000 by default): 8 per batch refill it every
# 10 s at 250 batches/s.
BATCH_OBSERVED_ITEMS = 8


def _declines(request: bytes) -> None:
    return None


class AllocatorServicer(pb_grpc.AllocatorServicer):
    def __init__(
        self, service: AllocationService, region: str, regions: Regions | None = None
    ) -> None:
        self._service = service
        self._region = region
        # Several regions: each request goes to its country's region (allocsvc.regions).
        self._regions = regions
        # Unary Allocate's first try (`AllocateBytes`): the serialized AllocateResponse of a
        # well-formed request that the Rust path takes (decided exactly as AllocateBatch
        # decides an item: decoding, checks, extraction, the sticky lookup, decision and
        # encoding in one Rust call), or None. Several regions route by country in Python.
        self._allocate_in_rust = service.unary_path(region) if regions is None else _declines

    def _for_country(self, request: pb.AllocateRequest) -> tuple[AllocationService, str]:
        if self._regions is None:
            return self._service, self._region
        runtime = self._regions.for_country(request.context.get("country_code"))
        return runtime.service, runtime.region.code

    def _for_conversion(self, request: pb.RecordConversionRequest) -> tuple[AllocationService, str]:
        if self._regions is None:
            return self._service, self._region
        runtime = self._regions.for_conversion(
            request.assignment_id, request.experiment_id, request.user_id
        )
        return runtime.service, runtime.region.code

    @maps_errors
    async def Allocate(
        self, request: pb.AllocateRequest, context: Context[pb.AllocateRequest, pb.AllocateResponse]
    ) -> pb.AllocateResponse:
        if self._regions is None:
            allocation = await self._service.allocate(convert.allocate_request(request))
            return convert.allocate_response(allocation, self._region)
        service, region = self._for_country(request)
        allocation = await service.allocate(convert.allocate_request(request))
        return convert.allocate_response(allocation, region)

    @maps_errors
    async def _allocate_decoded(self, request: bytes, context: Context[bytes, bytes]) -> bytes:
        """Allocate on the wire format through `Allocate`, whose errors name their field: a
        bad request, `auto` segmentation, a new sticky user's claim in shared state, several
        regions."""
        try:
            message = pb.AllocateRequest.FromString(request)
        except DecodeError:
            raise InvalidRequest("request", "not a valid AllocateRequest") from None
        return (await self.Allocate(message, context)).SerializeToString()  # type: ignore[arg-type]

    # Allocate on the wire format: Rust answers what it takes, `Allocate` the rest.
    AllocateBytes = tries_first("_allocate_in_rust", _allocate_decoded)

    @maps_errors
    async def AllocateBatchBytes(self, request: bytes, context: Context[bytes, bytes]) -> bytes:
        """AllocateBatch on the wire format: decoding, checks, context extraction, decisions
        and the response's encoding run in Rust; Python words the errors of bad items and
        keeps the new assignments. Batches Rust cannot take go the per-item way."""
        prepared = None if self._regions is not None else self._service.prepare_batch(request)
        if prepared is None:
            message = pb.AllocateBatchRequest.FromString(request)
            return (await self.AllocateBatch(message, context)).SerializeToString()  # type: ignore[arg-type]
        invalid = prepared.invalid()
        allocated: dict[int, Allocation] = {}
        errors: dict[int, tuple[int, str, str]] = {}
        # Only the items Python words the errors of are decoded again (by protobuf).
        items = map(pb.AllocateRequest.FromString, batch_items(request, invalid))
        for i, item in zip(invalid, items, strict=True):
            try:
                allocated[i] = await self._service.allocate(convert.allocate_request(item))
            except AllocsvcError as exc:
                errors[i] = (status_number(exc), str(exc), field_of(exc))
        recalled = await self._service.recall_sticky(prepared)
        if self._service.claims(prepared):
            response = await self._service.finish_shared_batch(
                prepared, self._region, allocated, errors, recalled
            )
        else:
            response = self._service.finish_batch(
                prepared, self._region, allocated, errors, recalled
            )
        self._service.observe_batch(prepared, BATCH_OBSERVED_ITEMS)
        return response

    @maps_errors
    async def AllocateBatch(
        self,
        request: pb.AllocateBatchRequest,
        context: Context[pb.AllocateBatchRequest, pb.AllocateBatchResponse],
    ) -> pb.AllocateBatchResponse:
        items: list[AllocationRequest | AllocsvcError] = []
        for message in request.requests:
            try:
                items.append(convert.allocate_request(message))
            except AllocsvcError as exc:
                items.append(exc)
        valid = [i for i in items if not isinstance(i, AllocsvcError)]
        self._service.check_batch(len(items))
        done = iter(await self._allocate_routed(valid))
        results = []
        for item in items:
            outcome, region = (item, "") if isinstance(item, AllocsvcError) else next(done)
            if isinstance(outcome, AllocsvcError):
                results.append(pb.AllocateResult(error=convert.item_error(outcome)))
            else:
                results.append(
                    pb.AllocateResult(allocation=convert.allocate_response(outcome, region))
                )
        return pb.AllocateBatchResponse(results=results)

    async def _allocate_routed(
        self, items: list[AllocationRequest]
    ) -> list[tuple[Allocation | AllocsvcError, str]]:
        """Each item allocated by its country's region (data residency), in request order."""
        if self._regions is None:
            return [(o, self._region) for o in await self._service.allocate_many(items)]
        by_region: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            country = (item.context or {}).get("country_code")
            by_region.setdefault(self._regions.map.for_country(country), []).append(i)
        out: list[tuple[Allocation | AllocsvcError, str]] = [(AllocsvcError(), "")] * len(items)
        for code, positions in by_region.items():
            service = self._regions.runtime(code).service
            outcomes = await service.allocate_many([items[i] for i in positions])
            for i, outcome in zip(positions, outcomes, strict=True):
                out[i] = (outcome, code)
        return out

    @maps_errors
    async def RecordConversion(
        self,
        request: pb.RecordConversionRequest,
        context: Context[pb.RecordConversionRequest, pb.RecordConversionResponse],
    ) -> pb.RecordConversionResponse:
        service, region = self._for_conversion(request)
        result = await service.record_conversion(convert.conversion_request(request))
        return convert.conversion_response(result, region)

    @maps_errors
    async def RecordConversionBatch(
        self,
        request: pb.RecordConversionBatchRequest,
        context: Context[pb.RecordConversionBatchRequest, pb.RecordConversionBatchResponse],
    ) -> pb.RecordConversionBatchResponse:
        self._service.check_batch(len(request.requests))
        items: list[ConversionRequest | AllocsvcError] = []
        for message in request.requests:
            try:
                items.append(convert.conversion_request(message))
            except AllocsvcError as exc:
                items.append(exc)
        valid = [i for i in items if not isinstance(i, AllocsvcError)]
        done = iter(await self._convert_routed(valid) if valid else [])
        results = []
        for item in items:
            outcome, region = (item, "") if isinstance(item, AllocsvcError) else next(done)
            if isinstance(outcome, AllocsvcError):
                results.append(pb.RecordConversionResult(error=convert.item_error(outcome)))
            else:
                results.append(
                    pb.RecordConversionResult(
                        conversion=convert.conversion_response(outcome, region)
                    )
                )
        return pb.RecordConversionBatchResponse(results=results)

    async def _convert_routed(
        self, items: list[ConversionRequest]
    ) -> list[tuple[ConversionResult | AllocsvcError, str]]:
        """Each conversion recorded by the region holding its assignment, in request order."""
        if self._regions is None:
            return [(o, self._region) for o in await self._service.record_conversions(items)]
        by_region: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            runtime = self._regions.for_conversion(
                item.assignment_id, item.experiment_key, item.user_id
            )
            by_region.setdefault(runtime.region.code, []).append(i)
        out: list[tuple[ConversionResult | AllocsvcError, str]] = [(AllocsvcError(), "")] * len(
            items
        )
        # Regions commit concurrently: one region's slow or down store does not hold the rest.
        codes = list(by_region)
        answers = await asyncio.gather(
            *(
                self._regions.runtime(code).service.record_conversions(
                    [items[i] for i in by_region[code]]
                )
                for code in codes
            ),
            return_exceptions=True,
        )
        for code, outcomes in zip(codes, answers, strict=True):
            if isinstance(outcomes, BaseException):
                if not isinstance(outcomes, AllocsvcError):
                    raise outcomes
                # That region's store refused the group (e.g. UNAVAILABLE): its items fail.
                outcomes = [outcomes] * len(by_region[code])
            for i, outcome in zip(by_region[code], outcomes, strict=True):
                out[i] = (outcome, code)
        return out


def add_allocator(servicer: AllocatorServicer, server: grpc.aio.Server) -> None:
    """Register the Allocator like the generated `add_AllocatorServicer_to_server`, except
    that Allocate and AllocateBatch take and return raw bytes (decoded and encoded in Rust)."""
    handlers = {
        "Allocate": grpc.unary_unary_rpc_method_handler(servicer.AllocateBytes),
        "AllocateBatch": grpc.unary_unary_rpc_method_handler(servicer.AllocateBatchBytes),
        "RecordConversion": grpc.unary_unary_rpc_method_handler(
            servicer.RecordConversion,
            request_deserializer=pb.RecordConversionRequest.FromString,
            response_serializer=pb.RecordConversionResponse.SerializeToString,
        ),
        "RecordConversionBatch": grpc.unary_unary_rpc_method_handler(
            servicer.RecordConversionBatch,
            request_deserializer=pb.RecordConversionBatchRequest.FromString,
            response_serializer=pb.RecordConversionBatchResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)  # type: ignore[attr-defined]
