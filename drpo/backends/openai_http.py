"""drpo's HTTP contract with an OpenAI-compatible endpoint: one POST in, a plain reply out.

In the spirit of httpx's transports, a :class:`Poster` does one thing: it POSTs a JSON body to
a path under the endpoint and returns what came back, an :class:`HttpResponse` (status,
headers, body), whatever the status: it never raises on one. When no reply comes (no
connection, a dropped one, a reply that cannot be read, a timeout) it raises the one
:class:`HttpTransportError`. What a status or a failure means (retry, or which permanent
error) is decided in one place, ``drpo.backends.openai_errors``, from the status and the error
body, whichever client posted. No error object carries the request's headers (the API key is
one of them), and no exception of a client is chained onto drpo's.

Two clients, named by ``HttpClientKind`` and chosen per endpoint in a config's ``[endpoints]``
(``http_client = "openai-sdk"``):

* ``"aiohttp"`` (the default): the POST goes straight to aiohttp's keep-alive pool and
  C-accelerated parser, with headers drpo builds itself (:func:`request_headers`: the key as a
  bearer token, JSON in and out, drpo's user agent).
* ``"openai-sdk"``: the official SDK makes the call, end to end: ``AsyncOpenAI``'s
  ``chat.completions`` / ``completions`` ``.with_raw_response.create`` (its documented way to
  read a raw reply) on its ``DefaultAioHttpClient``, with the SDK's own headers, request
  pipeline and connection limits, its retries off (drpo's retry loop is the only one). Its
  errors are read through their public fields only (``status_code``, ``response``), and a
  failure without a reply becomes an :class:`HttpTransportError` by its class alone. The SDK's
  aiohttp adapter reports a refused connection as a timeout (openai 3.57); drpo retries both
  alike, only the message differs.

Why two, measured with ``benchmarks/callpath.py`` (3000 chat calls by 64 callers against a 50 ms
server in its own process; process CPU time, best of 3 rounds, quiet 2-core machine):
``OpenAIBackend`` alone costs 196 us of CPU per call straight on aiohttp and 504 us through the
SDK's pipeline on the same aiohttp pool. A third client, the SDK on httpx2's own transport, was
reachable only from tests and benchmarks and cost the most (755 us); it is gone, and drpo no
longer imports httpx2. drpo used to own a hand-written asyncio HTTP/1.1 transport
(``drpo/backends/transport.py`` up to commit 4e9a34c): aiohttp does the same job for less CPU.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Protocol

import aiohttp
from yarl import URL

from drpo.backends.settings import DEFAULT_HTTP_CLIENT, HttpClientKind

#: Seconds an idle connection is kept for reuse (servers close theirs after 5 s to minutes;
#: aiohttp learns of a close as it happens, so a longer expiry costs nothing but a socket).
KEEPALIVE_EXPIRY_S = 30.0
#: Opening a connection is bounded by this (or the call's timeout, if shorter).
CONNECT_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """What came back: any status, its headers (looked up case-insensitively) and its body."""

    status: int
    headers: Mapping[str, str]
    content: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class HttpTransportError(Exception):
    """No HTTP reply: the one error a poster raises.

    ``cause`` says what happened in words safe to show (no header, no key): ``"cannot connect"``,
    ``"disconnected"`` (the server hung up or reset the connection, or cut the body short),
    ``"unreadable reply"`` (not HTTP), ``"timeout"``, or ``"connection failed"`` (the client
    does not say which); ``detail`` names the client's own error class, for a bug report.
    """

    def __init__(self, cause: str, detail: str = "") -> None:
        super().__init__(f"{cause} ({detail})" if detail else cause)
        self.cause = cause
        self.detail = detail

    @property
    def timed_out(self) -> bool:
        return self.cause == "timeout"


class Poster(Protocol):
    """POSTs a JSON body to a path under the endpoint (see the module's docstring)."""

    async def post(self, path: str, body: bytes) -> HttpResponse: ...

    async def aclose(self) -> None: ...


def request_headers(api_key: str) -> dict[str, str]:
    """The headers drpo sends with every call: the key from the environment as a bearer token
    (what every OpenAI-compatible server reads), JSON both ways, and who is calling."""
    return {
        "Authorization": f"Bearer {api_key}",
        "Content-Type": "application/json",
        "Accept": "application/json",
        "User-Agent": f"drpo/{_drpo_version()}",
    }


@cache
def _drpo_version() -> str:
    try:
        return version("drpo")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "dev"


def make_poster(
    kind: HttpClientKind,
    *,
    api_key: str,
    base_url: str,
    timeout_s: float,
    pool: int,
    trust_env: bool,
) -> Poster:
    """The poster ``kind`` names.

    ``pool`` connections are kept (at least 100; the SDK keeps its own limits), each alive for
    ``KEEPALIVE_EXPIRY_S``, so a steady load reuses its connections and no call queues for one.
    ``trust_env`` is off for loopback servers: an environment proxy must not capture calls to a
    local model server; elsewhere ``HTTPS_PROXY``/``NO_PROXY`` (and ``SSL_CERT_FILE``) are
    honoured.
    """
    if kind == "openai-sdk":
        return SdkPoster(
            api_key=api_key, base_url=base_url, timeout_s=timeout_s, trust_env=trust_env
        )
    return AiohttpPoster(
        api_key=api_key,
        base_url=base_url,
        timeout_s=timeout_s,
        pool=max(pool, 100),
        trust_env=trust_env,
    )


# --------------------------------------------------------------------------------------------
# Straight on aiohttp


class AiohttpPoster:
    """POSTs on one aiohttp session with drpo's headers.

    The session is opened at the first call, in the event loop that makes it (an aiohttp
    session belongs to one loop), and closed by ``aclose``.
    """

    def __init__(
        self, *, api_key: str, base_url: str, timeout_s: float, pool: int, trust_env: bool
    ) -> None:
        self._base = base_url.rstrip("/")
        self._headers = request_headers(api_key)
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=min(timeout_s, CONNECT_TIMEOUT_S), sock_read=timeout_s
        )
        self._pool = pool
        self._trust_env = trust_env
        self._urls: dict[str, URL] = {}
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"AiohttpPoster({self._base!r})"  # never the headers: they hold the key

    async def post(self, path: str, body: bytes) -> HttpResponse:
        try:
            async with self._open().post(
                self._url(path), data=body, headers=self._headers, allow_redirects=False
            ) as response:
                content = await response.read()
                return HttpResponse(response.status, response.headers, content)
        except TimeoutError as exc:  # aiohttp's timeouts are TimeoutErrors
            raise HttpTransportError("timeout", type(exc).__name__) from None
        except aiohttp.ClientError as exc:
            raise HttpTransportError(_aiohttp_cause(exc), type(exc).__name__) from None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _url(self, path: str) -> URL:
        url = self._urls.get(path)
        if url is None:  # built once per path: yarl's parsing is most of a str URL's cost
            url = self._urls[path] = URL(f"{self._base}/{path.lstrip('/')}")
        return url

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._pool, keepalive_timeout=KEEPALIVE_EXPIRY_S)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, trust_env=self._trust_env
            )
        return self._session


