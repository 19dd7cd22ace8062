"""A lean HTTP/1.1 keep-alive transport for httpx2, on asyncio protocols.

Why drpo has its own transport: measured on the call path of ``OpenAIBackend`` (see
``benchmarks/callpath.py``), httpx2's default transport (httpcore2's connection pool, anyio socket
streams and h11) costs about 450 us of CPU per call, more than the whole rest of a call. Most of
it is bookkeeping that grows with the pool: every request start and every response close
re-scans every pooled connection, and polls each idle one's socket for readability (a
``getpeername`` and a ``poll`` syscall, plus a dict of lambdas per check) to notice servers that
hung up. At the hundreds of calls in flight a massively concurrent run keeps, that scan is the
largest single cost of a call. This transport costs about 100 us per call:

* **No polling.** A connection is an ``asyncio.Protocol``: the event loop tells it when the
  server closes it (``connection_lost`` / ``eof_received``), so an idle connection is known dead
  without asking its socket, and taking one from the pool is a ``deque.pop``.
* **One write per request**: the head and body go out in one ``transport.write``, one syscall
  and one wake-up of the server instead of two.
* **One small parser** for what API servers send: a status line, headers, and a body framed by
  ``Content-Length``, ``Transfer-Encoding: chunked`` or the end of the connection; ``1xx``
  interim replies are skipped. Bodies are buffered whole (drpo never streams a reply);
  ``Content-Encoding`` (gzip, ...) is decoded by httpx2 itself, as with any transport.

What it keeps from httpx2: the client (``AsyncClient`` builds the requests, follows redirects,
decodes bodies) and httpx2's exception types, so the ``openai`` SDK above it maps failures to
``APIConnectionError`` / ``APITimeoutError`` exactly as before. What it leaves out: proxies,
HTTP/2, streaming bodies and other event loops than asyncio; :func:`lean_transport` returns
httpx2's default transport where one of those is needed (an environment proxy, a trio loop).

Timeouts follow httpx2's ``Timeout``: ``connect`` bounds opening a connection, ``read`` bounds
the wait for the whole reply once the request is written (httpcore2 bounds each read; a caller
that needs a total bound, like ``OpenAIBackend``, sets its own). Writes are buffered by asyncio
and not timed. A request cancelled while in flight closes its connection, whose state is then
unknown; a reply the server marks ``Connection: close`` closes it after use.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import urllib.request
from asyncio.base_events import BaseEventLoop
from collections import deque
from collections.abc import Callable
from typing import Any

import httpx2

#: A reply head larger than this is refused: no API server sends one, and a bound keeps a
#: misbehaving server from growing our memory.
MAX_HEAD_BYTES = 256 * 1024
_NO_BODY_STATUSES = frozenset({204, 304})

#: (status, headers, body, reusable) once a reply is complete.
_Reply = tuple[int, list[tuple[bytes, bytes]], bytes, bool]


class _ProtocolError(Exception):
    """The server sent something this parser cannot frame; the connection is dropped."""


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: one request at a time, its reply parsed as bytes arrive."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        #: True once the server closed the connection or the parser gave up on it.
        self.closed = False
        self.idle_since = 0.0
        self._buffer = bytearray()
        self._waiter: asyncio.Future[_Reply] | None = None
        self._head_request = False
        self._reset()

    def _reset(self) -> None:
        self._head_done = False
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._length = -1  # Content-Length; -1 while unknown
        self._chunked = False
        self._keep_alive = True
        self._body = bytearray()
        self._chunk_left = -1  # bytes left in the current chunk; -1 before its size line
        self._trailers = False

    # ---- asyncio callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._end_of_stream()

    def eof_received(self) -> bool:
        self.closed = True
        self._end_of_stream()
        return False  # let the transport close itself

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._waiter is None:
            # Bytes nobody asked for (a server's "408" before it hangs up an idle connection):
            # the connection's framing can no longer be trusted.
            self.closed = True
            return
        try:
            self._parse()
        except (_ProtocolError, ValueError) as exc:
            self.closed = True
            self._fail(httpx2.RemoteProtocolError(f"malformed HTTP reply: {exc}"))

    # ---- the request -------------------------------------------------------------------------

    def send(self, data: bytes, *, head_request: bool) -> asyncio.Future[_Reply]:
        """Write one request and return the future of its reply."""
        assert self.transport is not None and self._waiter is None
        waiter: asyncio.Future[_Reply] = asyncio.get_running_loop().create_future()
        self._reset()
        self._head_request = head_request
        self._waiter = waiter
        self.transport.write(data)
        return waiter

    def forget(self) -> None:
        """The caller stopped waiting (timeout, cancellation): no reply is expected any more."""
        self._waiter = None

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # ---- parsing -----------------------------------------------------------------------------

    def _fail(self, error: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def _finish(self) -> None:
        waiter, self._waiter = self._waiter, None
        reusable = self._keep_alive and not self.closed and not self._buffer
        if waiter is not None and not waiter.done():
            waiter.set_result((self._status, self._headers, bytes(self._body), reusable))

    def _end_of_stream(self) -> None:
        if self._waiter is None:
            return
        if self._head_done and self._length < 0 and not self._chunked:
            self._body += self._buffer  # a body delimited by the end of the connection
            self._buffer.clear()
            self._keep_alive = False
            self._finish()
        else:
            self._fail(
                httpx2.RemoteProtocolError("server disconnected without sending a complete reply")
            )

    def _parse(self) -> None:
        buffer = self._buffer
        while not self._head_done:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD_BYTES:
                    raise _ProtocolError("reply head too large")
                return
            head = bytes(buffer[:end])
            del buffer[: end + 4]
            self._parse_head(head)
        if self._chunked:
            self._parse_chunks()
        elif self._length >= 0:
            need = self._length - len(self._body)
            if len(buffer) >= need:
                self._body += buffer[:need]
                del buffer[:need]
                self._finish()
            else:
                self._body += buffer
                buffer.clear()
        else:  # delimited by the end of the connection
            self._body += buffer
            buffer.clear()

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        status = int(rest[:3])
        if not version.startswith(b"HTTP/1.") or not 100 <= status <= 999:
            raise _ProtocolError(f"bad status line {lines[0][:80]!r}")
        if status < 200:  # 100 Continue, 103 Early Hints: the real reply follows
            return
        headers: list[tuple[bytes, bytes]] = []
        length = -1
        chunked = False
        keep_alive = version == b"HTTP/1.1"
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                raise _ProtocolError(f"bad header line {line[:80]!r}")
            value = value.strip()
            lowered = name.lower()
            if lowered == b"content-length":
                if length >= 0 and int(value) != length:
                    raise _ProtocolError("conflicting Content-Length headers")
                length = int(value)
                if length < 0:
                    raise _ProtocolError("negative Content-Length")
            elif lowered == b"transfer-encoding":
                chunked = value.lower().endswith(b"chunked")
            elif lowered == b"connection":
                tokens = {token.strip() for token in value.lower().split(b",")}
                if b"close" in tokens:
                    keep_alive = False
                elif b"keep-alive" in tokens:
                    keep_alive = True
            headers.append((name, value))
        if self._head_request or status in _NO_BODY_STATUSES:
            length, chunked = 0, False
        elif chunked:
            length = -1  # Transfer-Encoding wins over Content-Length (RFC 9112 6.3)
        self._status, self._headers = status, headers
        self._length, self._chunked, self._keep_alive = length, chunked, keep_alive
        self._head_done = True

    def _parse_chunks(self) -> None:
        buffer = self._buffer
        while self._waiter is not None:
            if self._trailers:
                end = buffer.find(b"\r\n")
                if end < 0:
                    return
                line = bytes(buffer[:end])
                del buffer[: end + 2]
                if not line:  # the empty line after the trailers ends the reply
                    self._finish()
                    return
                continue
            if self._chunk_left < 0:
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > 4096:
                        raise _ProtocolError("chunk size line too long")
                    return
                size = int(bytes(buffer[:end]).split(b";", 1)[0].strip(), 16)
                del buffer[: end + 2]
                if size == 0:
                    self._trailers = True
                    continue
                self._chunk_left = size
            take = min(self._chunk_left, len(buffer))
            self._body += buffer[:take]
            del buffer[:take]
            self._chunk_left -= take
            if self._chunk_left > 0:
                return
            if len(buffer) < 2:
                self._chunk_left = 0
                return
            if buffer[:2] != b"\r\n":
                raise _ProtocolError("chunk not followed by CRLF")
            del buffer[:2]
            self._chunk_left = -1


class LeanAsyncTransport(httpx2.AsyncBaseTransport):
    """HTTP/1.1 (and HTTPS) with keep-alive connections reused newest first.

    ``max_keepalive`` idle connections are kept per origin (the rest are closed), each for at
    most ``keepalive_expiry`` seconds. There is no cap on open connections: the caller bounds
    its calls in flight (``OpenAIBackend`` through its rate limiter).
    """

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_keepalive: int = 1000,
        keepalive_expiry: float = 30.0,
    ) -> None:
        self._ssl_context = ssl_context
        self.max_keepalive = max_keepalive
        self.keepalive_expiry = keepalive_expiry
        self._idle: dict[tuple[bytes, bytes, int | None], deque[_Connection]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Connections opened so far (for tests and benchmarks).
        self.connections_opened = 0

    # ---- connections --------------------------------------------------------------------------

    def _take_idle(self, key: tuple[bytes, bytes, int | None]) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        oldest_allowed = time.monotonic() - self.keepalive_expiry
        while idle:
            connection = idle.pop()
            if not connection.closed and connection.idle_since >= oldest_allowed:
                return connection
            connection.close()
        return None

    def _release(self, key: tuple[bytes, bytes, int | None], connection: _Connection) -> None:
        idle = self._idle.get(key)
        if idle is None:
            idle = self._idle[key] = deque()
        now = time.monotonic()
        oldest_allowed = now - self.keepalive_expiry
        while idle and (idle[0].closed or idle[0].idle_since < oldest_allowed):
            idle.popleft().close()  # the oldest are at the left: drop what expired
        if len(idle) >= self.max_keepalive:
            connection.close()
            return
        connection.idle_since = now
        idle.append(connection)

    async def _connect(self, request: httpx2.Request, timeouts: dict[str, Any]) -> _Connection:
        url = request.url
        scheme = url.scheme
        if scheme not in ("http", "https"):
            raise httpx2.UnsupportedProtocol(f"unsupported URL scheme {scheme!r}", request=request)
        context = None
        if scheme == "https":
            if self._ssl_context is None:
                self._ssl_context = httpx2.create_ssl_context()
            context = self._ssl_context
        port = url.port or (443 if scheme == "https" else 80)
        host = url.host
        loop = asyncio.get_running_loop()
        # RFC 8305 (try IPv4 too if IPv6 stalls) where the loop has it; uvloop has not.
        options = {"happy_eyeballs_delay": 0.25} if isinstance(loop, BaseEventLoop) else {}
        try:
            async with asyncio.timeout(timeouts.get("connect")):
                _, connection = await loop.create_connection(
                    _Connection,
                    host,
                    port,
                    ssl=context,
                    server_hostname=host if context else None,
                    **options,  # type: ignore[arg-type]
                )
        except TimeoutError:
            raise httpx2.ConnectTimeout(f"no connection to {host}:{port} in time") from None
        except (OSError, ssl.SSLError) as exc:
            raise httpx2.ConnectError(f"cannot connect to {host}:{port}: {exc}") from None
        self.connections_opened += 1
        return connection

    # ---- httpx2 interface ---------------------------------------------------------------------

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # connections belong to the loop that opened them
            self._forget_all()
            self._loop = loop
        url = request.url
        key = (url.raw_scheme, url.raw_host, url.port)
        timeouts: dict[str, Any] = request.extensions.get("timeout", {})
        data = _serialize(request, await request.aread())
        connection = self._take_idle(key) or await self._connect(request, timeouts)
        reply = connection.send(data, head_request=request.method == "HEAD")
        read_timeout = timeouts.get("read")
        timer = (
            loop.call_later(read_timeout, _expire, reply, request)
            if read_timeout is not None
            else None
        )
        try:
            status, headers, body, reusable = await reply
        except BaseException:
            connection.forget()
            connection.abort()  # half a request/reply exchange: the connection is unusable
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if reusable and not connection.closed:
            self._release(key, connection)
        else:
            connection.close()
        return httpx2.Response(
            status,
            headers=headers,
            stream=httpx2.ByteStream(body),
            extensions={"http_version": b"HTTP/1.1"},
        )

    def _forget_all(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                connection.closed = True
                if connection.transport is not None and not connection.transport.is_closing():
                    try:
                        connection.transport.abort()
                    except RuntimeError:  # its loop is closed: the socket is gone with it
                        pass
        self._idle.clear()

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()


def _expire(reply: asyncio.Future[_Reply], request: httpx2.Request) -> None:
    if not reply.done():
        reply.set_exception(httpx2.ReadTimeout("no reply in time", request=request))


def _serialize(request: httpx2.Request, body: bytes) -> bytes:
    """The request's bytes on the wire: request line, headers, body, in one buffer."""
    url = request.url
    parts = [request.method.encode("ascii"), b" ", url.raw_path, b" HTTP/1.1\r\n"]
    chunked = False
    for name, value in request.headers.raw:
        if name.lower() == b"transfer-encoding" and value.lower() == b"chunked":
            chunked = True
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    if chunked:  # the body was already read whole: send it as one chunk
        if body:
            parts += (f"{len(body):x}\r\n".encode("ascii"), body, b"\r\n")
        parts.append(b"0\r\n\r\n")
    else:
        parts.append(body)
    return b"".join(parts)


