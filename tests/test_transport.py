"""The lean HTTP/1.1 transport under httpx2: framing, keep-alive, failures, and fallbacks.

Each test runs a scripted raw TCP server on 127.0.0.1 that answers with exact bytes, so every
framing the parser must handle (Content-Length, chunked, end of connection, interim 1xx
replies, replies split across packets) is exercised as a real server would send it.
"""

from __future__ import annotations

import asyncio
import gzip
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx2
import pytest

from drpo.backends.transport import LeanAsyncTransport, lean_transport

pytestmark = [pytest.mark.anyio, pytest.mark.network]

#: A handler gets each request's bytes (head and body) and the writer to answer on.
Handler = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> bytes | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + (await reader.readexactly(length) if length else b"")


@asynccontextmanager
async def scripted_server(handler: Handler) -> AsyncIterator[tuple[str, list[bytes], list[int]]]:
    """Yields (base URL, requests seen, connection count); ``handler`` answers each request."""
    requests: list[bytes] = []
    connections = [0]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections[0] += 1
        try:
            while not writer.is_closing():
                request = await _read_request(reader)
                if request is None:
                    break
                requests.append(request)
                await handler(request, writer)
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", requests, connections
    finally:
        server.close()


def reply(body: bytes, *, status: str = "200 OK", headers: tuple[str, ...] = ()) -> bytes:
    lines = [f"HTTP/1.1 {status}", f"content-length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def always(data: bytes) -> Handler:
    async def handler(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()

    return handler


@asynccontextmanager
async def client() -> AsyncIterator[tuple[httpx2.AsyncClient, LeanAsyncTransport]]:
    transport = LeanAsyncTransport()
    async with httpx2.AsyncClient(transport=transport, timeout=5.0) as http:
        yield http, transport


# --------------------------------------------------------------------------------------------
# Framing


async def test_content_length_reply_and_the_request_as_sent() -> None:
    async with scripted_server(always(reply(b'{"ok": true}'))) as (url, seen, _):
        async with client() as (http, _transport):
            response = await http.post(url + "/v1/chat", content=b'{"q": 1}')
    assert response.status_code == 200 and response.json() == {"ok": True}
    assert response.http_version == "HTTP/1.1"
    head, body = seen[0].split(b"\r\n\r\n", 1)
    assert head.startswith(b"POST /v1/chat HTTP/1.1\r\n")
    assert b"\r\nHost: 127.0.0.1:" in head and b"\r\nContent-Length: 8" in head
    assert body == b'{"q": 1}'


async def test_chunked_reply_with_extensions_and_trailers() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: yes\r\n\r\n"
    )
    async with scripted_server(always(chunked)) as (url, _, connections):
        async with client() as (http, _transport):
            first = await http.get(url)
            second = await http.get(url)  # the connection stays usable after a chunked reply
    assert first.text == second.text == "hello world"
    assert connections[0] == 1


async def test_a_reply_split_into_single_bytes_is_reassembled() -> None:
    data = reply(b"0123456789", headers=("x-a: 1",))

    async def dribble(request: bytes, writer: asyncio.StreamWriter) -> None:
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()
            await asyncio.sleep(0)

    async with scripted_server(dribble) as (url, _, _c):
        async with client() as (http, _transport):
            response = await http.get(url)
    assert response.text == "0123456789" and response.headers["x-a"] == "1"


async def test_interim_replies_are_skipped() -> None:
    data = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"
    async with scripted_server(always(data + reply(b"done"))) as (url, _, _c):
        async with client() as (http, _transport):
            response = await http.post(url, content=b"x")
    assert (response.status_code, response.text) == (200, "done")


async def test_a_reply_delimited_by_the_end_of_the_connection() -> None:
    async def then_close(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    async with scripted_server(then_close) as (url, _, connections):
        async with client() as (http, _transport):
            assert (await http.get(url)).text == "all of it"
            assert (await http.get(url)).text == "all of it"
    assert connections[0] == 2  # a closed connection is never reused


async def test_no_body_for_head_204_and_304() -> None:
    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        if request.startswith(b"HEAD"):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n")
        elif b"/empty" in request:
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 304 Not Modified\r\netag: x\r\n\r\n")
        await writer.drain()

    async with scripted_server(answer) as (url, _, connections):
        async with client() as (http, _transport):
            head = await http.head(url)
            empty = await http.get(url + "/empty")
            same = await http.get(url + "/same")
    assert (head.status_code, head.content) == (200, b"")
    assert (empty.status_code, empty.content) == (204, b"")
    assert (same.status_code, same.content) == (304, b"")
    assert connections[0] == 1


async def test_gzip_bodies_are_decoded_by_httpx2() -> None:
    packed = gzip.compress(b'{"text": "unpacked"}')
    data = reply(packed, headers=("content-encoding: gzip",))
    async with scripted_server(always(data)) as (url, _, _c):
        async with client() as (http, _transport):
            response = await http.get(url)
    assert response.json() == {"text": "unpacked"}


async def test_error_statuses_are_replies_not_exceptions() -> None:
    body = b'{"error": {"message": "slow down"}}'
    data = reply(body, status="429 Too Many Requests", headers=("retry-after: 2",))
    async with scripted_server(always(data)) as (url, _, _c):
        async with client() as (http, _transport):
            response = await http.post(url, content=b"{}")
    assert response.status_code == 429 and response.headers["retry-after"] == "2"
    assert response.json()["error"]["message"] == "slow down"


# --------------------------------------------------------------------------------------------
# Keep-alive


async def test_connections_are_reused_and_one_per_concurrent_request() -> None:
    async def slow(request: bytes, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.05)
        writer.write(reply(b"ok"))
        await writer.drain()

    async with scripted_server(slow) as (url, seen, connections):
        async with client() as (http, transport):
            await asyncio.gather(*(http.get(url) for _ in range(5)))
            await asyncio.gather(*(http.get(url) for _ in range(5)))
            for _ in range(5):
                await http.get(url)
    assert len(seen) == 15
    assert connections[0] == transport.connections_opened == 5


async def test_a_connection_the_server_closed_while_idle_is_not_used() -> None:
    async def once(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(reply(b"ok"))
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.close()  # an idle timeout on the server's side

    async with scripted_server(once) as (url, _, connections):
        async with client() as (http, _transport):
            await http.get(url)
            await asyncio.sleep(0.1)  # the close reaches the client's protocol meanwhile
            assert (await http.get(url)).text == "ok"
    assert connections[0] == 2


async def test_idle_connections_expire_and_the_pool_is_bounded() -> None:
    async with scripted_server(always(reply(b"ok"))) as (url, _, connections):
        transport = LeanAsyncTransport(keepalive_expiry=0.0)
        async with httpx2.AsyncClient(transport=transport) as http:
            await http.get(url)
            await asyncio.sleep(0.01)
            await http.get(url)
        assert connections[0] == 2
        bounded = LeanAsyncTransport(max_keepalive=1)
        async with httpx2.AsyncClient(transport=bounded) as http:
            await asyncio.gather(http.get(url), http.get(url))
            assert sum(len(idle) for idle in bounded._idle.values()) == 1


# --------------------------------------------------------------------------------------------
# Failures map to httpx2's errors (which the openai SDK maps to its own)


async def test_a_connection_closed_mid_reply_is_a_remote_protocol_error() -> None:
    async def cut(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        await writer.drain()
        writer.close()

    async with scripted_server(cut) as (url, _, _c):
        async with client() as (http, _transport):
            with pytest.raises(httpx2.RemoteProtocolError, match="complete reply"):
                await http.get(url)


@pytest.mark.parametrize(
    "garbage",
    [
        b"SMTP ready\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
    ],
    ids=["not-http", "bad-status", "bad-header", "two-lengths", "bad-chunk"],
)
async def test_malformed_replies_are_remote_protocol_errors(garbage: bytes) -> None:
    async with scripted_server(always(garbage)) as (url, _, _c):
        async with client() as (http, _transport):
            with pytest.raises(httpx2.RemoteProtocolError, match="malformed"):
                await http.get(url)


async def test_no_server_is_a_connect_error() -> None:
    async with scripted_server(always(b"")) as (url, _, _c):
        pass  # closed: nothing listens on that port any more
    async with client() as (http, _transport):
        with pytest.raises(httpx2.ConnectError):
            await http.get(url)


async def test_a_slow_reply_is_a_read_timeout_and_the_connection_is_dropped() -> None:
    async def stall(request: bytes, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(1.0)

    async with scripted_server(stall) as (url, _, _c):
        transport = LeanAsyncTransport()
        async with httpx2.AsyncClient(transport=transport, timeout=0.05) as http:
            with pytest.raises(httpx2.ReadTimeout):
                await http.get(url)
        assert not any(transport._idle.values())


async def test_a_cancelled_request_drops_its_connection() -> None:
    async def stall(request: bytes, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(1.0)

    async with scripted_server(stall) as (url, _, _c):
        async with client() as (http, transport):
            task = asyncio.ensure_future(http.get(url))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not any(transport._idle.values())


async def test_bytes_sent_while_idle_make_the_connection_unusable() -> None:
    async def extra(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(reply(b"ok"))
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"HTTP/1.1 408 Request Timeout\r\n\r\n")  # unsolicited
        await writer.drain()

    async with scripted_server(extra) as (url, _, connections):
        async with client() as (http, _transport):
            await http.get(url)
            await asyncio.sleep(0.05)
            assert (await http.get(url)).text == "ok"
    assert connections[0] == 2


# --------------------------------------------------------------------------------------------
# Where the lean transport steps aside


def test_an_environment_proxy_leaves_the_client_to_httpx2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert lean_transport("https://api.openai.com/v1", **_OPTIONS) is None
    assert lean_transport("https://api.openai.com/v1", **{**_OPTIONS, "trust_env": False})
    assert lean_transport("http://127.0.0.1:8000/v1", **_OPTIONS) is not None  # no http proxy


async def test_other_event_loops_fall_back_to_the_given_transport() -> None:
    made: list[str] = []

    class Fallback(httpx2.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
            return httpx2.Response(200, content=b"fallback")

    def make() -> httpx2.AsyncBaseTransport:
        made.append("fallback")
        return Fallback()

    transport = lean_transport("http://127.0.0.1:1/v1", **{**_OPTIONS, "fallback": make})
    assert transport is not None
    async with scripted_server(always(reply(b"lean"))) as (url, _, _c):
        async with httpx2.AsyncClient(transport=transport) as http:
            assert (await http.get(url)).text == "lean"
    assert made == []  # asyncio: the lean transport served it


_OPTIONS = {
    "trust_env": True,
    "max_keepalive": 10,
    "keepalive_expiry": 30.0,
    "fallback": lambda: httpx2.AsyncHTTPTransport(),
}


# --------------------------------------------------------------------------------------------
# HTTPS


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (made with the openssl command line tool)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl command to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subject = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    files = ["-keyout", str(key), "-out", str(cert)]
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", *files, *subject],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_https_verifies_the_server_and_reuses_the_connection(
    tls_files: tuple[Path, Path],
) -> None:
    cert, key = tls_files
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (request := await _read_request(reader)) is not None:
                writer.write(reply(b"secure" if request.startswith(b"GET") else b"?"))
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_context)
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        trusted = LeanAsyncTransport(ssl_context=ssl.create_default_context(cafile=str(cert)))
        async with httpx2.AsyncClient(transport=trusted) as http:
            assert (await http.get(url)).text == "secure"
            assert (await http.get(url)).text == "secure"
        assert trusted.connections_opened == 1
        strangers = LeanAsyncTransport(ssl_context=ssl.create_default_context())
        async with httpx2.AsyncClient(transport=strangers) as http:
            with pytest.raises(httpx2.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await http.get(url)
    finally:
        server.close()
