"""The committed stubs in src/allocsvc/_proto/ match proto/ and load both services."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_services_are_registered_under_the_proto_path() -> None:
    from allocsvc._proto import allocsvc_pb2, allocsvc_pb2_grpc

    descriptor = allocsvc_pb2.DESCRIPTOR
    # Server reflection looks the file up by this name.
    assert descriptor.name == "allocsvc/v1/allocsvc.proto"
    assert descriptor.package == "allocsvc.v1"
    assert set(descriptor.services_by_name) == {"Allocator", "Admin"}
    assert set(descriptor.services_by_name["Allocator"].methods_by_name) == {
        "Allocate",
        "AllocateBatch",
        "RecordConversion",
        "RecordConversionBatch",
    }
    assert set(descriptor.services_by_name["Admin"].methods_by_name) >= {
        "CreateExperiment",
        "GetExperiment",
        "ListExperiments",
        "UpdateExperiment",
    }
    assert hasattr(allocsvc_pb2_grpc, "AllocatorServicer")
    assert hasattr(allocsvc_pb2_grpc, "add_AdminServicer_to_server")


def test_allocate_response_exposes_no_posterior_internals() -> None:
    from allocsvc._proto import allocsvc_pb2

    fields = set(allocsvc_pb2.AllocateResponse.DESCRIPTOR.fields_by_name)
    assert not {name for name in fields if "alpha" in name or "beta" in name or "score" in name}
