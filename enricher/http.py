"""The HTTP server on the metrics port: ``/metrics``, ``/healthz``, ``/readyz``, plus the routes
other parts register (the session API, ``/v1/``).

It is :mod:`http.server` (one thread per connection, HTTP/1.0: one request per connection),
bounded for a port that may be reachable from more than the scraper:

* a request body is read only for a route registered with ``takes_body=True``, and never
  beyond ``max_body_bytes`` (413, answered before anything is read); a negative, non-numeric,
  absurd or conflicting ``Content-Length`` is a 400, a ``Transfer-Encoding`` a 501;
* every socket operation times out (``timeout``) and a connection is cut once it has lasted
  ``deadline`` seconds, so a slow client cannot hold a thread;
* at most ``max_connections`` connections are served at once; one more is answered 503 and
  closed; the listen backlog is ``backlog``;
* a route that raises gets a JSON 503 (Redis or another dependency unreachable) or 500, never a
  traceback; the traceback goes to the ``enricher.http`` logger, as does everything
  :mod:`http.server` and :mod:`socketserver` would print on stderr;
* no ``Server`` header.
"""

from __future__ import annotations

import json
import logging
import math
import re
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import redis
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from enricher.errors import Unavailable
from enricher.metrics import Metrics

log = logging.getLogger("enricher.http")

Response = tuple[int, str, bytes]
Route = Callable[[str, str, dict[str, str], bytes], Response]

MAX_BODY_BYTES = 64 * 1024
TIMEOUT_SECONDS = 10.0
DEADLINE_SECONDS = 30.0
MAX_CONNECTIONS = 32
BACKLOG = 128
_CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")
_UNAVAILABLE = (Unavailable, redis.RedisError, redis.exceptions.RedisClusterException)


def _json(status: int, body: dict[str, Any]) -> Response:
    return status, "application/json", json.dumps(body).encode()


def _not_found(method: str, path: str, headers: dict[str, str], body: bytes) -> Response:
    return _json(404, {"error": "not found"})


