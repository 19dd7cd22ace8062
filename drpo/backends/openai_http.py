"""How an ``OpenAIBackend``'s requests reach the server: the HTTP clients it can post through.

The backend serializes each request body itself and parses each reply itself (see
``openai_api``); what it needs from HTTP is one POST: the bytes and the headers of a 2xx reply,
and for anything else the official SDK's own error types (``openai.APIStatusError`` and its
subclasses by status, ``APITimeoutError``, ``APIConnectionError``), which its classifier reads.
Three clients give exactly that, named by ``HttpClientKind``:

* ``"aiohttp"`` (the default): the POST goes straight to aiohttp's connection pool and
  C-accelerated parser, with the headers the SDK sends (read once from the SDK client's public
  ``auth_headers`` and ``default_headers``) and the SDK's error types built from the reply (the
  SDK's own status-to-class mapping). No ``httpx2.Request``/``Response`` is built for a call
  that succeeds: that, and the SDK's per-call option and header merging, were the largest items
  left in the profile of 50 searches at once (about 30 % of the process's CPU).
* ``"sdk-aiohttp"``: the SDK's low-level ``post(..., cast_to=httpx2.Response)`` on its
  ``DefaultAioHttpClient`` (httpx2 over aiohttp): the same pool and parser, with the SDK's
  request pipeline in front. Kept to measure the one above against (``benchmarks/callpath.py``).
* ``"httpx2"``: the SDK on httpx2's default transport (httpcore2's pool), for event loops other
  than asyncio, which aiohttp does not run on.

Every client keeps connections alive, holds as many as the in-flight guard lets through,
leaves environment proxies out of loopback calls and honours them elsewhere, and reports each
transport failure with the same cause names (``ConnectError``, ``RemoteProtocolError``, ...), so
the backend's messages do not depend on the client (``tests/test_openai_http.py``). No error
object carries the request's headers (the API key is one of them).

Why, measured with ``benchmarks/callpath.py`` (3000 chat calls by 64 callers against a 50 ms
server in its own process; process CPU time, best of 3 rounds, quiet 2-core machine):
``OpenAIBackend`` alone costs 196 us of CPU per call straight on aiohttp, 504 us through the
SDK's pipeline on the same aiohttp pool, and 755 us on httpx2's transport (httpcore2 re-scans
its whole pool and polls every idle socket at each request start and response close); drpo's
full path (journal, bus, recorder) 504, 748 and 1,239 us. drpo used to own a hand-written
asyncio HTTP/1.1 transport (``drpo/backends/transport.py`` up to commit 4e9a34c): aiohttp,
maintained and C-accelerated, does the same job for less CPU now that the SDK's pipeline is
not in front of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import aiohttp
import httpx2
import openai
from openai import APIConnectionError, APITimeoutError, AsyncOpenAI
from yarl import URL

#: The HTTP clients an ``OpenAIBackend`` can post through (see the module's docstring).
HttpClientKind = Literal["aiohttp", "sdk-aiohttp", "httpx2"]
DEFAULT_HTTP_CLIENT: HttpClientKind = "aiohttp"

#: Seconds an idle connection is kept for reuse (servers close theirs after 5 s to minutes;
#: aiohttp learns of a close as it happens, so a longer expiry costs nothing but a socket).
KEEPALIVE_EXPIRY_S = 30.0
#: Opening a connection is bounded by this (or the call's timeout, if shorter).
CONNECT_TIMEOUT_S = 30.0


class HttpReply(Protocol):
    """A 2xx reply: what the backend reads of it."""

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def content(self) -> bytes: ...


class Poster(Protocol):
    """POSTs a JSON body to a path under the endpoint; the SDK's errors for any failure."""

    async def post(self, path: str, body: bytes) -> HttpReply: ...

    async def aclose(self) -> None: ...


def make_poster(
    kind: HttpClientKind,
    *,
    api_key: str,
    base_url: str,
    timeout_s: float,
    pool: int,
    trust_env: bool,
) -> Poster:
    """The poster ``kind`` names, over an SDK client (which sends, or gives headers and errors).

    ``pool`` connections are kept (at least 100), each alive for ``KEEPALIVE_EXPIRY_S``, so a
    steady load reuses its connections and no call queues for one. ``trust_env`` is off for
    loopback servers: an environment proxy must not capture calls to a local model server;
    elsewhere ``HTTPS_PROXY``/``NO_PROXY`` (and ``SSL_CERT_FILE``) are honoured.
    """
    pool = max(pool, 100)
    timeout = httpx2.Timeout(timeout_s, connect=min(timeout_s, CONNECT_TIMEOUT_S))
    limits = httpx2.Limits(
        max_connections=pool, max_keepalive_connections=pool, keepalive_expiry=KEEPALIVE_EXPIRY_S
    )
    if kind == "httpx2":
        http: httpx2.AsyncClient | None = openai.DefaultAsyncHttpxClient(
            limits=limits, timeout=timeout, trust_env=trust_env
        )
    elif kind == "sdk-aiohttp":
        http = _SdkAiohttpClient(limits=limits, timeout=timeout, trust_env=trust_env)
    else:
        http = None  # the SDK client never sends: it is asked for headers and errors only
    client = AsyncOpenAI(
        api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout, http_client=http
    )
    if http is None:
        return AiohttpPoster(client, timeout_s, pool=pool, trust_env=trust_env)
    return SdkPoster(client, http)


# --------------------------------------------------------------------------------------------
# Straight on aiohttp


@dataclass(frozen=True, slots=True)
class _AiohttpReply:
    headers: Mapping[str, str]
    content: bytes


