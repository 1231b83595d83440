"""Per-RPC request ids, deadlines, metrics and debug logs.

Every unary RPC gets a request id (the client's `x-request-id` metadata when it sends a
usable one, a fresh one otherwise) that every log line written while serving it carries.
The client's is read from the metadata grpc looks the handler up with (`client_named`), not
built again from the call's context, which costs a unary call about 10k instructions
(bench/RESULTS.md, item 53). A fresh one is drawn only when something asks for it: a server
started by `start_serving` begins every call UNNAMED (allocsvc.logs), and a log line, a
trailer or a handler that awaits (whose tasks share the call's id) draws its number. It goes
back in the trailing metadata when the client sent it, and on every failed call (whose error
the server logs), but not on a successful call the client did not tag: a trailer costs grpc
about 50 µs of CPU per call, an eighth of a bare unary call (bench/RESULTS.md), and such a
call leaves no log line to find. An RPC whose deadline has already passed when its turn
comes is answered DEADLINE_EXCEEDED without doing the work. With metrics on, each RPC is
counted and timed by method and status code.

The same wrapper goes around each handler in one of two ways. `registering(server)` wraps the
handlers once, as they are registered: no interceptor runs per call (grpc.aio's interceptor
chain costs tens of microseconds per RPC). As a server interceptor it wraps them on lookup; the
server uses that only when another interceptor (auth) must run inside this one.
"""

from __future__ import annotations

import asyncio
import bisect
import contextvars
import inspect
import itertools
import logging
import operator
import re
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, cast

import grpc
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from allocsvc import logs
from allocsvc._proto import allocsvc_pb2 as pb
from allocsvc.api.errors import ANSWERS_FIRST, abort_for
from allocsvc.api.registration import ServerView
from allocsvc.logs import REQUEST_ID_KEY

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    Interceptor = grpc.aio.ServerInterceptor[Any, Any]
    Generic = grpc.GenericRpcHandler[Any, Any]
else:
    Interceptor = grpc.aio.ServerInterceptor
    Generic = grpc.GenericRpcHandler

_USABLE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_KEY = operator.itemgetter(0)
# Latency buckets in seconds: from tens of microseconds (in-memory allocation) to seconds.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)


class RpcMetrics(Collector):
    """RPC counts and latency histograms by method and status code.

    Kept as plain numbers on the event loop and turned into Prometheus families when scraped:
    prometheus_client's Counter and Histogram (a lock and a bucket search each) cost about
    6 µs per call, more than the rest of the wrapper. Only the telemetry wrapper writes, on the
    event loop, into its method's `slots`; a scrape (another thread) copies each slot under the
    GIL."""

    def __init__(self) -> None:
        # method -> code -> [seconds, one count per bucket of LATENCY_BUCKETS, +Inf] (the calls:
        # the buckets' sum; codes named when scraped: an enum's `name` is a Python property)
        self._slots: dict[str, dict[grpc.StatusCode, list[float]]] = {}

    def slots(self, method: str) -> dict[grpc.StatusCode, list[float]]:
        """The slots of `method`, which the telemetry wrapper of its handler counts into."""
        return self._slots.setdefault(method, {})

    def collect(self) -> Iterator[Metric]:
        calls = CounterMetricFamily(
            "allocsvc_rpcs", "RPCs answered, by method and status code", labels=["method", "code"]
        )
        latency = HistogramMetricFamily(
            "allocsvc_rpc_latency_seconds",
            "Time from the start of the handler to its answer, by method and status code",
            labels=["method", "code"],
        )
        for method, by_code in list(self._slots.items()):
            for status, slot in list(by_code.items()):
                total, *per_bucket = list(slot)
                code = status.name
                calls.add_metric([method, code], sum(per_bucket))
                cumulative = list(itertools.accumulate(per_bucket))
                buckets = [(str(b), c) for b, c in zip(LATENCY_BUCKETS, cumulative, strict=False)]
                latency.add_metric([method, code], [*buckets, ("+Inf", cumulative[-1])], total)
        yield calls
        yield latency


# Methods registered on the wire format (allocsvc.api.allocator): their request messages.
RAW_REQUESTS = {"Allocate": pb.AllocateRequest}


def _user_id(method: str, request: Any) -> str:
    """The user a request is about, for the debug line (parsed only when that line is written)."""
    if isinstance(request, bytes):
        message = RAW_REQUESTS.get(method)
        try:
            return message.FromString(request).user_id if message is not None else ""
        except Exception:  # the handler answered a malformed request already
            return ""
    return str(getattr(request, "user_id", ""))


Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


