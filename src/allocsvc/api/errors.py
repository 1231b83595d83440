"""Domain errors to gRPC status codes, in one place."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from allocsvc.errors import (
    AllocsvcError,
    AlreadyExists,
    FailedPrecondition,
    InvalidRequest,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from allocsvc.logs import request_id_trailer

log = logging.getLogger(__name__)

_CODES: dict[type[AllocsvcError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def status_code(exc: AllocsvcError) -> grpc.StatusCode:
    for kind in type(exc).__mro__:
        code = _CODES.get(kind)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def status_number(exc: AllocsvcError) -> int:
    """The numeric status code, as batch items carry it."""
    value: tuple[int, str] = status_code(exc).value
    return value[0]


def field_of(exc: AllocsvcError) -> str:
    return exc.field if isinstance(exc, InvalidRequest) else ""


Request = TypeVar("Request")
Response = TypeVar("Response")
Servicer = TypeVar("Servicer")


def maps_errors(
    method: Callable[
        [Servicer, Request, grpc.aio.ServicerContext[Request, Response]], Awaitable[Response]
    ],
) -> Callable[
    [Servicer, Request, grpc.aio.ServicerContext[Request, Response]], Awaitable[Response]
]:
    """Turn domain errors into their status; anything else into INTERNAL without details.
    Either answer carries the request id in its trailing metadata."""

    @functools.wraps(method)
    async def wrapper(
        self: Servicer, request: Request, context: grpc.aio.ServicerContext[Request, Response]
    ) -> Response:
        try:
            return await method(self, request, context)
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception as exc:
            await abort_for(exc, context, method.__qualname__)
        raise AssertionError("abort returned")  # pragma: no cover

    return wrapper


async def abort_for(
    exc: Exception, context: grpc.aio.ServicerContext[Any, Any], where: str
) -> NoReturn:
    """End the call as `maps_errors` ends it on `exc`: a domain error's status and message, or
    INTERNAL without details (logged, naming `where`)."""
    if isinstance(exc, AllocsvcError):
        await context.abort(status_code(exc), str(exc), request_id_trailer())
    else:
        log.error("unexpected error in %s", where, exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error", request_id_trailer())
    raise AssertionError("abort returned")  # pragma: no cover


# The attribute under which `tries_first` leaves its two parts for the telemetry wrapper.
ANSWERS_FIRST = "answers_first"


def tries_first(
    first_try: str,
    otherwise: Callable[
        [Servicer, Request, grpc.aio.ServicerContext[Request, Response]], Awaitable[Response]
    ],
) -> Callable[
    [Servicer, Request, grpc.aio.ServicerContext[Request, Response]], Awaitable[Response]
]:
    """A unary servicer method that answers with `getattr(self, first_try)(request)` (the
    name of a synchronous callable: a method, or one the servicer made, such as a Rust
    method; None declines) and, when that declines, with `otherwise` (a `maps_errors`
    method); errors of either end the call as `maps_errors` ends them. The telemetry wrapper
    (allocsvc.api.telemetry) calls the two parts itself, from the attribute ANSWERS_FIRST:
    that spares the calls `first_try` answers two coroutines and their frames."""

    @maps_errors
    async def method(
        self: Servicer, request: Request, context: grpc.aio.ServicerContext[Request, Response]
    ) -> Response:
        answer: Response | None = getattr(self, first_try)(request)
        if answer is not None:
            return answer
        return await otherwise(self, request, context)

    setattr(method, ANSWERS_FIRST, (first_try, otherwise))
    return method
