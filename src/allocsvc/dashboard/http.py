"""One HTTP server (stdlib WSGI, threaded) for `/metrics`, the dashboard and its JSON API.

Routes: `/metrics` (Prometheus), `/` (experiments), `/experiments/<id>` (one experiment),
`/experiments/<id>/tree` (its segment tree), `/api/experiments`, `/api/experiments/<id>`,
`/healthz`. Everything else is 404; only GET and HEAD are served (the dashboard is read-only).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Callable, Coroutine, Iterable
from socketserver import ThreadingMixIn
from typing import Any, TypeVar
from urllib.parse import unquote
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.registry import CollectorRegistry

from allocsvc.dashboard import page
from allocsvc.dashboard.data import DashboardData
from allocsvc.errors import NotFound

T = TypeVar("T")
StartResponse = Callable[[str, list[tuple[str, str]]], Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

# Longest wait for the event loop to answer a page (it may be busy serving RPCs).
LOOP_TIMEOUT_S = 10.0


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Access logs would flood the server's JSON log; Prometheus scrapes often."""


def _respond(
    start: StartResponse, status: str, content_type: str, body: str | bytes
) -> list[bytes]:
    data = body.encode() if isinstance(body, str) else body
    start(
        status,
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(data))),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
        ],
    )
    return [data]


class DashboardApp:
    """The WSGI application. Data is gathered on `loop` (the server's event loop)."""

    def __init__(
        self,
        data: DashboardData | None,
        loop: asyncio.AbstractEventLoop,
        registry: CollectorRegistry,
    ) -> None:
        self._data = data
        self._loop = loop
        self._metrics = make_wsgi_app(registry)

    def _on_loop(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        return asyncio.run_coroutine_threadsafe(make(), self._loop).result(LOOP_TIMEOUT_S)

    def __call__(self, environ: dict[str, Any], start: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            body: Iterable[bytes] = self._metrics(environ, start)
            return body
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            return _respond(start, "405 Method Not Allowed", "text/plain", "read-only\n")
        if path == "/healthz":
            return _respond(start, "200 OK", "text/plain", "ok\n")
        data = self._data
        if data is None:
            return _respond(start, "404 Not Found", "text/plain", "dashboard disabled\n")
        try:
            return self._route(data, path, start)
        except NotFound as exc:
            return self._error(path, start, "404 Not Found", str(exc))
        except (TimeoutError, RuntimeError) as exc:
            # The loop is busy beyond LOOP_TIMEOUT_S, or already closed (shutting down).
            return self._error(path, start, "503 Service Unavailable", str(exc) or "busy")

    def _error(self, path: str, start: StartResponse, status: str, message: str) -> list[bytes]:
        if path.startswith("/api/"):
            return _respond(start, status, "application/json", json.dumps({"error": message}))
        return _respond(start, status, "text/html; charset=utf-8", page.error_page(status, message))

    def _route(self, data: DashboardData, path: str, start: StartResponse) -> list[bytes]:
        html = "text/html; charset=utf-8"
        parts = [unquote(p) for p in path.strip("/").split("/")] if path != "/" else []
        match parts:
            case []:
                return _respond(
                    start, "200 OK", html, page.overview_page(self._on_loop(data.overview))
                )
            case ["api", "experiments"]:
                return _json(start, self._on_loop(data.overview))
            case ["api", "experiments", key]:
                return _json(start, self._on_loop(lambda: data.experiment(key)))
            case ["experiments", key]:
                found = self._on_loop(lambda: data.experiment(key))
                has_tree = bool(found["segment_by"])
                return _respond(start, "200 OK", html, page.experiment_page(found, has_tree))
            case ["experiments", key, "tree"]:
                tree = self._on_loop(lambda: data.tree_html(key))
                if tree is None:
                    raise NotFound(f"experiment {key!r} has no segment tree")
                return _respond(start, "200 OK", html, tree)
        raise NotFound(f"no page at {path}")


def _json(start: StartResponse, value: object) -> list[bytes]:
    return _respond(start, "200 OK", "application/json", json.dumps(value))


def serve(host: str, port: int, app: WsgiApp) -> WSGIServer:
    """Serve `app` on host:port from a daemon thread; `shutdown()` on the result stops it."""
    kind = _ThreadingServer6 if ":" in host else _ThreadingServer
    server = make_server(host, port, app, kind, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