class AiohttpPoster:
    """POSTs on one aiohttp session, with the SDK's headers and the SDK's error types.

    The session is opened at the first call, in the event loop that makes it (an aiohttp
    session belongs to one loop), and closed by ``aclose``.
    """

    def __init__(self, client: AsyncOpenAI, timeout_s: float, *, pool: int, trust_env: bool):
        self._client = client
        self._base = str(client.base_url).rstrip("/")
        self._headers = sdk_headers(client, timeout_s)
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=min(timeout_s, CONNECT_TIMEOUT_S), sock_read=timeout_s
        )
        self._pool = pool
        self._trust_env = trust_env
        self._urls: dict[str, URL] = {}
        self._session: aiohttp.ClientSession | None = None

    async def post(self, path: str, body: bytes) -> HttpReply:
        url = self._url(path)
        try:
            async with self._open().post(
                url, data=body, headers=self._headers, allow_redirects=False
            ) as response:
                content = await response.read()
                status, headers = response.status, response.headers
        except TimeoutError as exc:  # aiohttp's timeouts are TimeoutErrors
            raise APITimeoutError(request=_bare_request(url)) from exc
        except aiohttp.ClientError as exc:
            request = _bare_request(url)
            cause = as_httpx2_error(exc, request)
            raise APIConnectionError(message=str(cause), request=request) from cause
        if status >= 300:
            raise _status_error(self._client, url, status, headers, content)
        return _AiohttpReply(headers, content)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self._client.close()

    def _url(self, path: str) -> URL:
        url = self._urls.get(path)
        if url is None:  # built once per path: yarl's parsing is most of a str URL's cost
            url = self._urls[path] = URL(f"{self._base}/{path.lstrip('/')}")
        return url

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._pool,
                keepalive_timeout=KEEPALIVE_EXPIRY_S,
                ssl=httpx2.create_ssl_context(trust_env=self._trust_env),  # the SDK's trust
            )
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, trust_env=self._trust_env
            )
        return self._session


def sdk_headers(client: AsyncOpenAI, timeout_s: float) -> dict[str, str]:
    """The headers the SDK sends with each request of ``client`` (retries off)."""
    merged: dict[str, Any] = {**client.auth_headers, **client.default_headers}
    headers = {name: value for name, value in merged.items() if isinstance(value, str)}
    headers["X-Stainless-Retry-Count"] = "0"
    headers["X-Stainless-Read-Timeout"] = str(float(timeout_s))
    return headers


def _bare_request(url: URL) -> httpx2.Request:
    """The request an SDK error refers to, without headers: they hold the API key."""
    return httpx2.Request("POST", str(url))


def _status_error(
    client: AsyncOpenAI, url: URL, status: int, headers: Mapping[str, str], content: bytes
) -> openai.APIStatusError:
    """The error the SDK raises for this reply (its class by status, its body and message)."""
    response = httpx2.Response(
        status, headers=list(headers.items()), content=content, request=_bare_request(url)
    )
    # The SDK's own status-to-class mapping (private, so tests/test_openai_http.py checks it).
    return client._make_status_error_from_response(response)


# --------------------------------------------------------------------------------------------
# Through the SDK's request pipeline


class SdkPoster:
    """POSTs with the SDK's low-level ``post``, returning the raw ``httpx2.Response``."""

    def __init__(self, client: AsyncOpenAI, http: httpx2.AsyncClient) -> None:
        self._client = client
        self._http = http

    async def post(self, path: str, body: bytes) -> HttpReply:
        return await self._client.post(path, cast_to=httpx2.Response, content=body)

    async def aclose(self) -> None:
        await self._client.close()
        await self._http.aclose()


class _SdkAiohttpClient(openai.DefaultAioHttpClient):  # type: ignore[misc, valid-type]
    """The SDK's aiohttp client, with every transport failure raised as httpx2's type.

    The adapter the SDK vendors (``openai._vendor.httpx_aiohttp``, from httpx-aiohttp 0.2.0;
    openai 3.57) maps aiohttp's errors by class, and two of its mappings mislead: a refused
    connection and a server that hangs up both become ``httpx2.ConnectTimeout`` (the SDK's
    ``APITimeoutError``: "no reply within 600 s" for a call that failed at once; noted upstream
    in the review of openai/openai-python#3594), and a malformed reply
    (``aiohttp.ClientResponseError``) is not mapped at all, so it escapes the SDK as a raw
    aiohttp error that no caller classifies. Here they become ``ConnectError`` /
    ``RemoteProtocolError`` (the SDK's ``APIConnectionError``), as with httpx2's own transport;
    timeouts stay timeouts. Drop this class once the SDK maps them itself.
    """

    async def send(self, request: httpx2.Request, **kwargs: Any) -> httpx2.Response:
        try:
            return await super().send(request, **kwargs)
        except httpx2.ConnectTimeout as exc:
            cause = exc.__cause__
            if cause is None or isinstance(cause, TimeoutError):  # a real connect timeout
                raise
            raise as_httpx2_error(cause, request) from cause
        except aiohttp.ClientError as exc:  # one the adapter leaves unmapped
            raise as_httpx2_error(exc, request) from exc


def as_httpx2_error(exc: BaseException, request: httpx2.Request) -> httpx2.TransportError:
    """The httpx2 error httpx2's own transport raises for what aiohttp reported as ``exc``."""
    if isinstance(exc, TimeoutError):  # aiohttp's timeouts are TimeoutErrors
        return httpx2.ReadTimeout(str(exc), request=request)
    if isinstance(exc, aiohttp.ClientConnectorError):  # refused, unreachable, no such host
        return httpx2.ConnectError(str(exc), request=request)
    # the server hung up, reset the connection, or sent a reply that cannot be read
    return httpx2.RemoteProtocolError(str(exc), request=request)
