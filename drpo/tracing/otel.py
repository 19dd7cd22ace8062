"""The OpenTelemetry side: drpo's spans as SDK spans, and where they are sent.

Everything here imports the optional ``drpo[otel]`` extra (``opentelemetry-sdk``, the OTLP/HTTP
exporter, the OTLP JSON file exporter), so nothing else in drpo imports this module until a trace
is asked for; :func:`require_otel` says which extra to install when it is missing.

A collector that is down or slow must cost one warning and nothing else: :class:`WarnOnce` wraps
an exporter, reports its first failure as one line (the SDK would log every failed batch, with a
retry story each), and the SDK's own export loggers are quietened while a trace is sent.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from drpo.errors import UserError
from drpo.tracing.spans import SpanRecord

#: The extra that holds the OpenTelemetry SDK and exporters.
EXTRA = "otel"
_MODULES = (
    "opentelemetry.sdk.trace",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.json.file.trace_exporter",
)
#: Loggers of the SDK's export path, quietened while drpo sends a trace (it reports itself).
_EXPORT_LOGGERS = (
    "opentelemetry.exporter.otlp.common.http",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.json.file._internal",
    "opentelemetry.sdk._shared_internal",
    "opentelemetry.sdk.trace.export",
)


class OtelMissingError(UserError, RuntimeError):
    """The OpenTelemetry extra is not installed."""


def otel_available() -> bool:
    try:
        return all(importlib.util.find_spec(name) is not None for name in _MODULES)
    except ModuleNotFoundError:  # a parent package is missing
        return False


def require_otel() -> None:
    """Raise :class:`OtelMissingError` naming the extra when the SDK is not installed."""
    if not otel_available():
        raise OtelMissingError(
            f"tracing needs the OpenTelemetry SDK: pip install 'drpo[{EXTRA}]' "
            "(opentelemetry-sdk and the OTLP exporters)"
        )


def resource() -> Any:
    """The spans' resource: service ``drpo`` (``OTEL_SERVICE_NAME`` and
    ``OTEL_RESOURCE_ATTRIBUTES`` override and add, as everywhere in OpenTelemetry)."""
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource

    from drpo import __version__

    return Resource.create({SERVICE_NAME: "drpo", SERVICE_VERSION: __version__})


def to_readable(records: Sequence[SpanRecord], resource_: Any) -> list[Any]:
    """drpo's span records as the SDK's ``ReadableSpan`` (what exporters take)."""
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

    from drpo import __version__

    scope = InstrumentationScope("drpo", __version__)
    sampled = TraceFlags(TraceFlags.SAMPLED)
    kinds = {"internal": SpanKind.INTERNAL, "client": SpanKind.CLIENT}
    spans = []
    for record in records:
        context = SpanContext(record.trace_id, record.span_id, is_remote=False, trace_flags=sampled)
        parent = (
            SpanContext(record.trace_id, record.parent_id, is_remote=False, trace_flags=sampled)
            if record.parent_id is not None
            else None
        )
        links = [
            Link(SpanContext(record.trace_id, span_id, is_remote=False, trace_flags=sampled))
            for span_id in record.links
        ]
        status = (
            Status(StatusCode.ERROR, record.error)
            if record.error is not None
            else Status(StatusCode.UNSET)
        )
        spans.append(
            ReadableSpan(
                name=record.name,
                context=context,
                parent=parent,
                resource=resource_,
                attributes=record.attributes,
                links=links,
                kind=kinds[record.kind],
                status=status,
                start_time=record.start_ns,
                end_time=record.end_ns,
                instrumentation_scope=scope,
            )
        )
    return spans


def otlp_exporter(url: str) -> Any:
    """The SDK's OTLP/HTTP (protobuf) span exporter for ``url``; headers, timeout, compression
    and certificates come from the standard ``OTEL_EXPORTER_OTLP_*`` variables."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=url)


def file_exporter(path: Path) -> Any:
    """The OTLP JSON file exporter: one ``ExportTraceServiceRequest`` in JSON per line, the
    OpenTelemetry file format (``otelcol``'s file receiver and otel-desktop-viewer read it)."""
    from opentelemetry.exporter.otlp.json.file.trace_exporter import FileSpanExporter

    return FileSpanExporter(path)


def warn_once_exporter(
    exporter: Any, warn: Callable[[str], None], where: str, logs: SdkLogs | None = None
) -> Any:
    """``exporter``, reporting its first failed export through ``warn`` (once, with the reason
    the SDK logged, from ``logs``) and counting the spans it could not deliver in ``.dropped``."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class WarnOnce(SpanExporter):
        def __init__(self) -> None:
            self.inner = exporter
            self.warned = False
            self.dropped = 0
            self.sent = 0
            #: The last export failed: the collector is down (or refusing) right now.
            self.failing = False

        def export(self, spans: Sequence[Any]) -> Any:
            try:
                result = self.inner.export(spans)
            except Exception as exc:  # an exporter must not take the process down
                result, reason = SpanExportResult.FAILURE, f"{type(exc).__name__}: {exc}"
            else:
                reason = (logs.last if logs else None) or "the collector did not take them"
            self.failing = result is not SpanExportResult.SUCCESS
            if not self.failing:
                self.sent += len(spans)
                return result
            self.dropped += len(spans)
            if not self.warned:
                self.warned = True
                warn(
                    f"tracing: could not send spans to {where} ({reason}); the run goes on "
                    "without them, and `drpo runs export RUN --otlp URL` sends its trace later"
                )
            return result

        def shutdown(self) -> None:
            self.inner.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return bool(self.inner.force_flush(timeout_millis))

    return WarnOnce()


class SdkLogs(logging.Filter):
    """Drops the SDK's export-path log records, keeping the first one's text (the cause of a
    failed export: later ones tell of retries and giving up) for drpo's one-line warning."""

    def __init__(self) -> None:
        super().__init__()
        self.last: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and self.last is None:
            text = " ".join(record.getMessage().split())
            self.last = text if len(text) <= 300 else text[:297] + "..."
        return False


@contextmanager
def quiet_sdk_logs() -> Iterator[SdkLogs]:
    """Silence the SDK's export-path loggers for the block (drpo reports failures once)."""
    drop = SdkLogs()
    loggers = [logging.getLogger(name) for name in _EXPORT_LOGGERS]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield drop
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


def export_ok(result: Any) -> bool:
    """Whether an exporter's result says the spans were taken."""
    from opentelemetry.sdk.trace.export import SpanExportResult

    return bool(result is SpanExportResult.SUCCESS)


def batch_processor(exporter: Any, *, delay_ms: float = 500.0) -> Any:
    """The SDK's batch span processor: spans are queued and sent from its own thread."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    return BatchSpanProcessor(exporter, schedule_delay_millis=delay_ms)
