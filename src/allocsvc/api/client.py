"""A small synchronous Admin client for the CLI (the full client library is allocsvc.client)."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import json_format

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc._proto import allocsvc_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"


class AdminError(Exception):
    """An RPC failed; `code` is the gRPC status name."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


def as_dict(message: Any) -> dict[str, Any]:
    """A response as plain JSON-ready data (field names as in the .proto)."""
    data: dict[str, Any] = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return data


class AdminClient:
    def __init__(self, target: str = DEFAULT_TARGET, timeout: float = 60.0) -> None:
        self._channel = grpc.insecure_channel(target)
        self._stub = pb_grpc.AdminStub(self._channel)  # type: ignore[no-untyped-call]
        self._timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=self._timeout)
        except grpc.RpcError as exc:
            raise AdminError(exc.code().name, exc.details() or "") from None

    def get_tree(self, experiment_id: str, fmt: str) -> Any:
        return self._call("GetTree", pb.GetTreeRequest(experiment_id=experiment_id, format=fmt))

    def rebuild_tree(self, experiment_id: str) -> Any:
        return self._call("RebuildTree", pb.RebuildTreeRequest(experiment_id=experiment_id))

    def analyze(self, experiment_id: str, min_allocations: int = 0, alpha: float = 0.0) -> Any:
        return self._call(
            "AnalyzeSegments",
            pb.AnalyzeSegmentsRequest(
                experiment_id=experiment_id, min_allocations=min_allocations, alpha=alpha
            ),
        )

    def validate(self, experiment_id: str) -> Any:
        return self._call(
            "ValidateExperiment", pb.ValidateExperimentRequest(experiment_id=experiment_id)
        )

    def sample_size(self, **fields: Any) -> Any:
        return self._call("CalculateSampleSize", pb.CalculateSampleSizeRequest(**fields))
