"""The HTTP clients under ``OpenAIBackend``: each one keeps the contract the backend relies on.

Every client ``HttpClientKind`` names must keep connections alive, hold every call the
in-flight guard lets through without queueing for a connection, leave environment proxies out
of loopback calls (and honour them elsewhere), hand back any status as a plain reply and raise
only ``HttpTransportError`` when no reply came, so that the backend classifies each failure
alike (``drpo.backends.openai_errors``). Each test runs a scripted raw TCP server on 127.0.0.1
that answers with exact bytes, so failures are exercised as a real server would cause them.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import get_args

import anyio
import pytest

from drpo.backends.base import (
    ChatMessage,
    CompletionRequest,
    PermanentBackendError,
    TransientBackendError,
)
from drpo.backends.openai_api import HttpClientKind, OpenAIBackend
from drpo.backends.openai_http import HttpTransportError, Poster, make_poster
from drpo.backends.ratelimit import RateLimits
from drpo.backends.registry import BackendRegistry
from drpo.backends.settings import EndpointSettings

pytestmark = [pytest.mark.anyio, pytest.mark.network]

KINDS: tuple[HttpClientKind, ...] = get_args(HttpClientKind)
KEY_ENV = "DRPO_TEST_OPENAI_HTTP_KEY"

#: A handler gets each request's head and body and the writer to answer on.
Handler = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]


def completion_reply(text: str = "hello") -> bytes:
    body = json.dumps(
        {
            "id": "c1",
            "object": "chat.completion",
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
    ).encode()
    head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}"
    return head.encode() + b"\r\n\r\n" + body


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
        yield f"http://127.0.0.1:{port}/v1", requests, connections
    finally:
        server.close()


def answer(data: bytes) -> Handler:
    async def handler(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()

    return handler


def chat(text: str = "hi") -> CompletionRequest:
    return CompletionRequest(messages=(ChatMessage(role="user", content=text),), max_tokens=8)


def backend(base_url: str, kind: HttpClientKind, **settings: object) -> OpenAIBackend:
    options: dict[str, object] = {"api_key_env": KEY_ENV, "timeout_s": 5.0, "http": kind}
    options.update(settings)
    return OpenAIBackend("m", base_url=base_url, **options)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------------------------
# Keep-alive and the pool


@pytest.mark.parametrize("kind", KINDS)
async def test_connections_are_kept_alive_and_reused(kind: HttpClientKind) -> None:
    async with scripted_server(answer(completion_reply())) as (url, requests, connections):
        async with backend(url, kind) as client:
            for _ in range(10):
                assert (await client.complete(chat())).text == "hello"
            assert connections[0] == 1
            for _ in range(3):  # concurrent calls: one connection each, reused next time
                async with anyio.create_task_group() as tg:
                    for _ in range(6):
                        tg.start_soon(client.complete, chat())
    assert connections[0] <= 6
    assert len(requests) == 28
    assert requests[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")


@pytest.mark.parametrize("kind", KINDS)
async def test_the_pool_holds_every_call_the_in_flight_guard_lets_through(
    kind: HttpClientKind,
) -> None:
    """130 calls in flight (more than any library's default pool of 100) all reach the server
    before it answers any: none waits for a connection."""
    calls = 130
    arrived = asyncio.Event()
    waiting: list[asyncio.StreamWriter] = []

    async def handler(request: bytes, writer: asyncio.StreamWriter) -> None:
        waiting.append(writer)
        if len(waiting) == calls:
            arrived.set()
        await arrived.wait()
        writer.write(completion_reply())
        await writer.drain()

    async with scripted_server(handler) as (url, requests, connections):
        limits = RateLimits(max_in_flight=calls)
        async with backend(url, kind, limits=limits, timeout_s=10.0, max_attempts=1) as client:
            async with anyio.create_task_group() as tg:
                for _ in range(calls):
                    tg.start_soon(client.complete, chat())
    assert len(requests) == calls and connections[0] == calls


# --------------------------------------------------------------------------------------------
# Environment proxies


@pytest.mark.parametrize("kind", KINDS)
async def test_a_loopback_server_is_reached_past_an_environment_proxy(
    kind: HttpClientKind, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = f"http://127.0.0.1:{_free_port()}"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.setenv(name, dead)
    async with scripted_server(answer(completion_reply())) as (url, requests, _):
        async with backend(url, kind, max_attempts=1) as client:
            assert (await client.complete(chat())).text == "hello"
    assert requests[0].startswith(b"POST /v1/chat/completions ")


@pytest.mark.parametrize("kind", KINDS)
async def test_a_remote_server_is_reached_through_the_environment_proxy(
    kind: HttpClientKind, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test")
    async with scripted_server(answer(completion_reply("via proxy"))) as (proxy, requests, _):
        monkeypatch.setenv("HTTP_PROXY", proxy.removesuffix("/v1"))
        async with backend("http://api.example.test/v1", kind, max_attempts=1) as client:
            assert (await client.complete(chat())).text == "via proxy"
    # the proxy got the request in absolute form, for the remote host
    assert requests[0].startswith(b"POST http://api.example.test/v1/chat/completions ")


# --------------------------------------------------------------------------------------------
# Failures, as the backend sees them (through the SDK's error types)


async def _hang_up(request: bytes, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def _cut_the_body(request: bytes, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{")
    await writer.drain()
    writer.close()


async def _never_answer(request: bytes, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(30)


#: case: (handler, None for no server at all; the last cause on aiohttp, on the SDK's client).
#: The SDK's aiohttp adapter (openai 3.57) reports a refused connection and a hang-up as a
#: timeout; drpo retries every one of these alike, only the words differ.
FAILURES: dict[str, tuple[Handler | None, dict[HttpClientKind, str]]] = {
    "refused": (
        None,
        {"aiohttp": "connection error (cannot connect)", "openai-sdk": "no reply within 0.5 s"},
    ),
    "hung up": (
        _hang_up,
        {"aiohttp": "connection error (disconnected)", "openai-sdk": "no reply within 0.5 s"},
    ),
    "cut body": (
        _cut_the_body,
        {
            "aiohttp": "connection error (disconnected)",
            "openai-sdk": "connection error (connection failed)",
        },
    ),
    "bad status line": (
        answer(b"garbage\r\n\r\n"),
        dict.fromkeys(KINDS, "connection error (unreadable reply)"),
    ),
    "bad header": (
        answer(b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n"),
        dict.fromkeys(KINDS, "connection error (unreadable reply)"),
    ),
    "no reply": (_never_answer, dict.fromkeys(KINDS, "no reply within 0.5 s")),
    "HTTP 503": (
        answer(b"HTTP/1.1 503 Busy\r\ncontent-length: 4\r\n\r\nbusy"),
        dict.fromkeys(KINDS, "HTTP 503: busy"),
    ),
    "not JSON": (
        answer(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nnope"),
        dict.fromkeys(KINDS, "malformed response (JSONDecodeError)"),
    ),
}


@pytest.mark.parametrize("case", FAILURES)
@pytest.mark.parametrize("kind", KINDS)
async def test_each_failure_is_retried_alike_on_every_client(
    kind: HttpClientKind, case: str
) -> None:
    handler, says = FAILURES[case]
    if handler is None:
        url = f"http://127.0.0.1:{_free_port()}/v1"
        async with backend(url, kind, timeout_s=0.5, max_attempts=1) as client:
            with pytest.raises(TransientBackendError) as caught:
                await client.complete(chat())
    else:
        async with scripted_server(handler) as (url, _, _):
            async with backend(url, kind, timeout_s=0.5, max_attempts=1) as client:
                with pytest.raises(TransientBackendError) as caught:
                    await client.complete(chat())
    assert caught.value.last_cause == says[kind]  # type: ignore[attr-defined]
    assert caught.value.__cause__ is None and caught.value.__context__ is None


# --------------------------------------------------------------------------------------------
# The contract itself: a reply of any status, one error when none came


def poster(url: str, kind: HttpClientKind, key: str = "sk-test-poster") -> Poster:
    return make_poster(kind, api_key=key, base_url=url, timeout_s=2.0, pool=8, trust_env=False)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_poster_hands_back_any_status_without_raising(kind: HttpClientKind) -> None:
    body = b'{"error": {"message": "slow down", "code": "rate_limit"}}'
    reply = (
        b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n"
        b"Retry-After: 7\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    async with scripted_server(answer(reply)) as (url, _, _):
        sender = poster(url, kind)
        try:
            got = await sender.post(
                "/chat/completions",
                json.dumps(
                    {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
                ).encode(),
            )
        finally:
            await sender.aclose()
    assert (got.status, got.ok, got.content) == (429, False, body)
    assert got.headers["retry-after"] == "7"  # looked up whatever the case


@pytest.mark.parametrize("kind", KINDS)
async def test_no_reply_is_one_drpo_error_with_no_client_error_chained(
    kind: HttpClientKind,
) -> None:
    sender = poster(f"http://127.0.0.1:{_free_port()}/v1", kind)
    try:
        with pytest.raises(HttpTransportError) as caught:
            await sender.post("/completions", b'{"model": "m", "prompt": "hi"}')
    finally:
        await sender.aclose()
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert "sk-test-poster" not in repr(sender) + str(caught.value)


async def test_the_sdk_client_is_chosen_in_the_endpoints_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``http_client = "openai-sdk"`` under ``[endpoints]`` sends through the SDK (its user
    agent reaches the server), and the default through drpo's own POST."""
    agents: dict[str, str] = {}
    for kind in KINDS:
        async with scripted_server(answer(completion_reply())) as (url, requests, _):
            spec = f"openai:m@{url}"
            registry = BackendRegistry({spec: EndpointSettings(http_client=kind)})
            try:
                assert (await registry.get(spec).complete(chat())).text == "hello"
            finally:
                await registry.aclose()
        agents[kind] = _headers(requests[0])["user-agent"]
    assert agents["aiohttp"].startswith("drpo/")
    assert agents["openai-sdk"].startswith("AsyncOpenAI/Python")


# --------------------------------------------------------------------------------------------
# What the server sees and says is the same whichever client sends


def _headers(request: bytes) -> dict[str, str]:
    head = request.split(b"\r\n\r\n", 1)[0].decode()
    pairs = (line.split(":", 1) for line in head.split("\r\n")[1:])
    return {name.strip().lower(): value.strip() for name, value in pairs}


async def test_every_client_sends_the_key_from_the_environment_as_a_bearer_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """drpo builds its own headers (the key as a bearer token, JSON both ways, its user
    agent); the SDK's client sends the same key its own way."""
    monkeypatch.setenv(KEY_ENV, "sk-test-headers")
    seen: dict[str, dict[str, str]] = {}
    for kind in KINDS:
        async with scripted_server(answer(completion_reply())) as (url, requests, _):
            async with backend(url, kind) as client:
                await client.complete(chat())
        seen[kind] = _headers(requests[0])
    for kind in KINDS:
        assert seen[kind]["authorization"] == "Bearer sk-test-headers", kind
        assert seen[kind]["content-type"] == "application/json", kind
    assert seen["aiohttp"]["accept"] == "application/json"
    assert seen["aiohttp"]["user-agent"].startswith("drpo/")
    assert not any(name.startswith("x-stainless") for name in seen["aiohttp"])


REFUSALS = {
    # status: (OpenAI's error body, what the backend's permanent error says)
    401: ("invalid_api_key", "Incorrect API key provided"),
    404: ("model_not_found", "The model `m` does not exist"),
    400: ("context_length_exceeded", "maximum context length"),
}


@pytest.mark.parametrize("status", REFUSALS)
async def test_a_refusal_reads_alike_on_every_client(
    status: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refusal is classified from its status and error body alone, so the backend's message
    and status code do not depend on the client."""
    monkeypatch.setenv(KEY_ENV, "sk-test-refusal")
    code, message = REFUSALS[status]
    said_by_server = f"{message}: sk-test-refusal." if status == 401 else f"{message}."
    body = json.dumps(
        {"error": {"message": said_by_server, "type": "invalid_request_error", "code": code}}
    ).encode()  # OpenAI's 401 quotes the key it got (masked there; in full here, to catch it)
    reply = (
        f"HTTP/1.1 {status} Refused\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body
    said: dict[str, str] = {}
    for kind in KINDS:
        async with scripted_server(answer(reply)) as (url, _, _):
            async with backend(url, kind, max_attempts=1) as client:
                with pytest.raises(PermanentBackendError) as caught:
                    await client.complete(chat())
        assert caught.value.status_code == status  # type: ignore[attr-defined]
        assert message in str(caught.value) and "sk-test-refusal" not in str(caught.value)
        said[kind] = str(caught.value).replace(url, "URL")
    assert len(set(said.values())) == 1, said


def test_a_registry_gives_one_backend_per_model_however_its_spec_is_written() -> None:
    """Backends are remembered by the spec text asked for (no parse per call), and still one
    per model: two spellings of a spec share it, and a closed registry builds a new one."""
    registry = BackendRegistry()
    spec = "openai:m@http://127.0.0.1:9/v1"
    first = registry.get(spec)
    assert registry.get(spec) is first
    assert registry.get(f"  {spec} ") is first
    anyio.run(registry.aclose)
    assert registry.get(spec) is not first
    anyio.run(registry.aclose)