def _aiohttp_cause(exc: aiohttp.ClientError) -> str:
    """What an aiohttp error says happened, in :class:`HttpTransportError`'s words."""
    if isinstance(exc, aiohttp.ClientConnectorError):  # refused, unreachable, no such host, TLS
        return "cannot connect"
    if isinstance(exc, aiohttp.ClientResponseError):  # a status line or header that is not HTTP
        return "unreadable reply"
    if isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError):
        return "disconnected"  # hung up, reset, or the body cut short
    return "connection failed"


# --------------------------------------------------------------------------------------------
# The official SDK, end to end


class SdkPoster:
    """The SDK's own client makes each call (see the module's docstring).

    The SDK takes the request as keyword arguments, so the body is decoded again here (one
    ``json.loads`` of a few KB, next to the SDK's pipeline it is noise). The SDK is imported
    when this client is built, so a process that never selects it never loads it.
    """

    def __init__(self, *, api_key: str, base_url: str, timeout_s: float, trust_env: bool) -> None:
        import openai  # only here: the default client never loads the SDK (~0.3 s, 2,800 models)

        self._openai = openai
        self._http = openai.DefaultAioHttpClient(trust_env=trust_env)
        self._client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=base_url,
            max_retries=0,
            timeout=timeout_s,
            http_client=self._http,
        )
        raw_chat = self._client.chat.completions.with_raw_response
        raw_text = self._client.completions.with_raw_response
        self._routes: dict[str, Callable[..., Awaitable[Any]]] = {
            "chat/completions": raw_chat.create,
            "completions": raw_text.create,
        }

    def __repr__(self) -> str:
        return f"SdkPoster({str(self._client.base_url)!r})"

    async def post(self, path: str, body: bytes) -> HttpResponse:
        openai = self._openai
        create = self._routes.get(path.strip("/"))
        if create is None:
            raise ValueError(f"the SDK client posts chat and text completions only, not {path!r}")
        try:
            raw = await create(**json.loads(body))
        except openai.APIStatusError as err:  # a reply, just not a 2xx one
            return HttpResponse(err.status_code, err.response.headers, err.response.content)
        except openai.APITimeoutError:
            raise HttpTransportError("timeout", "APITimeoutError") from None
        except openai.APIConnectionError:
            raise HttpTransportError("connection failed", "APIConnectionError") from None
        except aiohttp.ClientError as exc:  # one the SDK's aiohttp adapter does not map
            raise HttpTransportError(_aiohttp_cause(exc), type(exc).__name__) from None
        return HttpResponse(raw.status_code, raw.headers, raw.content)

    async def aclose(self) -> None:
        await self._client.close()
        await self._http.aclose()


__all__ = [
    "DEFAULT_HTTP_CLIENT",
    "HttpClientKind",
    "HttpResponse",
    "HttpTransportError",
    "Poster",
    "make_poster",
    "request_headers",
]
