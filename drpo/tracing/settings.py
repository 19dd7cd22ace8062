"""Where a trace goes and what it may hold: ``[trace]`` in the TOML config, ``--trace`` flags,
and the standard OpenTelemetry environment variables.

The endpoint is an OTLP/HTTP URL: a base URL (``http://127.0.0.1:6006``, to which ``/v1/traces``
is added, as for ``OTEL_EXPORTER_OTLP_ENDPOINT``) or the full traces URL (as for
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``). Given none, the environment's is used, then the
OpenTelemetry default ``http://localhost:4318``. Setting an environment variable alone does not
turn tracing on: a variable meant for another program must not make drpo send anything.

Prompt and answer text goes into spans only when asked for (``content = true``, ``--trace-content``
or the conventions' switch ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``); headers
(an API token of the collector) come only from ``OTEL_EXPORTER_OTLP_HEADERS``, never from a file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, field_validator
from yarl import URL

from drpo.errors import UserError

#: The OpenTelemetry default OTLP/HTTP endpoint (the SDK's own default).
DEFAULT_ENDPOINT = "http://localhost:4318"
TRACES_PATH = "/v1/traces"
#: The GenAI conventions' content-capture switch (as the Python GenAI instrumentations read it).
CAPTURE_CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"


class TraceURLError(UserError, ValueError):
    """An endpoint that is not an http(s) URL; the message shows a good one."""


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of ``endpoint`` (a base URL gets ``/v1/traces``); raises
    :class:`TraceURLError` for anything that is not an absolute http(s) URL."""
    text = endpoint.strip()
    try:
        url = URL(text)
    except (TypeError, ValueError) as exc:
        raise TraceURLError(_bad_url(text, str(exc))) from None
    if url.scheme not in ("http", "https") or not url.host:
        raise TraceURLError(_bad_url(text, "it needs http:// or https:// and a host"))
    if url.user or url.password:
        raise TraceURLError(
            _bad_url(text, "credentials do not belong in it; set OTEL_EXPORTER_OTLP_HEADERS")
        )
    try:
        url.port  # noqa: B018 - a port that is not a number raises here
    except ValueError as exc:
        raise TraceURLError(_bad_url(text, str(exc))) from None
    if url.path in ("", "/"):
        url = url.with_path(TRACES_PATH)
    return str(url)


def _bad_url(text: str, why: str) -> str:
    return (
        f"trace endpoint {text!r} is not an OTLP/HTTP URL ({why}); "
        "give one like http://127.0.0.1:6006 (Phoenix) or http://localhost:4318/v1/traces"
    )


def env_endpoint(environ: Mapping[str, str] | None = None) -> str | None:
    """The traces endpoint the standard environment variables name, if any."""
    env = os.environ if environ is None else environ
    return env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")


def content_from_env(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return env.get(CAPTURE_CONTENT_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class TraceSettings(BaseModel):
    """``[trace]``: send the run's spans over OTLP/HTTP while it runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    #: Base or full OTLP/HTTP URL; None: the environment's, else the OpenTelemetry default.
    endpoint: str | None = None
    #: Put prompt and answer text into the spans (opt-in, as the conventions require).
    content: bool = False
    #: Longest wait, when the process ends, for the collector to take the last spans.
    flush_timeout_s: float = Field(default=5.0, gt=0)

    @field_validator("endpoint")
    @classmethod
    def _endpoint_is_a_url(cls, value: str | None) -> str | None:
        if value is not None:
            traces_url(value)
        return value

    def url(self, environ: Mapping[str, str] | None = None) -> str:
        """The traces URL spans are sent to (raises :class:`TraceURLError` when malformed)."""
        return traces_url(self.endpoint or env_endpoint(environ) or DEFAULT_ENDPOINT)

    def captures_content(self, environ: Mapping[str, str] | None = None) -> bool:
        return self.content or content_from_env(environ)
