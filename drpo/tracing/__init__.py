"""A run as an OpenTelemetry trace in the GenAI semantic conventions, live or after the fact.

:mod:`~drpo.tracing.spans` builds the spans from what the store records (runs, bus messages, the
call journal) and nothing else, so the trace sent while a run goes (:mod:`~drpo.tracing.live`)
and the one rebuilt later (:mod:`~drpo.tracing.export`) are the same spans with the same ids.
The OpenTelemetry SDK is an optional extra (``drpo[otel]``), imported by
:mod:`~drpo.tracing.otel` only when a trace is asked for.
"""
