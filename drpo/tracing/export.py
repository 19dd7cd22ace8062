"""A recorded run sent as a trace after the fact: ``drpo runs export RUN --otlp URL`` and
``--otlp-file spans.jsonl``.

The spans are rebuilt from the store alone, so a run made without tracing (finished,
interrupted, resumed, or one whose collector was down) can be sent later, and the same run sent
twice has the same trace and span ids: a collector that already holds it ignores the copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread

from drpo.errors import UserError
from drpo.runs.store import RunRecord, RunStore
from drpo.tracing.spans import SpanRecord, build_spans

#: Spans per export request (the SDK's default batch size).
BATCH = 512


class TraceExportError(UserError, RuntimeError):
    """The collector did not take the trace; the message says where and why."""


@dataclass(frozen=True)
class ExportSummary:
    run_id: str
    trace_id: str
    spans: int
    where: str


async def load_spans(store: RunStore, run: RunRecord, *, content: bool) -> list[SpanRecord]:
    """Every span of ``run`` as the store records it now."""
    messages = [message async for message in store.iter_messages(run.run_id)]
    calls = await store.list_calls(run.run_id)
    return build_spans(run, messages, calls, content=content)


async def export_run(
    store: RunStore,
    run_id: str,
    *,
    url: str | None = None,
    path: Path | None = None,
    content: bool = False,
) -> list[ExportSummary]:
    """Send the trace of ``run_id`` to the OTLP/HTTP ``url`` and/or write it to ``path`` (OTLP
    JSON lines, the file replaced); raises :class:`TraceExportError` when the collector fails."""
    from drpo.tracing import otel

    otel.require_otel()
    run = await store.get_run(run_id)
    records = await load_spans(store, run, content=content)
    trace_id = f"{records[0].trace_id:032x}" if records else ""
    done = []
    if url is not None:
        await anyio.to_thread.run_sync(_send, records, url)
        done.append(ExportSummary(run.run_id, trace_id, len(records), url))
    if path is not None:
        await anyio.to_thread.run_sync(_write, records, path)
        done.append(ExportSummary(run.run_id, trace_id, len(records), str(path)))
    return done


def _send(records: list[SpanRecord], url: str) -> None:
    from drpo.tracing import otel

    spans = otel.to_readable(records, otel.resource())
    with otel.quiet_sdk_logs() as logs:
        exporter = otel.otlp_exporter(url)
        try:
            for start in range(0, len(spans), BATCH):
                if not otel.export_ok(exporter.export(spans[start : start + BATCH])):
                    raise TraceExportError(
                        f"could not send the trace to {url}: "
                        f"{logs.last or 'the collector did not take it'}"
                    )
        finally:
            exporter.shutdown()


def _write(records: list[SpanRecord], path: Path) -> None:
    from drpo.tracing import otel

    spans = otel.to_readable(records, otel.resource())
    path.write_text("", encoding="utf-8")  # a fresh file: the run's trace, not an appendix
    with otel.quiet_sdk_logs() as logs:
        exporter = otel.file_exporter(path)
        try:
            for start in range(0, len(spans), BATCH):
                if not otel.export_ok(exporter.export(spans[start : start + BATCH])):
                    raise TraceExportError(f"could not write the trace to {path}: {logs.last}")
        finally:
            exporter.shutdown()
