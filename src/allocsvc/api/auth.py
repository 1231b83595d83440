"""Bearer-token authentication and role checks for the gRPC services.

A client sends `authorization: Bearer <token>` metadata. Tokens come from the `auth` settings
section and are compared in constant time (hmac.compare_digest, against every configured
token, so the time does not tell which one matched). No token, or an unknown one, is
UNAUTHENTICATED; a known token without the role the RPC needs is PERMISSION_DENIED.

Which role each Admin RPC needs (an Admin RPC missing from this table needs `admin`, the
strictest role, so a new RPC is never open by accident):

| role              | granted by              | Admin RPCs                                        |
|-------------------|-------------------------|---------------------------------------------------|
| `read-only`       | read-only, admin tokens | GetExperiment, ListExperiments,                   |
|                   |                         | GetSegmentationConfig, GetEligibility,            |
|                   |                         | ListSegments, ListRecommendations, GetTree,       |
|                   |                         | AnalyzeSegments, CalculateSampleSize,             |
|                   |                         | ValidateExperiment, GetClusteringStatus           |
| `admin`           | admin tokens            | CreateExperiment, UpdateExperiment,               |
|                   |                         | UpdateSegmentationConfig, AcceptRecommendation,   |
|                   |                         | DismissRecommendation, RebuildTree,               |
|                   |                         | TrainClusters, TrainEmbeddings, FindSimilarUsers  |
|                   |                         | (it returns user ids), and every RPC not named    |
| `data-protection` | data-protection tokens  | ExportUserData, DeleteUserData                    |

The `Allocator` service is open unless `allocator_tokens` is set; then every Allocator RPC
needs one of those tokens. Health and reflection are always open.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import grpc

from allocsvc.config import AuthSettings
from allocsvc.logs import request_id_trailer

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    Interceptor = grpc.aio.ServerInterceptor

ADMIN_SERVICE = "allocsvc.v1.Admin"
ALLOCATOR_SERVICE = "allocsvc.v1.Allocator"


class Role(StrEnum):
    READ_ONLY = "read-only"
    ADMIN = "admin"
    DATA_PROTECTION = "data-protection"
    ALLOCATOR = "allocator"


ADMIN_ROLES: dict[str, Role] = {
    **dict.fromkeys(
        (
            "GetExperiment",
            "ListExperiments",
            "GetSegmentationConfig",
            "GetEligibility",
            "ListSegments",
            "ListRecommendations",
            "GetTree",
            "AnalyzeSegments",
            "CalculateSampleSize",
            "ValidateExperiment",
            "GetClusteringStatus",
        ),
        Role.READ_ONLY,
    ),
    **dict.fromkeys(
        (
            "CreateExperiment",
            "UpdateExperiment",
            "UpdateSegmentationConfig",
            "AcceptRecommendation",
            "DismissRecommendation",
            "RebuildTree",
            "TrainClusters",
            "TrainEmbeddings",
            "FindSimilarUsers",
        ),
        Role.ADMIN,
    ),
    **dict.fromkeys(("ExportUserData", "DeleteUserData"), Role.DATA_PROTECTION),
}


def required_role(method: str) -> Role | None:
    """The role a full method name (`/package.Service/Method`) needs; None: open."""
    service, _, name = method.lstrip("/").partition("/")
    if service == ADMIN_SERVICE:
        return ADMIN_ROLES.get(name, Role.ADMIN)
    if service == ALLOCATOR_SERVICE:
        return Role.ALLOCATOR
    return None


def _grants(settings: AuthSettings) -> list[tuple[bytes, frozenset[Role]]]:
    """Each configured token with the roles it grants (a token may be in several lists)."""
    by_token: dict[bytes, set[Role]] = {}
    for tokens, roles in (
        (settings.read_only_tokens, {Role.READ_ONLY}),
        (settings.admin_tokens, {Role.ADMIN, Role.READ_ONLY}),
        (settings.data_protection_tokens, {Role.DATA_PROTECTION}),
        (settings.allocator_tokens, {Role.ALLOCATOR}),
    ):
        for token in tokens:
            by_token.setdefault(token.get_secret_value().encode(), set()).update(roles)
    return [(token, frozenset(roles)) for token, roles in by_token.items()]


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> bytes | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip().encode("latin-1", "replace")
    return None


class AuthInterceptor(Interceptor):
    """Rejects RPCs whose bearer token lacks the role `required_role` names."""

    def __init__(self, settings: AuthSettings) -> None:
        self._grants = _grants(settings)
        self._admin_open = not (
            settings.read_only_tokens or settings.admin_tokens or settings.data_protection_tokens
        )
        self._allocator_open = not settings.allocator_tokens
        # Nothing to check at all: the server leaves this interceptor out.
        self.open = self._admin_open and self._allocator_open
        # One refusing handler per (method, code), made once.
        self._refusals: dict[tuple[str, grpc.StatusCode], Handler] = {}
        if self._admin_open:
            log.warning("no admin tokens configured: the Admin service is open to anyone")

    def roles(self, token: bytes) -> frozenset[Role] | None:
        """The roles of a token; None when it is not a configured token."""
        found: frozenset[Role] | None = None
        for known, roles in self._grants:
            # No early exit: the time taken does not depend on which token matched.
            if hmac.compare_digest(known, token):
                found = roles
        return found

    def _open(self, role: Role) -> bool:
        if role is Role.ALLOCATOR:
            return self._allocator_open
        return self._admin_open

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        method: str = handler_call_details.method
        role = required_role(method)
        if role is None or self._open(role):
            return await continuation(handler_call_details)
        token = bearer_token(handler_call_details.invocation_metadata)
        roles = None if token is None else self.roles(token)
        if roles is not None and role in roles:
            return await continuation(handler_call_details)
        code = (
            grpc.StatusCode.UNAUTHENTICATED if roles is None else grpc.StatusCode.PERMISSION_DENIED
        )
        log.info("rpc refused", extra={"method": method, "code": code.name, "role": str(role)})
        refusal = self._refusals.get((method, code))
        if refusal is None:
            handler = await continuation(handler_call_details)
            if handler is None:
                return handler
            message = (
                "missing or invalid bearer token"
                if roles is None
                else f"this token does not grant the {role} role"
            )
            refusal = _refusal(handler, code, message)
            self._refusals[(method, code)] = refusal
        return refusal


def _refusal(handler: Handler, code: grpc.StatusCode, message: str) -> Any:
    """A handler of the same kind as the real one that only answers `code`."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message, request_id_trailer())

    async def refuse_stream(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message, request_id_trailer())
        yield  # pragma: no cover  (makes this an async generator, as streaming handlers are)

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse_stream)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse)
    return grpc.stream_stream_rpc_method_handler(refuse_stream)
