"""The HTTP endpoint: a small HTTP/1.1 server for /metrics, /healthz and /readyz.

Its clients are Prometheus and health probes (an orchestrator, a load
balancer, ``curl``), which send one plain GET and read the answer. That is
all it serves: GET and HEAD, one request per connection (every response
says ``Connection: close``), no request body, no keep-alive. A path it does
not know gets 404, a known path asked with another method 405, and a
request it cannot read 400 (431 when its head is too large). The head must
arrive within ``READ_TIMEOUT_S`` and ``MAX_REQUEST_BYTES``, and at most
``MAX_CONNECTIONS`` connections are served at once, ``MAX_PER_ADDRESS`` of
them from any one address, so that one client cannot starve the probes.

Rule 1: a handler sees nothing of the request but that it was asked for;
what the endpoint says is built from the relay's state, never from input.

Rule 2: a handler that raises gives a 500 with a fixed text and a log line,
never exception text on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import http
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final

log = logging.getLogger("smtpwarden.control")

# The request line and headers together. A scrape or a probe sends a few
# hundred octets; 8 KiB is what common servers allow per header line
# (nginx's large_client_header_buffers, Apache's LimitRequestFieldSize).
MAX_REQUEST_BYTES: Final = 8192
# For the request head and for writing the response. Prometheus gives up on
# a scrape after its default scrape_timeout, 10 s.
READ_TIMEOUT_S: Final = 3.0  # a request head comes in one packet; a slow one holds a slot
WRITE_TIMEOUT_S: Final = 10.0
# How often an endpoint whose address is in use tries again (start_when_free).
BIND_RETRY_S: Final = 1.0
# Our choice: a few scrapers and probes at once. Past it a new connection is
# closed unanswered, so a client that opens many cannot hold the relay's memory.
MAX_CONNECTIONS: Final = 32
# Our choice too: a scraper and a probe or two per address, with room to
# spare; a client holding slots open takes a quarter of them at most.
MAX_PER_ADDRESS: Final = 8
TEXT: Final = "text/plain; charset=utf-8"
_METHODS: Final = ("GET", "HEAD")


@dataclass(frozen=True, slots=True)
class Response:
    """What a handler answers: status, body and its content type."""

    status: int
    body: bytes
    content_type: str = TEXT


Handler = Callable[[], Awaitable[Response]]


class _Refused(Exception):
    """The request cannot be served; ``status`` says why."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class ControlServer:
    """Serves ``routes`` (a path such as "/metrics" and its handler) over HTTP."""

    def __init__(self, routes: Mapping[str, Handler]) -> None:
        self._routes = dict(routes)
        self._server: asyncio.Server | None = None
        self._serving: set[asyncio.Task[None]] = set()
        self._per_address: dict[str, int] = {}
        self._binding: asyncio.Task[None] | None = None  # see ``start_when_free``

    async def start(self, host: str, port: int) -> None:
        """Bind and serve; raises OSError if the address cannot be bound."""
        self._server = await asyncio.start_server(
            self._serve, host, port, limit=MAX_REQUEST_BYTES, reuse_address=True
        )

    def start_when_free(self, host: str, port: int, serving: str) -> None:
        """Try to bind again every ``BIND_RETRY_S`` until the address is free.

        For a relay that took over the ports of one still draining: the
        listeners share their ports, the endpoint does not (its answers
        would alternate between the two processes), so it waits its turn.
        """
        self._binding = asyncio.get_running_loop().create_task(
            self._bind_when_free(host, port, serving)
        )

    async def _bind_when_free(self, host: str, port: int, serving: str) -> None:
        while self._server is None:
            await asyncio.sleep(BIND_RETRY_S)
            try:
                await self.start(host, port)
            except OSError as error:
                if error.errno != errno.EADDRINUSE:
                    log.error("HTTP endpoint on %s:%s not started: %s", host, port, error)
                    return
        _log_address(self, serving)

    @property
    def bound(self) -> bool:
        """True once the endpoint serves."""
        return self._server is not None

    def address(self) -> tuple[str, int]:
        """The bound address (useful with port 0); raises RuntimeError before ``start``."""
        if self._server is None:
            raise RuntimeError("the HTTP endpoint is not started")
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def close(self) -> None:
        """Stop accepting, end the exchanges under way, and wait for them."""
        binding, self._binding = self._binding, None
        if binding is not None:
            binding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await binding
        server, self._server = self._server, None
        if server is not None:
            server.close()
        serving = list(self._serving)
        for task in serving:
            task.cancel()
        await asyncio.gather(*serving, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        peer = writer.get_extra_info("peername")
        address = str(peer[0]) if peer else ""
        held = self._per_address.get(address, 0)
        if task is None or len(self._serving) >= MAX_CONNECTIONS or held >= MAX_PER_ADDRESS:
            writer.transport.abort()
            return
        self._serving.add(task)
        self._per_address[address] = held + 1
        try:
            response, head_only = await self._answer(reader)
            if response is not None:
                await _send(writer, response, head_only=head_only)
        except (OSError, TimeoutError):
            writer.transport.abort()
        except BaseException:
            writer.transport.abort()
            raise
        finally:
            self._serving.discard(task)
            left = self._per_address.pop(address) - 1
            if left:
                self._per_address[address] = left
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[Response | None, bool]:
        """The response to the request on ``reader``, and whether it was HEAD.

        None when the client left before its request was complete.
        """
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                request = await _read_head(reader)
        except _Refused as refused:
            return _status(refused.status), False
        if request is None:
            return None, False
        method, path = request
        handler = self._routes.get(path)
        if handler is None:
            return _status(http.HTTPStatus.NOT_FOUND), method == "HEAD"
        if method not in _METHODS:
            return _status(http.HTTPStatus.METHOD_NOT_ALLOWED), False
        try:
            return await handler(), method == "HEAD"
        except Exception:
            log.exception("HTTP endpoint: %s failed", path)
            return _status(http.HTTPStatus.INTERNAL_SERVER_ERROR), method == "HEAD"


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, str] | None:
    """The method and path of the request, its headers read and ignored.

    None if the connection ended first. Raises ``_Refused`` for a request
    line that is not HTTP/1.x or a head over ``MAX_REQUEST_BYTES``.
    """
    total = 0
    lines: list[bytes] = []
    while True:
        try:
            line = await reader.readline()
        except ValueError:  # a line past the reader's limit
            raise _Refused(http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE) from None
        total += len(line)
        if total > MAX_REQUEST_BYTES:
            raise _Refused(http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
        if not line.endswith(b"\n"):
            return None  # the client closed before the end of its head
        if line in (b"\r\n", b"\n"):
            if lines:
                break
            continue  # RFC 9112 2.2: empty lines before the request line are ignored
        lines.append(line)
    parts = lines[0].split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise _Refused(http.HTTPStatus.BAD_REQUEST)
    try:
        method, target = parts[0].decode("ascii"), parts[1].decode("ascii")
    except UnicodeDecodeError:
        raise _Refused(http.HTTPStatus.BAD_REQUEST) from None
    return method, target.partition("?")[0]


def _status(status: int) -> Response:
    phrase = http.HTTPStatus(status).phrase
    return Response(status, f"{status} {phrase}\n".encode("ascii"))


async def _send(writer: asyncio.StreamWriter, response: Response, *, head_only: bool) -> None:
    phrase = http.HTTPStatus(response.status).phrase
    head = [
        f"HTTP/1.1 {response.status} {phrase}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    if response.status == http.HTTPStatus.METHOD_NOT_ALLOWED:
        head.append("Allow: " + ", ".join(_METHODS))
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("ascii"))
    if not head_only:
        writer.write(response.body)
    async with asyncio.timeout(WRITE_TIMEOUT_S):
        await writer.drain()
    with contextlib.suppress(OSError):
        writer.write_eof()


async def open_endpoint(
    host: str,
    port: int,
    routes: Mapping[str, Handler],
    *,
    serving: str,
    without: str,
    wait_if_busy: bool = False,
) -> ControlServer | None:
    """Serve ``routes`` on host:port; None if the address cannot be bound.

    That failure is logged, never raised: metrics and probes must not keep
    mail from being relayed. ``serving`` names what is served in the log
    line with the address ("metrics on http://..."), ``without`` what runs
    without the endpoint. ``wait_if_busy`` (``reuse_port``): an address in
    use is taken once it is free (``ControlServer.start_when_free``).
    """
    server = ControlServer(routes)
    try:
        await server.start(host, port)
    except OSError as error:
        if wait_if_busy and error.errno == errno.EADDRINUSE:
            log.info(
                "HTTP endpoint on %s:%s in use (a relay draining?): serving it once it is free",
                host,
                port,
            )
            server.start_when_free(host, port, serving)
            return server
        log.error(
            "HTTP endpoint on %s:%s not started: %s; %s runs without it", host, port, error, without
        )
        return None
    _log_address(server, serving)
    return server


def _log_address(server: ControlServer, serving: str) -> None:
    bound, bound_port = server.address()
    shown = f"[{bound}]" if ":" in bound else bound
    log.info("%s on http://%s:%s/metrics", serving, shown, bound_port)