def _env_proxy_for(scheme: str) -> bool:
    proxies = urllib.request.getproxies()
    return bool(proxies.get(scheme) or proxies.get("all"))


def lean_transport(
    base_url: str,
    *,
    trust_env: bool,
    max_keepalive: int,
    keepalive_expiry: float,
    fallback: Callable[[], httpx2.AsyncBaseTransport],
) -> httpx2.AsyncBaseTransport | None:
    """The lean transport for ``base_url``; None when the environment names a proxy for the
    URL's scheme and ``trust_env`` says to honour it (give httpx2 no transport then: it reads
    proxies from the environment itself). ``fallback()`` makes the transport used on event
    loops other than asyncio."""
    scheme = httpx2.URL(base_url).scheme
    if trust_env and _env_proxy_for(scheme):
        return None
    context = httpx2.create_ssl_context(trust_env=trust_env) if scheme == "https" else None
    return _AsyncioOnly(
        LeanAsyncTransport(
            ssl_context=context, max_keepalive=max_keepalive, keepalive_expiry=keepalive_expiry
        ),
        fallback,
    )


class _AsyncioOnly(httpx2.AsyncBaseTransport):
    """The lean transport on asyncio; httpx2's default transport on any other event loop."""

    def __init__(
        self, lean: LeanAsyncTransport, fallback: Callable[[], httpx2.AsyncBaseTransport]
    ) -> None:
        self.lean = lean
        self._make_fallback = fallback
        self._fallback: httpx2.AsyncBaseTransport | None = None

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            if self._fallback is None:
                self._fallback = self._make_fallback()
            return await self._fallback.handle_async_request(request)
        return await self.lean.handle_async_request(request)

    async def aclose(self) -> None:
        await self.lean.aclose()
        if self._fallback is not None:
            await self._fallback.aclose()
