"""Baseline of the load harness: a bare grpc.aio server with no allocation work.

It answers `Allocate`, `AllocateBatch` and `RecordConversion` of `allocsvc.v1.Allocator` with
constant responses of the real messages and sizes, on the same stack as the real server (grpc.aio,
the same event loop, SO_REUSEPORT, message limits) with health and the same method-aware
reflection, so ghz reaches both servers the same way. Requests are parsed into the generated
messages, as a plain servicer does.

    python bench/load/echo.py --port 50070 [--event-loop asyncio]

Logs one JSON line {"msg": "serving", "port": N} on stderr once listening; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Coroutine
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc._proto import allocsvc_pb2_grpc as pb_grpc
from allocsvc.api import reflection

ALLOCATION = pb.AllocateResponse(
    assignment_id="5f0c1e9a2b7d-1a2b3c",
    experiment_id="load-web",
    variant_id="B",
    variant_name="Green button",
    payload_json='{"color": "green", "text": "Buy now"}',
    segment_key="source:instagram|device:mobile",
    cascade_level=2,
    propensity=0.9375,
    sticky=False,
    region="local",
)
CONVERSION = pb.RecordConversionResponse(
    assignment_id="5f0c1e9a2b7d-1a2b3c", variant_id="B", counted=True
)


class EchoAllocator(pb_grpc.AllocatorServicer):
    def __init__(self) -> None:
        self._batches: dict[int, pb.AllocateBatchResponse] = {}

    async def Allocate(self, request: pb.AllocateRequest, context: Any) -> pb.AllocateResponse:
        return ALLOCATION

    async def AllocateBatch(
        self, request: pb.AllocateBatchRequest, context: Any
    ) -> pb.AllocateBatchResponse:
        size = len(request.requests)
        reply = self._batches.get(size)
        if reply is None:
            reply = pb.AllocateBatchResponse(
                results=[pb.AllocateResult(allocation=ALLOCATION)] * size
            )
            self._batches[size] = reply
        return reply

    async def RecordConversion(
        self, request: pb.RecordConversionRequest, context: Any
    ) -> pb.RecordConversionResponse:
        return CONVERSION


async def serve(host: str, port: int) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.so_reuseport", 1),
        ]
    )
    pb_grpc.add_AllocatorServicer_to_server(EchoAllocator(), server)  # type: ignore[no-untyped-call]
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    allocator = pb.DESCRIPTOR.services_by_name["Allocator"].full_name
    reflection.enable(server, (allocator, health.SERVICE_NAME))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    for name in ("", allocator):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    sys.stderr.write(json.dumps({"msg": "serving", "host": host, "port": bound}) + "\n")
    sys.stderr.flush()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    health_servicer.enter_graceful_shutdown()
    await server.stop(2)


def _run(coroutine: Coroutine[Any, Any, None], event_loop: str) -> None:
    if event_loop == "uvloop":
        import uvloop

        uvloop.run(coroutine)
    else:
        asyncio.run(coroutine)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--event-loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    _run(serve(args.host, args.port), args.event_loop)


if __name__ == "__main__":
    main()
