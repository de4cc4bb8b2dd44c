"""A Snowplow collector for the integration tests: trackers send it their HTTP requests, and it
records each one as Snowplow's collector does, a Thrift ``CollectorPayload`` produced to a
Kafka topic under a random key.

:class:`CollectorEndpoint` serves, on 127.0.0.1 in a thread, ``GET /i`` (the pixel: one event
in the querystring) and ``POST /com.snowplowanalytics.snowplow/tp2`` (a ``payload_data`` body
of events). It fills the record as the Scala collector does: the client's address, the time
of receipt, the raw querystring (empty for a POST without one), the body, the path, every
request header as ``Name: value`` followed by the content type alone (the collector appends it
to the list), the lowercased content type, the user agent, the referer, the host without its
port, and the network user id of the ``sp`` cookie or a new one, which the response sets.
The answer is a 1x1 GIF to a pixel request and ``ok`` to a POST, as the collector's. Each
record is in Kafka before its answer leaves: once a tracker's flush returns, everything it
sent can be read.

(PYTEST_DONT_REWRITE: like ``instances``, test modules import this module.)
"""

from __future__ import annotations

import base64
import threading
import time
import uuid
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from confluent_kafka import KafkaError, Message
from stack import Stack

from enricher.codecs import collector

NAME = "ssc-test-kafka"
"""The ``collector`` field of the records (the Scala collector writes its name and version)"""
COOKIE = "sp"
COOKIE_MAX_AGE = 365 * 86_400
PIXEL = base64.b64decode("R0lGODlhAQABAPAAAP///wAAACH5BAUAAAAALAAAAAABAAEAAAICRAEAOw==")
DELIVERY_TIMEOUT = 30.0


class CollectorEndpoint:
    """The collector, from ``with`` to its end: trackers send to :attr:`url`; :attr:`requests`
    counts the requests recorded to ``topic``."""

    def __init__(self, stack: Stack, topic: str) -> None:
        self.topic = topic
        self.requests = 0
        self._producer = stack.producer(**{"linger.ms": 0})
        self._lock = threading.Lock()
        self._server = _Server(self)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="collector", daemon=True
        )

    def __enter__(self) -> CollectorEndpoint:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def record(self, payload: collector.CollectorPayload) -> None:
        """Produce the record of one request under a random key, and wait until it is in
        Kafka; a record Kafka did not take fails the request."""
        errors: list[KafkaError] = []

        def delivered(error: KafkaError | None, _message: Message) -> None:
            if error is not None:
                errors.append(error)

        key = str(uuid.uuid4()).encode()
        self._producer.produce(
            self.topic, key=key, value=collector.encode(payload), on_delivery=delivered
        )
        left = self._producer.flush(DELIVERY_TIMEOUT)
        if errors or left:
            raise RuntimeError(f"the record of a request was not delivered: {errors or left}")
        with self._lock:
            self.requests += 1


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, endpoint: CollectorEndpoint) -> None:
        self.endpoint = endpoint
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        path, _, querystring = self.path.partition("?")
        if path != collector.PIXEL_PATH:
            self._answer(404, "text/plain", b"not found")
            return
        nuid = self._record(path, querystring, body=None)
        no_cache = ("Cache-Control", "no-cache, no-store, must-revalidate")
        self._answer(200, "image/gif", PIXEL, _set_cookie(nuid), no_cache)

    def do_POST(self) -> None:
        path, _, querystring = self.path.partition("?")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        if path != collector.TP2_PATH:
            self._answer(404, "text/plain", b"not found")
            return
        nuid = self._record(path, querystring, body)
        self._answer(200, "text/plain; charset=UTF-8", b"ok", _set_cookie(nuid))

    def _record(self, path: str, querystring: str, body: str | None) -> str:
        """Record the request; its network user id."""
        headers = self.headers
        content_type = headers.get("Content-Type")
        content_type = content_type.lower() if content_type is not None else None
        host = headers.get("Host")
        nuid = self._cookie() or str(uuid.uuid4())
        self.server.endpoint.record(
            collector.CollectorPayload(
                ip_address=self.client_address[0],
                timestamp=time.time_ns() // 1_000_000,
                encoding="UTF-8",
                collector=NAME,
                user_agent=headers.get("User-Agent"),
                referer_uri=headers.get("Referer"),
                path=path,
                querystring=querystring,
                body=body,
                headers=(
                    *(f"{name}: {value}" for name, value in headers.items()),
                    *([content_type] if content_type is not None else []),
                ),
                content_type=content_type,
                hostname=urlsplit(f"//{host}").hostname if host else None,
                network_user_id=nuid,
            )
        )
        return nuid

    def _cookie(self) -> str | None:
        """The network user id of the request's ``sp`` cookie, if it has one."""
        cookies: SimpleCookie = SimpleCookie()
        try:
            cookies.load(self.headers.get("Cookie") or "")
        except CookieError:
            return None
        morsel = cookies.get(COOKIE)
        return morsel.value if morsel is not None and morsel.value else None

    def _answer(
        self, status: int, content_type: str, body: bytes, *headers: tuple[str, str]
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        return


def _set_cookie(nuid: str) -> tuple[str, str]:
    return "Set-Cookie", f"{COOKIE}={nuid}; Max-Age={COOKIE_MAX_AGE}; Path=/; HttpOnly"