class TelemetryInterceptor(Interceptor):
    def __init__(self, metrics: RpcMetrics | None, gated: Iterable[str] = ()) -> None:
        """`gated`: services answered UNAVAILABLE until `ready` is set (the state is loaded)."""
        self._metrics = metrics
        self._gated = tuple(f"/{name}/" for name in gated)
        self.ready = False
        self._wrapped: dict[tuple[str, int, bool], tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        client_named(handler_call_details.invocation_metadata)
        return self.wrap(handler_call_details.method, await continuation(handler_call_details))

    def registering(self, server: grpc.aio.Server) -> grpc.aio.Server:
        """`server`, except that the handlers registered through the result are wrapped."""
        return _Instrumenting(server, self)

    def wrap(self, method: str, handler: Handler, looked_up: bool = True) -> Handler:
        """The handler of `method` with request id, gate, deadline check and metrics.
        `looked_up`: found through a lookup that named the call from the client's id (the
        generic handlers, the interceptor); grpc's registered methods are not."""
        # Handlers are long-lived objects (the service's own, or the auth interceptor's
        # refusals), a few per method; the cache keeps each one alive, so its id stays its own.
        # Looked up first: this runs on every call.
        slot = (method, id(handler), looked_up)
        cached = self._wrapped.get(slot)
        if cached is not None:
            return cached[1]
        if handler is None or not inspect.iscoroutinefunction(handler.unary_unary):
            # Streaming RPCs (reflection, health Watch) and the health service's synchronous
            # Check pass through untouched.
            return handler
        wrapped = grpc.unary_unary_rpc_method_handler(
            self._observed(
                method,
                cast("Behavior", handler.unary_unary),
                method.startswith(self._gated),
                looked_up,
            ),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        self._wrapped[slot] = (handler, wrapped)
        return wrapped

    def _observed(self, method: str, behavior: Behavior, gated: bool, looked_up: bool) -> Behavior:
        metrics = self._metrics
        interceptor = self
        short = method.rsplit("/", 1)[-1]
        # A servicer's method made by `tries_first` is taken apart: its synchronous first try
        # runs in this frame, and the rest is awaited only when that declines.
        first_try: Callable[[Any], Any] | None = None
        parts = getattr(behavior, ANSWERS_FIRST, None)
        servicer = getattr(behavior, "__self__", None)
        if parts is not None and servicer is not None:
            first_try, behavior = getattr(servicer, parts[0]), parts[1].__get__(servicer)
        # What every call uses, bound here: each call then looks up no module attribute.
        request_id, clock, ok = logs.request_id, time.perf_counter, grpc.StatusCode.OK
        unnamed, drawn_number = logs.UNNAMED, logs.drawn_number
        bucket_of = bisect.bisect_left
        debug_on, debug = log.isEnabledFor, logging.DEBUG
        # The method's slots of `metrics` by status code (None: metrics off), and its OK slot
        # once counted: a StatusCode hashes in Python (enum's __hash__), a frame every call.
        slots = None if metrics is None else metrics.slots(short)
        ok_slot: list[float] | None = None

        async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            nonlocal ok_slot
            # The client's id was set where grpc found the handler, in this call's task
            # (`client_named`); else the call is UNNAMED (`start_serving`), its number drawn
            # when something asks. Without a lookup, or a server started otherwise: here.
            rid = request_id.get()
            token = None
            if rid is None or not looked_up:
                token = client_named(context.invocation_metadata())
                if token is None and rid is None:
                    token = request_id.set(next(logs.REQUEST_NUMBERS))
                rid = request_id.get()
            if isinstance(rid, str):
                context.set_trailing_metadata(((REQUEST_ID_KEY, rid),))
            start = clock()
            code = ok
            try:
                if gated and not interceptor.ready:
                    code = grpc.StatusCode.UNAVAILABLE
                    await context.abort(
                        code, "starting: the state is still loading", logs.request_id_trailer()
                    )
                remaining = context.time_remaining()
                if remaining is not None and remaining <= 0:
                    code = grpc.StatusCode.DEADLINE_EXCEEDED
                    await context.abort(
                        code, "the deadline passed before the work began", logs.request_id_trailer()
                    )
                if first_try is not None:
                    try:
                        answer = first_try(request)
                    except Exception as exc:
                        await abort_for(exc, context, short)
                    if answer is not None:
                        return answer
                if rid == unnamed:
                    # Tasks the awaited part starts carry the call's id.
                    request_id.set(drawn_number())
                return await behavior(request, context)
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:
                if context.done():
                    # The call ended while the handler ran without yielding (its deadline
                    # passed, or the client left): what failed is the answer nobody can get.
                    code = _ended(context)
                    raise
                # grpc answers UNKNOWN once this propagates, with the trailer set here.
                code = grpc.StatusCode.UNKNOWN
                log.error("rpc failed", exc_info=True, extra={"method": short})
                context.set_trailing_metadata(logs.request_id_trailer())
                raise
            finally:
                elapsed = clock() - start
                if slots is not None:
                    # Counted here, not in a method of RpcMetrics: a call less on every RPC.
                    slot = ok_slot if code is ok else None
                    if slot is None:
                        slot = slots.get(code)
                        if slot is None:
                            slot = slots[code] = [0.0] * (len(LATENCY_BUCKETS) + 2)
                        if code is ok:
                            ok_slot = slot
                    slot[0] += elapsed
                    # `le` buckets: the first bound >= elapsed (past the last one: +Inf only).
                    slot[1 + bucket_of(LATENCY_BUCKETS, elapsed)] += 1
                if debug_on(debug):
                    user_id = _user_id(short, request)
                    log.debug(
                        "rpc",
                        extra={
                            "method": short,
                            "code": code.name,
                            "ms": round(elapsed * 1000, 3),
                            "user": logs.pseudonym(user_id) if user_id else None,
                        },
                    )
                if token is not None:
                    logs.request_id.reset(token)

        return observed


def client_named(
    metadata: Collection[tuple[str, str | bytes]] | None,
) -> contextvars.Token[Any] | None:
    """Set the request id of the call whose metadata this is to the client's, when it sent a
    usable one (None otherwise: the call keeps the id it has).

    grpc.aio looks a call's handler up and runs it in the same task, a context of its own:
    set while the handler is looked up, the id is the handler's and no other call's."""
    # Most calls carry no id: looked for without a Python loop over their metadata first.
    if metadata and REQUEST_ID_KEY in map(_KEY, metadata):
        for key, value in metadata:
            if key == REQUEST_ID_KEY and isinstance(value, str) and _USABLE_ID.fullmatch(value):
                return logs.request_id.set(value)
    return None


async def start_serving(server: grpc.aio.Server) -> None:
    """Start `server` with every call it serves UNNAMED (allocsvc.logs): grpc.aio starts each
    call's task from the serving task `start` creates, whose context this sets, and nothing
    else's: the caller's context is left as it was."""

    async def start() -> None:
        logs.request_id.set(logs.UNNAMED)
        await server.start()

    await asyncio.create_task(start())


def _ended(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    """The status of a call that ended under its handler: its deadline's, or the client's
    cancellation."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


# What `grpc.method_handlers_generic_handler` builds: a service's handlers by method name.
_BY_NAME = type(grpc.method_handlers_generic_handler("", {}))


class _InstrumentedGeneric(Generic):
    def __init__(self, inner: Generic, telemetry: TelemetryInterceptor) -> None:
        self._inner = inner
        self._telemetry = telemetry
        # grpc looks a call's handler up on every call. One found by name alone is wrapped
        # once and then found here (names of no handler are not kept: any client sends them).
        self._by_name: dict[str, Handler] | None = {} if type(inner) is _BY_NAME else None

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        metadata = handler_call_details.invocation_metadata
        # `client_named`'s first test, here: most calls carry no id, and need no frame more.
        if metadata and REQUEST_ID_KEY in map(_KEY, metadata):
            client_named(metadata)
        method = handler_call_details.method
        by_name = self._by_name
        if by_name is not None:
            known = by_name.get(method)
            if known is not None:
                return known
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        wrapped = self._telemetry.wrap(method, handler)
        if by_name is not None:
            by_name[method] = wrapped
        return wrapped


class _Instrumenting(ServerView):
    """Registers handlers on `server` wrapped by the telemetry; everything else is the server's."""

    def __init__(self, server: grpc.aio.Server, telemetry: TelemetryInterceptor) -> None:
        super().__init__(server)
        self._telemetry = telemetry

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Iterable[Generic]) -> None:
        super().add_generic_rpc_handlers(
            [_InstrumentedGeneric(h, self._telemetry) for h in generic_rpc_handlers]
        )

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, Handler]
    ) -> None:
        wrap = self._telemetry.wrap
        super().add_registered_method_handlers(
            service_name,
            {
                name: wrap(f"/{service_name}/{name}", h, looked_up=False)
                for name, h in method_handlers.items()
            },
        )
