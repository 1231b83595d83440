"""Baseline of the load harness: a bare grpc.aio server with no allocation work.

It answers `Allocate`, `AllocateBatch` and `RecordConversion` of `allocsvc.v1.Allocator` with
constant responses of the real messages and sizes, on the same stack as the real server (grpc.aio,
the same event loop, SO_REUSEPORT, the same number of servers on the port (allocsvc's
`accept_loops`), message limits, bound on waiting calls) with health and the
same method-aware reflection, so ghz reaches both servers the same way.

Like allocsvc, it registers every service through its generic handler alone
(`allocsvc.api.registration.GenericOnly`): a registered method costs grpc.aio a waiting task
on every call (RESULTS.md item 4), about 22k instructions a call here with health's and
reflection's (item 50); until 2026-11-25 echo paid that and allocsvc did not.

It does no work per call: its handlers take and return bytes (registered without protobuf
(de)serializers, as allocsvc registers Allocate and AllocateBatch) and answer pre-serialized
responses. A batch's answer has as many results as the request has items; it is serialized
once per request size (load generators send one serialized request again and again), so the
batch rows measure what gRPC itself costs for messages of that size. (Until 2026-11-22 it
parsed every request and serialized every response with protobuf: 1,000-item batches then
cost it about three times the CPU of answering bytes.)

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
from allocsvc.api import reflection
from allocsvc.api.registration import GenericOnly, ServerGroup
from allocsvc.config import BackpressureSettings, Settings

ACCEPT_LOOPS: int = Settings.model_fields["accept_loops"].default
WAITING_CALLS: int = BackpressureSettings.model_fields["max_waiting_calls"].default

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


class EchoAllocator:
    """Pre-serialized answers; the batch answer by request size (its item count is read, with
    protobuf, the first time a size is seen)."""

    def __init__(self) -> None:
        self._allocation = ALLOCATION.SerializeToString()
        self._conversion = CONVERSION.SerializeToString()
        self._batches: dict[int, bytes] = {}

    async def allocate(self, request: bytes, context: Any) -> bytes:
        return self._allocation

    async def allocate_batch(self, request: bytes, context: Any) -> bytes:
        reply = self._batches.get(len(request))
        if reply is None:
            size = len(pb.AllocateBatchRequest.FromString(request).requests)
            reply = pb.AllocateBatchResponse(
                results=[pb.AllocateResult(allocation=ALLOCATION)] * size
            ).SerializeToString()
            self._batches[len(request)] = reply
        return reply

    async def record_conversion(self, request: bytes, context: Any) -> bytes:
        return self._conversion

    def handler(self, service: str) -> grpc.GenericRpcHandler[Any, Any]:
        bare = grpc.unary_unary_rpc_method_handler
        return grpc.method_handlers_generic_handler(
            service,
            {
                "Allocate": bare(self.allocate),
                "AllocateBatch": bare(self.allocate_batch),
                "RecordConversion": bare(self.record_conversion),
            },
        )


async def serve(host: str, port: int, accept_loops: int) -> None:
    # As allocsvc serves: `accept_loops` servers on the port, each taking calls on its own,
    # with allocsvc's default bound on calls waiting for the event loop (gRPC's own refuses
    # some from 1,000).
    server = GenericOnly(
        ServerGroup.sharing(
            accept_loops,
            options=[
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ],
            max_waiting_calls=WAITING_CALLS,
        )
    )
    allocator = pb.DESCRIPTOR.services_by_name["Allocator"].full_name
    server.add_generic_rpc_handlers([EchoAllocator().handler(allocator)])
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
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
    parser.add_argument(
        "--accept-loops",
        type=int,
        default=ACCEPT_LOOPS,
        help="gRPC servers on the port (allocsvc's accept_loops; its default here)",
    )
    args = parser.parse_args()
    _run(serve(args.host, args.port, args.accept_loops), args.event_loop)


if __name__ == "__main__":
    main()
