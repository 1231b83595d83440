"""The public Allocator service."""

from __future__ import annotations

import grpc

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc._proto import allocsvc_pb2_grpc as pb_grpc
from allocsvc.allocation.service import AllocationRequest, AllocationService, ConversionRequest
from allocsvc.api import convert
from allocsvc.api.errors import maps_errors
from allocsvc.errors import AllocsvcError

Context = grpc.aio.ServicerContext


class AllocatorServicer(pb_grpc.AllocatorServicer):
    def __init__(self, service: AllocationService, region: str) -> None:
        self._service = service
        self._region = region

    @maps_errors
    async def Allocate(
        self, request: pb.AllocateRequest, context: Context[pb.AllocateRequest, pb.AllocateResponse]
    ) -> pb.AllocateResponse:
        allocation = await self._service.allocate(convert.allocate_request(request))
        return convert.allocate_response(allocation, self._region)

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
        done = iter(await self._service.allocate_many(valid))
        results = []
        for item in items:
            outcome = item if isinstance(item, AllocsvcError) else next(done)
            if isinstance(outcome, AllocsvcError):
                results.append(pb.AllocateResult(error=convert.item_error(outcome)))
            else:
                results.append(
                    pb.AllocateResult(allocation=convert.allocate_response(outcome, self._region))
                )
        return pb.AllocateBatchResponse(results=results)

    @maps_errors
    async def RecordConversion(
        self,
        request: pb.RecordConversionRequest,
        context: Context[pb.RecordConversionRequest, pb.RecordConversionResponse],
    ) -> pb.RecordConversionResponse:
        result = await self._service.record_conversion(convert.conversion_request(request))
        return convert.conversion_response(result)

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
        done = iter(await self._service.record_conversions(valid) if valid else [])
        results = []
        for item in items:
            outcome = item if isinstance(item, AllocsvcError) else next(done)
            if isinstance(outcome, AllocsvcError):
                results.append(pb.RecordConversionResult(error=convert.item_error(outcome)))
            else:
                results.append(
                    pb.RecordConversionResult(conversion=convert.conversion_response(outcome))
                )
        return pb.RecordConversionBatchResponse(results=results)
