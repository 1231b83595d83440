"""The role table and the token check of allocsvc.api.auth."""

from __future__ import annotations

import pytest
from pydantic import SecretStr, ValidationError

from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc.api.auth import ADMIN_ROLES, AuthInterceptor, Role, bearer_token, required_role
from allocsvc.config import AuthSettings

pytestmark = pytest.mark.unit

SPEC_ADMIN_RPCS = {
    "CreateExperiment", "GetExperiment", "ListExperiments", "UpdateExperiment",
    "GetSegmentationConfig", "UpdateSegmentationConfig", "GetEligibility", "ListSegments",
    "ListRecommendations", "AcceptRecommendation", "DismissRecommendation", "RebuildTree",
    "GetTree", "TrainClusters", "GetClusteringStatus", "TrainEmbeddings", "FindSimilarUsers",
    "AnalyzeSegments", "CalculateSampleSize", "ValidateExperiment", "ExportUserData",
    "DeleteUserData",
}  # fmt: skip


def test_every_admin_rpc_has_a_role_and_unknown_ones_need_admin() -> None:
    assert set(ADMIN_ROLES) == SPEC_ADMIN_RPCS
    for method in pb.DESCRIPTOR.services_by_name["Admin"].methods:
        assert required_role(f"/allocsvc.v1.Admin/{method.name}") is not None
    assert required_role("/allocsvc.v1.Admin/SomethingAddedLater") is Role.ADMIN
    assert required_role("/allocsvc.v1.Admin/DeleteUserData") is Role.DATA_PROTECTION
    assert required_role("/allocsvc.v1.Admin/GetTree") is Role.READ_ONLY
    assert required_role("/allocsvc.v1.Allocator/Allocate") is Role.ALLOCATOR
    assert required_role("/grpc.health.v1.Health/Check") is None


def test_tokens_grant_their_roles() -> None:
    tokens = {name: SecretStr(f"{name}-0123456789abcdef") for name in ("ro", "adm", "dp")}
    interceptor = AuthInterceptor(
        AuthSettings(
            read_only_tokens=(tokens["ro"],),
            admin_tokens=(tokens["adm"],),
            data_protection_tokens=(tokens["dp"], tokens["ro"]),
        )
    )

    def roles(name: str) -> frozenset[Role] | None:
        return interceptor.roles(tokens[name].get_secret_value().encode())

    assert roles("ro") == {Role.READ_ONLY, Role.DATA_PROTECTION}
    assert roles("adm") == {Role.ADMIN, Role.READ_ONLY}
    assert interceptor.roles(b"adm-0123456789abcdeX") is None
    assert interceptor.roles(b"") is None
    assert not interceptor.open


def test_bearer_token_parsing() -> None:
    assert bearer_token([("authorization", "Bearer abc")]) == b"abc"
    assert bearer_token([("authorization", "bearer  abc ")]) == b"abc"
    assert bearer_token([("authorization", "Basic abc")]) is None
    assert bearer_token([("authorization", "Bearer ")]) is None
    assert bearer_token([("x-other", "Bearer abc")]) is None
    assert bearer_token(None) is None


def test_short_tokens_are_refused() -> None:
    with pytest.raises(ValidationError, match="admin_tokens"):
        AuthSettings(admin_tokens=(SecretStr("short"),))
    assert AuthInterceptor(AuthSettings()).open
