"""The HTTP server on the metrics port, on a real socket: bounded (body size, Content-Length,
timeouts, connection cap, backlog), errors as JSON and in the log (never a traceback on stderr
or in a body), no version banner, and the session API behind its token."""

from __future__ import annotations

import http.client
import io
import json
import logging
import select
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from enricher import config
from enricher.api import SessionApi
from enricher.errors import Unavailable
from enricher.http import HttpServer, Route
from enricher.ids import IdDeriver
from enricher.logs import JsonFormatter
from enricher.lookup import SessionLookup
from enricher.metrics import Metrics
from enricher.session import SessionConfig
from enricher.store import PartitionStore

TOKEN = "a-token-for-the-tests"
Serve = Callable[..., tuple[HttpServer, int]]
Reply = tuple[int, dict[str, str], bytes]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """Start an HttpServer on 127.0.0.1, a free port; stopped at teardown."""
    started: list[HttpServer] = []

    def start(**options: Any) -> tuple[HttpServer, int]:
        server = HttpServer(Metrics(), lambda: (True, {"partitions": [0]}), **options)
        started.append(server)
        return server, server.start("127.0.0.1", 0)

    yield start
    for server in started:
        server.stop()


def request(
    port: int, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> Reply:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request(method, path, body=body or None, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def raw(port: int, data: bytes, *, timeout: float = 5.0) -> Reply:
    """Send bytes as they are, read until the server closes, parse the response."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return parse(read_to_end(sock))


def read_to_end(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def parse(response: bytes) -> Reply:
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def get(path: str, *headers: str, body: bytes = b"", method: str = "GET") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> float | None:
    """Seconds until the server closes ``sock`` (None if it stays open), sending ``trickle``
    byte by byte meanwhile, every 0.2 s."""
    start = time.monotonic()
    sent = 0
    while time.monotonic() - start < seconds:
        readable, _, _ = select.select([sock], [], [], 0.2)
        try:
            if readable and sock.recv(65536) == b"":
                return time.monotonic() - start
            if trickle:
                sock.send(trickle[sent % len(trickle) : sent % len(trickle) + 1])
                sent += 1
        except OSError:
            return time.monotonic() - start
    return None


# --------------------------------------------------------------------------- the basics


def test_probes_answer_without_a_server_banner(serve: Serve) -> None:
    _, port = serve()
    for path in ("/metrics", "/healthz", "/readyz"):
        status, headers, body = request(port, "GET", path)
        assert status == 200, path
        assert "server" not in headers, headers
        assert "date" in headers
    assert b"enricher_build_info" in request(port, "GET", "/metrics")[2]
    status, headers, body = request(port, "GET", "/nothing-here")
    assert (status, json.loads(body)) == (404, {"error": "not found"})
    assert "server" not in headers


def test_http_server_errors_are_json_without_a_banner(serve: Serve) -> None:
    _, port = serve()
    status, headers, body = raw(port, get("/metrics", *(f"X-{n}: 1" for n in range(120))))
    assert status == 431
    assert "server" not in headers
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"error": "Request Header Fields Too Large"}
    # A request line too broken to carry a version gets an HTTP/0.9 answer: the body alone.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"NONSENSE\r\n\r\n")
        assert json.loads(read_to_end(sock)) == {"error": "Bad Request"}
    status, headers, body = request(port, "DELETE", "/metrics")
    assert (status, json.loads(body)["error"]) == (501, "Not Implemented")
    assert "server" not in headers


def test_the_backlog_is_larger_than_five(serve: Serve) -> None:
    server, _ = serve()
    assert server.backlog >= 128
    assert server._server is not None
    assert server._server.request_queue_size == server.backlog


# --------------------------------------------------------------------------- bodies


def test_a_body_is_read_only_for_a_route_that_takes_one(serve: Serve) -> None:
    server, port = serve(max_body_bytes=1024)
    bodies: dict[str, bytes] = {}

    def recorder(name: str) -> Route:
        def route(method: str, path: str, headers: dict[str, str], body: bytes) -> Any:
            bodies[name] = body
            return 200, "application/json", b"{}"

        return route

    server.add_route("/takes/", recorder("takes"), takes_body=True)
    server.add_route("/none/", recorder("none"))
    assert request(port, "POST", "/takes/x", body=b"a" * 1024)[0] == 200
    assert bodies["takes"] == b"a" * 1024
    # Content-Length 10, and not a byte of it sent: answered at once, as nothing is read.
    status, _, _ = raw(port, get("/none/x", "Content-Length: 10", method="POST"), timeout=3)
    assert (status, bodies["none"]) == (200, b"")


@pytest.mark.parametrize("path", ["/takes/x", "/none/x", "/metrics"])
@pytest.mark.parametrize("length", [1025, 10**12, 10**18 - 1])
def test_a_content_length_over_the_maximum_is_413_before_anything_is_read(
    serve: Serve, path: str, length: int
) -> None:
    server, port = serve(max_body_bytes=1024)
    called = []

    def route(method: str, path: str, headers: dict[str, str], body: bytes) -> Any:
        called.append(path)
        return 200, "text/plain", b""

    server.add_route("/takes/", route, takes_body=True)
    server.add_route("/none/", route)
    status, _, body = raw(port, get(path, f"Content-Length: {length}"), timeout=3)
    assert status == 413
    assert "1024" in json.loads(body)["error"]
    assert called == []


@pytest.mark.parametrize(
    "header",
    [
        "Content-Length: -1",
        "Content-Length: abc",
        "Content-Length: 1e3",
        "Content-Length: 0x10",
        "Content-Length: +5",
        "Content-Length: 5 5",
        "Content-Length: " + "9" * 40,
        "Content-Length: ",
    ],
)
def test_a_bad_content_length_is_400(serve: Serve, header: str) -> None:
    _, port = serve()
    status, headers, body = raw(port, get("/metrics", header), timeout=3)
    assert status == 400, body
    assert headers["content-type"] == "application/json"
    assert "Content-Length" in json.loads(body)["error"]


def test_conflicting_content_lengths_are_400_and_chunked_bodies_501(serve: Serve) -> None:
    _, port = serve()
    twice = get("/metrics", "Content-Length: 0", "Content-Length: 7")
    assert raw(port, twice, timeout=3)[0] == 400
    chunked = get("/metrics", "Transfer-Encoding: chunked", method="POST") + b"0\r\n\r\n"
    assert raw(port, chunked, timeout=3)[0] == 501


# --------------------------------------------------------------------------- slow clients


def test_an_idle_client_is_cut_after_the_socket_timeout(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="enricher.http")
    _, port = serve(timeout=0.5)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
        elapsed = closed_within(sock, 5)
    assert elapsed is not None, "the server kept an idle connection open"
    assert elapsed < 3
    assert any("timed out" in r.getMessage() for r in caplog.records)


def test_a_trickling_client_is_cut_at_the_deadline(serve: Serve) -> None:
    _, port = serve(timeout=1.0, deadline=1.5)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n")
        elapsed = closed_within(sock, 6, trickle=b"X-Slow: 1\r\n")
    assert elapsed is not None, "a byte every 0.2 s kept the connection open"
    assert elapsed < 4


def test_connections_beyond_the_cap_get_503_then_service_resumes(serve: Serve) -> None:
    _, port = serve(max_connections=2, timeout=10)
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:
            status, headers, body = parse(read_to_end(extra))
        assert status == 503
        assert json.loads(body) == {"error": "too many connections"}
        assert "server" not in headers
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if request(port, "GET", "/healthz")[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.05)
    else:
        pytest.fail("the server did not serve again once the idle connections closed")


# --------------------------------------------------------------------------- failing routes


def unreachable_redis_lookup() -> SessionLookup:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = redis.Redis(host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0))
    store = PartitionStore(client, "enricher:", "raw", IdDeriver("salt"))
    return SessionLookup(store, 3, SessionConfig(salt="salt"))


def raising(error: Exception) -> Route:
    def route(method: str, path: str, headers: dict[str, str], body: bytes) -> Any:
        raise error

    return route


def test_a_route_that_raises_gets_a_json_5xx_and_the_traceback_goes_to_logging(
    serve: Serve, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO, logger="enricher.http")
    server, port = serve()
    as_json = io.StringIO()
    json_handler = logging.StreamHandler(as_json)
    json_handler.setFormatter(JsonFormatter())
    logging.getLogger("enricher.http").addHandler(json_handler)
    api = SessionApi(unreachable_redis_lookup(), token=None, anonymous_reads=True)
    server.add_route(SessionApi.prefix, api)
    server.add_route("/unavailable", raising(Unavailable("schema registry: down")))
    server.add_route("/bug", raising(RuntimeError("secret-detail")))
    try:
        cases = [("/v1/devices/d/session", 503), ("/unavailable", 503), ("/bug", 500)]
        for path, expected in cases:
            status, headers, body = request(port, "GET", path)
            assert status == expected, (path, body)
            assert headers["content-type"] == "application/json"
            error = json.loads(body)["error"]
            assert "Traceback" not in error and "secret-detail" not in error
    finally:
        logging.getLogger("enricher.http").removeHandler(json_handler)
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(failures) == 3
    assert all(r.exc_info is not None for r in failures)
    assert isinstance(failures[0].exc_info[1], redis.ConnectionError)  # type: ignore[index]
    lines = [json.loads(line) for line in as_json.getvalue().splitlines()]
    assert any("secret-detail" in line.get("exception", "") for line in lines)
    assert "Traceback" not in capfd.readouterr().err


def test_errors_outside_the_route_go_to_logging_not_stderr(
    serve: Serve, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    """What socketserver's handle_error would print on stderr (here: a route that returns
    nothing at all, so that answering fails) goes to the logger, traceback included."""
    caplog.set_level(logging.INFO, logger="enricher.http")
    server, port = serve()
    server.add_route("/broken", lambda method, path, headers, body: cast(Any, None))
    with pytest.raises(http.client.RemoteDisconnected):
        request(port, "GET", "/broken")
    deadline = time.monotonic() + 5
    while not [r for r in caplog.records if r.levelno >= logging.ERROR]:
        assert time.monotonic() < deadline, "nothing logged"
        time.sleep(0.05)
    (failure,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert failure.name == "enricher.http"
    assert failure.exc_info is not None and failure.exc_info[0] is TypeError
    assert capfd.readouterr().err == ""


# --------------------------------------------------------------------------- the session API


class FakeLookup:
    def __init__(self) -> None:
        self.renewed: list[str] = []

    def get(self, device: str) -> Any:
        if device == "nobody":
            return None
        return type("View", (), {"as_dict": lambda self: {"device": device}})()

    def renew(self, device: str) -> None:
        self.renewed.append(device)


def session_api(serve: Serve, **options: Any) -> tuple[int, FakeLookup]:
    server, port = serve()
    lookup = FakeLookup()
    server.add_route(SessionApi.prefix, SessionApi(cast(SessionLookup, lookup), **options))
    return port, lookup


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_without_a_token_the_session_api_is_403_and_says_how_to_enable_it(serve: Serve) -> None:
    port, _ = session_api(serve, token=None)
    for method, path in (
        ("GET", "/v1/devices/d/session"),
        ("POST", "/v1/devices/d/session/renew"),
        ("GET", "/v1/other"),
    ):
        status, _, body = request(port, method, path, bearer(TOKEN))
        assert status == 403, path
        error = json.loads(body)["error"]
        assert "ENRICHER_SESSION_API_TOKEN" in error
        assert "ENRICHER_SESSION_API_ANONYMOUS_READS" in error
    for path in ("/metrics", "/healthz", "/readyz"):
        assert request(port, "GET", path)[0] == 200, path


def test_with_a_token_every_v1_request_needs_it(serve: Serve) -> None:
    port, lookup = session_api(serve, token=TOKEN, renew=True)
    for method, path in (
        ("GET", "/v1/devices/d/session"),
        ("POST", "/v1/devices/d/session/renew"),
        ("GET", "/v1/anything"),
    ):
        for headers in ({}, bearer("wrong"), bearer(TOKEN + "x"), {"Authorization": TOKEN}):
            status, answer, body = request(port, method, path, headers)
            assert status == 401, (path, headers)
            assert answer["www-authenticate"].startswith("Bearer")
    assert lookup.renewed == []
    status, _, body = request(port, "GET", "/v1/devices/d/session", bearer(TOKEN))
    assert (status, json.loads(body)) == (200, {"device": "d"})
    assert request(port, "GET", "/v1/devices/nobody/session", bearer(TOKEN))[0] == 404
    assert request(port, "GET", "/v1/anything", bearer(TOKEN))[0] == 404
    assert request(port, "POST", "/v1/devices/d/session/renew", bearer(TOKEN))[0] == 202
    assert lookup.renewed == ["d"]
    for path in ("/metrics", "/healthz", "/readyz"):
        assert request(port, "GET", path)[0] == 200, path


def test_renew_keeps_its_switch(serve: Serve) -> None:
    port, lookup = session_api(serve, token=TOKEN)
    status, _, body = request(port, "POST", "/v1/devices/d/session/renew", bearer(TOKEN))
    assert status == 403
    assert "ENRICHER_SESSION_API_RENEW" in json.loads(body)["error"]
    assert lookup.renewed == []


@pytest.mark.parametrize("token", [None, TOKEN])
def test_anonymous_reads_open_gets_only(serve: Serve, token: str | None) -> None:
    port, lookup = session_api(serve, token=token, renew=True, anonymous_reads=True)
    assert request(port, "GET", "/v1/devices/d/session")[0] == 200
    assert request(port, "GET", "/v1/devices/nobody/session")[0] == 404
    status, _, _ = request(port, "POST", "/v1/devices/d/session/renew")
    assert status == (403 if token is None else 401)
    assert lookup.renewed == []


# --------------------------------------------------------------------------- settings


def test_session_api_settings() -> None:
    defaults = config.load(env={})
    assert (defaults.session_api_token, defaults.session_api_anonymous_reads) == ("", False)
    settings = config.load(
        env={"ENRICHER_SESSION_API_ANONYMOUS_READS": "true", "ENRICHER_SESSION_API_TOKEN": TOKEN}
    )
    assert settings.session_api_anonymous_reads is True
    assert settings.redacted()["session_api_token"] == "***"
    assert TOKEN not in repr(settings)
    with pytest.raises(config.ConfigError) as caught:
        config.load(env={"ENRICHER_SESSION_API_TOKEN": "short"})
    assert caught.value.problems == ["ENRICHER_SESSION_API_TOKEN must be at least 16 characters"]
    with pytest.raises(config.ConfigError) as caught:
        config.load(env={"ENRICHER_SESSION_API_RENEW": "true"})
    assert len(caught.value.problems) == 1
    assert "ENRICHER_SESSION_API_TOKEN" in caught.value.problems[0]
    with pytest.raises(config.ConfigError):
        config.load(env={"ENRICHER_SESSION_API_ANONYMOUS_READS": "maybe"})


def test_healthz_fails_when_the_service_says_it_is_not_live(serve: Serve) -> None:
    verdict = {"live": True}
    _, port = serve(
        live=lambda: (verdict["live"], {"batch_aborts_in_a_row": 0 if verdict["live"] else 20})
    )
    assert request(port, "GET", "/healthz")[0] == 200
    verdict["live"] = False
    status, _, body = request(port, "GET", "/healthz")
    assert status == 503
    assert json.loads(body)["batch_aborts_in_a_row"] == 20
