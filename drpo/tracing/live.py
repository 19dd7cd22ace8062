"""Live tracing: a run's spans sent over OTLP/HTTP while it runs, by a process of their own.

The run's process starts one *follower* process (``python -m drpo.tracing.live``) per session,
tells it on its standard input which runs to follow, and tells it to end when the session ends.
The follower reads the run's database as ``drpo runs log --follow`` does (WAL readers never
block the writer), feeds what was committed to the same :class:`~drpo.tracing.spans.TraceBuilder`
an export uses, and hands every finished span to the SDK's batch span processor, which sends
them from its own thread. Why a process, not a thread of the run:

* **the run is unaffected.** Encoding OTLP in the SDK costs about 60 microseconds of Python per
  span (two spans per model call at least), which in the run's process would hold its event
  loop and its GIL for longer than drpo's whole call path takes (``benchmarks/callpath.py
  --trace``); in a process of its own it takes the run nothing;
* **a collector that is down or slow costs one warning** (from the follower) and nothing else:
  the run never waits for it, and when the session ends the follower gets ``flush_timeout_s`` to
  deliver the last spans before it is stopped;
* **the live trace is the export's trace**: it is built from the same committed rows by the
  same builder, so ``drpo runs export RUN --otlp URL`` later sends the very same spans (the
  collector keeps one copy), and a resumed run's follower sends the earlier attempts too.

The follower is told where to send (the traces URL) and whether spans may hold prompt and answer
text; it inherits the environment, so ``OTEL_EXPORTER_OTLP_HEADERS`` (a collector's token) and
the other ``OTEL_EXPORTER_OTLP_*`` settings reach the exporter without ever being written down.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import structlog

from drpo.bus import loop
from drpo.runs.store import RunStore
from drpo.tracing.settings import TraceSettings
from drpo.tracing.spans import SpanRecord, TraceBuilder

log = structlog.get_logger("drpo.tracing")

#: How often the follower reads what the run committed.
POLL_S = 0.25


def check(settings: TraceSettings) -> tuple[str, bool]:
    """The traces URL and content switch of ``settings``; raises a clear error (naming the
    extra, or showing a good URL) before anything runs."""
    from drpo.tracing.otel import require_otel

    url = settings.url()
    require_otel()
    return url, settings.captures_content()


class LiveTracer:
    """The run process's side: starts the follower on the first :meth:`follow`, ends it in
    :meth:`aclose` (bounded by ``flush_timeout_s``). Never raises into the run: a follower that
    cannot start or dies costs one warning."""

    def __init__(self, db: Path, settings: TraceSettings) -> None:
        self.url, self.content = check(settings)
        self.db = db
        self.flush_timeout_s = settings.flush_timeout_s
        self._process: anyio.abc.Process | None = None
        self._lock = anyio.Lock()
        self._broken = False
        self.followed: list[str] = []

    async def follow(self, run_id: str) -> None:
        """Send ``run_id``'s spans (its earlier attempts too) while it runs."""
        async with self._lock:
            if self._broken:
                return
            try:
                if self._process is None:
                    # its own session: a Ctrl-C stops the run, which then ends the follower
                    # itself, once the interruption is recorded and can be sent
                    self._process = await anyio.open_process(
                        self._command(),
                        stdin=subprocess.PIPE,
                        stdout=None,
                        stderr=None,
                        start_new_session=True,
                    )
                assert self._process.stdin is not None
                await self._process.stdin.send(f"follow {run_id}\n".encode())
                self.followed.append(run_id)
            except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                self._broken = True
                log.warning("tracing is off: its process could not start", error=str(exc))

    def _command(self) -> list[str]:
        command = [sys.executable, "-m", "drpo.tracing.live", "--db", str(self.db)]
        command += ["--url", self.url, "--flush-timeout", str(self.flush_timeout_s)]
        return command + (["--content"] if self.content else [])

    async def aclose(self) -> None:
        """Tell the follower the session ended; wait for it to send what is left, at most
        ``flush_timeout_s`` (then it is stopped: the export can send the rest later)."""
        process, self._process = self._process, None
        if process is None:
            return
        with anyio.CancelScope(shield=True):
            try:
                assert process.stdin is not None
                await process.stdin.send(b"end\n")
                await process.stdin.aclose()
            except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass
            with anyio.move_on_after(self.flush_timeout_s + 2):
                await process.wait()
                return
            process.kill()
            await process.wait()
            log.warning(
                "tracing: the collector did not take the last spans in time; "
                "`drpo runs export RUN --otlp URL` sends the whole trace again",
                url=self.url,
                runs=self.followed,
            )


# ------------------------------------------------------------------------------------ follower


@dataclass
class _Followed:
    """One run the follower reads: its builder and how far it has read."""

    run_id: str
    builder: TraceBuilder
    seq: int = 0
    call_id: int = 0
    failed: set[int] = field(default_factory=set)
    attempts: int = 0


