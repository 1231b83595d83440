"""Baseline for the gRPC benchmark: a bare grpc.aio server that does no allocation work.

It serves `allocsvc.v1.Allocator/Allocate` (and `AllocateBatch`) with a constant response of the
same message types and realistic size as the real server's, on the same grpc.aio stack, event
loop and server options, with health and reflection (for ghz). Whatever the real server's
throughput is below this one's is the cost of allocsvc's own work per request.

    python bench/echo_server.py --port 0

Logs one JSON line {"msg": "serving", "port": N} on stderr once listening; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc._proto import allocsvc_pb2_grpc as pb_grpc

# What the real server answers for the benchmark's experiment and context.
RESPONSE = pb.AllocateResponse(
    assignment_id="5f0c1e9a2b7d-1a2b3c",
    experiment_id="bench-checkout",
    variant_id="B",
    variant_name="Green button",
    payload_json='{"color": "green", "text": "Buy now"}',
    segment_key="source:instagram|device:mobile",
    cascade_level=2,
    propensity=0.9375,
    sticky=False,
    region="local",
)


class EchoAllocator(pb_grpc.AllocatorServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self._batches: dict[int, pb.AllocateBatchResponse] = {}

    async def Allocate(
        self, request: pb.AllocateRequest, context: grpc.aio.ServicerContext
    ) -> pb.AllocateResponse:
        return RESPONSE

    async def AllocateBatch(
        self, request: pb.AllocateBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.AllocateBatchResponse:
        size = len(request.requests)
        reply = self._batches.get(size)
        if reply is None:
            reply = pb.AllocateBatchResponse(
                results=[pb.AllocateResult(allocation=RESPONSE)] * size
            )
            self._batches[size] = reply
        return reply


async def serve(host: str, port: int) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            ("grpc.max_send_message_length", 16 * 1024 * 1024),
        ]
    )
    pb_grpc.add_AllocatorServicer_to_server(EchoAllocator(), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    allocator_name = pb.DESCRIPTOR.services_by_name["Allocator"].full_name
    reflection.enable_server_reflection(
        (allocator_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    for name in ("", allocator_name):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    sys.stderr.write(json.dumps({"msg": "serving", "host": host, "port": bound}) + "\n")
    sys.stderr.flush()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    health_servicer.enter_graceful_shutdown()
    await server.stop(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