class HttpServer:
    """``/metrics``, ``/healthz``, ``/readyz``, plus routes other parts register."""

    def __init__(
        self,
        metrics: Metrics,
        ready: Callable[[], tuple[bool, dict[str, Any]]],
        live: Callable[[], tuple[bool, dict[str, Any]]] = lambda: (True, {}),
        *,
        max_body_bytes: int = MAX_BODY_BYTES,
        timeout: float = TIMEOUT_SECONDS,
        deadline: float = DEADLINE_SECONDS,
        max_connections: int = MAX_CONNECTIONS,
        backlog: int = BACKLOG,
    ) -> None:
        self.metrics = metrics
        self.ready = ready
        self.live = live
        self.routes: list[tuple[str, Route, bool]] = []
        self.alive_at = time.monotonic()
        self.alive_window = 120.0
        self.max_body_bytes = max_body_bytes
        self.timeout = timeout
        self.deadline = deadline
        self.max_connections = max_connections
        self.backlog = backlog
        self._server: _Server | None = None

    def heartbeat(self) -> None:
        """The main loop is alive (``/healthz`` fails once it stops beating for long)."""
        self.alive_at = time.monotonic()

    def add_route(self, prefix: str, route: Route, *, takes_body: bool = False) -> None:
        """Requests whose path starts with ``prefix`` go to ``route``; it gets the request body
        only if ``takes_body`` (else ``b""``, and the body is never read)."""
        self.routes.append((prefix, route, takes_body))

    def route_for(self, path: str) -> tuple[Route, bool]:
        """The route serving ``path`` and whether it takes a body."""
        if path in ("/metrics", "/healthz", "/readyz"):
            return self._probes, False
        for prefix, route, takes_body in self.routes:
            if path.startswith(prefix):
                return route, takes_body
        return _not_found, False

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Response:
        route, _ = self.route_for(path)
        return route(method, path, headers, body)

    def _probes(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Response:
        if method != "GET":
            return _not_found(method, path, headers, body)
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.metrics.registry)
        if path == "/healthz":
            stalled = time.monotonic() - self.alive_at
            live, detail = self.live()
            ok = live and stalled < self.alive_window
            verdict = {"alive": ok, "seconds_since_progress": stalled, **detail}
            return _json(200 if ok else 503, verdict)
        ok, detail = self.ready()
        return _json(200 if ok else 503, {"ready": ok, **detail})

    def start(self, host: str, port: int) -> int:
        """Serve in a daemon thread; returns the bound port (``port=0`` picks a free one)."""
        self._server = _Server((host, port), self)
        threading.Thread(target=self._server.serve_forever, name="http", daemon=True).start()
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class _Server(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` of them, each cut at its deadline."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: HttpServer) -> None:
        self.app = app
        self.request_queue_size = app.backlog
        self._slots = threading.BoundedSemaphore(app.max_connections)
        self._lock = threading.Lock()
        self._deadlines: dict[socket.socket, float] = {}
        self._refused = 0
        self._refusal_logged_at = -math.inf
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        with self._lock:
            self._deadlines[request] = time.monotonic() + self.app.deadline
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)

    def _release(self, request: socket.socket) -> None:
        with self._lock:
            self._deadlines.pop(request, None)
        self._slots.release()

    def _refuse(self, request: socket.socket) -> None:
        """503 without reading the request, from the accepting thread: must not block."""
        self._refused += 1
        if time.monotonic() - self._refusal_logged_at >= 10:
            log.warning(
                "http: %d connections open: %d refused since the last report",
                self.app.max_connections,
                self._refused,
            )
            self._refused, self._refusal_logged_at = 0, time.monotonic()
        status, content_type, payload = _json(503, {"error": "too many connections"})
        head = (
            f"HTTP/1.0 {status} Service Unavailable\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
        )
        try:
            request.setblocking(False)
            request.send(head.encode() + payload)
            request.recv(65536)  # what already arrived, so that closing does not reset
        except OSError:
            pass
        self.shutdown_request(request)

    def service_actions(self) -> None:
        """Every poll interval of ``serve_forever``: cut the connections past their deadline
        (a blocked read returns end of file, a blocked write fails)."""
        now = time.monotonic()
        with self._lock:
            overdue = [sock for sock, at in self._deadlines.items() if at <= now]
            for sock in overdue:
                del self._deadlines[sock]
        for sock in overdue:
            log.info("http: cutting a connection open for more than %.0f s", self.app.deadline)
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                continue

    def handle_error(self, request: Any, client_address: Any) -> None:
        """What :mod:`socketserver` prints on stderr, to the logger instead."""
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError | TimeoutError):
            log.debug("http: connection from %s lost: %r", client_address, error)
        else:
            log.error("http: error serving %s", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = ""
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.app.timeout)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        self._reply(*self._respond(method))

    def _respond(self, method: str) -> Response:
        app = self.server.app
        lengths = {value.strip() for value in self.headers.get_all("Content-Length") or []}
        if len(lengths) > 1:
            return _json(400, {"error": "conflicting Content-Length headers"})
        length = lengths.pop() if lengths else "0"
        if not _CONTENT_LENGTH.fullmatch(length):
            return _json(400, {"error": "invalid Content-Length"})
        if "Transfer-Encoding" in self.headers:
            return _json(501, {"error": "Transfer-Encoding is not supported"})
        size = int(length)
        if size > app.max_body_bytes:
            return _json(413, {"error": f"the body exceeds {app.max_body_bytes} bytes"})
        route, takes_body = app.route_for(self.path)
        body = b""
        if takes_body and size:
            body = self.rfile.read(size)
            if len(body) < size:
                return _json(400, {"error": "incomplete body"})
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            return route(method, self.path, headers, body)
        except Exception as error:
            log.exception("http: %s %s failed", method, self.path.split("?", 1)[0])
            if isinstance(error, _UNAVAILABLE):
                return _json(503, {"error": "a service the enricher depends on is down"})
            return _json(500, {"error": "internal error"})

    def _reply(self, status: int, content_type: str, payload: bytes) -> None:
        if status >= 400:
            self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="enricher"')
        self.end_headers()
        self.wfile.write(payload)

    def send_response(self, code: int, message: str | None = None) -> None:
        """As http.server's, without the ``Server`` header (software and version)."""
        self.log_request(code)
        self.send_response_only(code, message)
        self.send_header("Date", self.date_time_string())

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, headers too long, unknown method): a
        JSON body instead of an HTML page, the detail in the log only."""
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        status, content_type, payload = _json(code, {"error": self.responses.get(code, ("",))[0]})
        self.send_response(status)
        self.send_header("Connection", "close")
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def log_error(self, format: str, *args: Any) -> None:
        log.info("http: %s: " + format, self.client_address[0], *args)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: %s: " + format, self.client_address[0], *args)