class Follower:
    """The follower process: reads committed rows, builds spans, hands them to ``emit``."""

    def __init__(self, store: RunStore, emit: Any, *, content: bool) -> None:
        self.store = store
        self.emit = emit
        self.content = content
        self.runs: dict[str, _Followed] = {}

    async def follow(self, run_id: str) -> None:
        if run_id in self.runs:
            return
        run = await self.store.get_run(run_id)
        self.runs[run.run_id] = _Followed(run.run_id, TraceBuilder(run, content=self.content))

    async def poll(self) -> int:
        """Read what every followed run committed since the last poll; returns spans emitted."""
        sent = 0
        for followed in self.runs.values():
            sent += self._send(await self._read(followed))
        return sent

    async def _read(self, followed: _Followed) -> list[SpanRecord]:
        # Messages first, then the journal: the rows a reply refers to were committed before it.
        messages = [
            message
            async for message in self.store.iter_messages(followed.run_id, after_seq=followed.seq)
        ]
        calls = await self.store.calls_since(
            followed.run_id, followed.call_id, again=sorted(followed.failed)
        )
        builder = followed.builder
        builder.add_calls(calls)
        for call in calls:
            assert call.id is not None
            followed.call_id = max(followed.call_id, call.id)
            if call.status == "error":
                followed.failed.add(call.id)
            else:
                followed.failed.discard(call.id)
        followed.attempts += sum(1 for m in messages if m.envelope.payload.kind == "run_started")
        if followed.attempts > 1:  # a resumed run: its old entries are being replayed
            builder.set_replay_counts(await self.store.replay_counts(followed.run_id))
        if messages:
            followed.seq = messages[-1].seq
        return builder.add_messages(messages)

    async def finish(self) -> int:
        """The last poll, then close what is still open (a run whose process died)."""
        sent = await self.poll()
        for followed in self.runs.values():
            sent += self._send(followed.builder.finish())
        return sent

    def _send(self, records: Sequence[SpanRecord]) -> int:
        if records:
            self.emit(records)
        return len(records)


async def _commands(follower: Follower, ended: anyio.Event) -> None:
    """Read ``follow RUN`` / ``end`` lines from standard input; end of input ends too (the run's
    process is gone)."""
    stdin = anyio.wrap_file(sys.stdin)
    async for line in stdin:
        verb, _, argument = line.strip().partition(" ")
        if verb == "follow" and argument:
            await follower.follow(argument)
        elif verb == "end":
            break
    ended.set()


def _warn(text: str) -> None:
    print(f"drpo: warning: {text}", file=sys.stderr, flush=True)


async def _follow_main(db: Path, url: str, content: bool, flush_timeout_s: float) -> None:
    from drpo.tracing import otel

    with otel.quiet_sdk_logs() as logs:
        exporter = otel.warn_once_exporter(otel.otlp_exporter(url), _warn, url, logs)
        processor = otel.batch_processor(exporter)
        resource = otel.resource()

        def emit(records: Sequence[SpanRecord]) -> None:
            for span in otel.to_readable(records, resource):
                processor.on_end(span)

        async with RunStore.open(db, readonly=True) as store:
            follower = Follower(store, emit, content=content)
            ended = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(_commands, follower, ended)
                while not ended.is_set():
                    with anyio.move_on_after(POLL_S):
                        await ended.wait()
                    await follower.poll()
                tg.cancel_scope.cancel()
            await follower.finish()
        # a collector that is down gets no long goodbye: the run's process is waiting to exit
        timeout_s = 1.0 if exporter.failing else flush_timeout_s
        if not _shutdown(processor, timeout_s) and not exporter.warned:
            exporter.warned = True  # its export thread, still trying, must not warn again
            why = "no collector answered" if not exporter.sent else "the collector was too slow"
            _warn(
                f"tracing: could not send spans to {url} ({why} within {timeout_s:g} s); "
                "the run went on without them, and `drpo runs export RUN --otlp URL` sends "
                "its trace later"
            )
        elif exporter.dropped and not exporter.warned:
            _warn(f"tracing: {exporter.dropped} spans were not sent to {url}")
    sys.stderr.flush()
    os._exit(0)  # an exporter thread may still be stuck on the collector: leave it


def _shutdown(processor: Any, timeout_s: float) -> bool:
    """Flush and stop the batch processor, giving the collector ``timeout_s`` at most; False
    when that was not enough."""
    done = threading.Thread(target=processor.shutdown, daemon=True)
    done.start()
    done.join(timeout_s)
    return not done.is_alive()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Follow drpo runs and send their spans.")
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--content", action="store_true")
    parser.add_argument("--flush-timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    loop.run(_follow_main, args.db, args.url, args.content, args.flush_timeout)


if __name__ == "__main__":
    main()
