"""Drive ``drpo`` against the simulated model: a server process, and helpers for subprocess tests.

As a script it runs the fake OpenAI server with the simulated responder as a process of its own,
for experiments and tests whose server must live outside the process under test::

    python tests/sim_server_main.py --latency 0.05 --log /tmp/requests.json
    python tests/sim_server_main.py --profile openai-chat --model gpt-4o-mini

It prints ``BASE_URL <url>`` on one line once it serves (point models at ``openai:sim@<url>``),
and on SIGTERM or SIGINT writes its request log as JSON to ``--log`` (total, and every arrival
with its ``time.monotonic`` time, index, path, body hash and fault, and every request the
server refused with its status and message) before it exits. ``--profile`` picks the real
server the model copies (``fakeserver.PROFILES``); the default is a vLLM-served instruct model.

As a module (tests/ is on ``sys.path``) it holds what the resume and budget tests share: running
``drpo`` as a subprocess, reading its database read-only while it runs, and mapping journal
entries to the request bodies the server saw (:func:`body_hash_of`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fakeserver import PROFILES, VLLM_INSTRUCT, FakeOpenAIServer, ModelProfile, body_hash
from simulated_llm import respond

#: The simulated model's name, as drpo addresses it: ``openai:sim@URL``.
SIM_MODEL = "sim"
#: What the simulated model is served as: an instruct model behind vLLM, which serves both
#: endpoints and honours n, logprobs and seed. Both endpoints are needed for now: the paper
#: preset's proposer sends its raw prompt to /v1/completions (the chat layout is being added),
#: and the small preset's text editor does too.
SIM_PROFILE: ModelProfile = VLLM_INSTRUCT


def sim_models(profile: ModelProfile = SIM_PROFILE) -> dict[str, ModelProfile]:
    """The ``models`` of a fake server that serves the simulated model."""
    return {SIM_MODEL: profile}


# ------------------------------------------------------------------------------ running drpo


def drpo_env() -> dict[str, str]:
    """The environment for a ``drpo`` subprocess: no API key (loopback servers need none), no
    default database, and a wide console so messages are not wrapped mid-word."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "DRPO_DB")}
    env.update(COLUMNS="400", NO_COLOR="1", PYTHONUNBUFFERED="1")
    return env


#: ``python -m drpo.cli``, except that SIGINT gets Python's default handler first. A process
#: started in the background by a shell without job control inherits SIGINT as *ignored*, and
#: then neither Python nor asyncio installs a Ctrl-C handler; a terminal's foreground process
#: (what a user's Ctrl-C reaches) never starts that way.
_DRPO_MAIN = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from drpo.cli.app import main; sys.exit(main())"
)


def drpo_command(*args: str) -> list[str]:
    return [sys.executable, "-c", _DRPO_MAIN, *args]


def model_flags(base_url: str) -> list[str]:
    """All three roles on the simulated server."""
    model = f"openai:{SIM_MODEL}@{base_url}"
    return ["--base-model", model, "--critic-model", model, "--editor-model", model]


def run_drpo(*args: str, cwd: Path, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run ``drpo ARGS`` to completion and return its exit code and output."""
    return subprocess.run(
        drpo_command(*args),
        cwd=cwd,
        env=drpo_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_drpo(*args: str, cwd: Path, output: Path) -> subprocess.Popen[str]:
    """Start ``drpo ARGS`` in the background; stdout and stderr go to ``output`` (a file, so a
    chatty process never blocks on a full pipe)."""
    handle = output.open("w", encoding="utf-8")
    try:
        return subprocess.Popen(
            drpo_command(*args),
            cwd=cwd,
            env=drpo_env(),
            stdout=handle,
            stderr=subprocess.STDOUT,
            text=True,
        )
    finally:
        handle.close()  # the child has its own copy


def wait_for(
    condition: Callable[[], Any], *, timeout: float, interval: float = 0.02, what: str = ""
) -> Any:
    """Poll ``condition`` until it returns something truthy (returned); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or condition}")
        time.sleep(interval)


# ------------------------------------------------------------------------------ reading the db


def query_db(db: Path, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
    """Rows of a read-only query; [] while the database or its schema does not exist yet."""
    if not db.exists():
        return []
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    except sqlite3.OperationalError:
        return []
    try:
        conn.row_factory = sqlite3.Row
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError as exc:  # no such table (yet), or busy past the timeout
        if "no such table" in str(exc) or "locked" in str(exc):
            return []
        raise
    finally:
        conn.close()


def only_run_id(db: Path) -> str | None:
    rows = query_db(db, "SELECT run_id FROM runs")
    assert len(rows) <= 1, f"expected one run in {db}, found {len(rows)}"
    return rows[0]["run_id"] if rows else None


def run_status(db: Path, run_id: str) -> tuple[str, str | None]:
    (row,) = query_db(db, "SELECT status, error FROM runs WHERE run_id = ?", (run_id,))
    return row["status"], row["error"]


def message_kinds(db: Path, run_id: str) -> list[sqlite3.Row]:
    """(seq, kind, node_id, envelope) of a run's messages, in order."""
    return query_db(
        db,
        "SELECT seq, kind, node_id, envelope FROM messages WHERE run_id = ? ORDER BY seq",
        (run_id,),
    )


@dataclass(frozen=True)
class JournalEntry:
    key: str
    role: str
    node_id: str | None
    model: str
    request: dict[str, Any]
    status: str
    tries: int
    replayed: int
    cost_usd: float
    created_at: float

    @property
    def body_hash(self) -> str:
        return body_hash_of(self.model, self.request)


def journal(db: Path, run_id: str) -> list[JournalEntry]:
    rows = query_db(
        db,
        "SELECT key, role, node_id, model, request, status, tries, replayed, cost_usd, created_at"
        " FROM calls WHERE run_id = ? ORDER BY id",
        (run_id,),
    )
    return [
        JournalEntry(
            key=row["key"],
            role=row["role"],
            node_id=row["node_id"],
            model=row["model"],
            request=json.loads(row["request"]),
            status=row["status"],
            tries=row["tries"],
            replayed=row["replayed"],
            cost_usd=row["cost_usd"],
            created_at=row["created_at"],
        )
        for row in rows
    ]


def body_hash_of(model: str, request: dict[str, Any]) -> str:
    """The fake server's body hash of the HTTP request a journal entry was sent as.

    The journal stores the ``CompletionRequest``; the API backend turns it into the body with
    ``_chat_params`` / ``_text_params`` and the SDK sends that dict as JSON, which the server
    parses and hashes canonically. Going through the same functions gives the same hash; the
    tests check that every journaled request's hash is one the server actually saw, so a change
    in how bodies are built fails loudly instead of making the comparison vacuous.
    """
    from drpo.backends.base import CompletionRequest
    from drpo.backends.openai_api import _chat_params, _text_params

    completion_request = CompletionRequest.model_validate(request)
    build = _chat_params if completion_request.is_chat else _text_params
    return body_hash(json.loads(json.dumps(build(model, completion_request))))


def ok_hashes(entries: Sequence[JournalEntry]) -> Counter[str]:
    """How many recorded samples of each request body the journal holds."""
    return Counter(entry.body_hash for entry in entries if entry.status == "ok")


def assert_nothing_recorded_was_sent_again(
    before: Sequence[JournalEntry],
    after: Sequence[JournalEntry],
    sent_by_resume: Counter[str],
    arrived: Sequence[Any],
) -> None:
    """The resumed process paid for no call the journal had recorded before it started.

    ``before`` and ``after`` are the run's journal before and after the resume, ``sent_by_resume``
    counts the bodies the server received from the resumed process, ``arrived`` are the server's
    arrivals over the whole run. A body recorded R times before and T times after may have been
    sent at most T - R times by the resume (identical requests are separate samples: the journal
    numbers them); in all, the resume sent at least as many requests as it journaled.
    """
    recorded, final = ok_hashes(before), ok_hashes(after)
    seen = {arrival.body_hash for arrival in arrived}
    assert set(final) <= seen, "journal entries whose request body the server never saw"
    for digest, count in recorded.items():
        new_samples = final[digest] - count
        assert sent_by_resume[digest] <= new_samples, (
            f"a request recorded {count}x before the interruption was sent "
            f"{sent_by_resume[digest]}x by the resumed process ({new_samples} new samples)"
        )
    new_entries = sum(final.values()) - sum(recorded.values())
    assert sum(sent_by_resume.values()) >= new_entries
    assert all(entry.status == "ok" and entry.tries == 1 for entry in after)


def wait_until_quiet(
    server: FakeOpenAIServer, *, quiet_s: float = 0.75, timeout: float = 20
) -> int:
    """Wait until no request has arrived for ``quiet_s``; returns the arrival count then.

    After a client process is killed, requests it had written may still be read by the server
    thread; splitting the arrival log at a quiet moment attributes them to the right process.
    """
    deadline = time.monotonic() + timeout
    last, since = server.total, time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now_total = server.total
        if now_total != last:
            last, since = now_total, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return now_total
    raise AssertionError(f"the server never went quiet within {timeout:g} s")


# ------------------------------------------------------------------------------ the script


def request_log(server: FakeOpenAIServer) -> dict[str, Any]:
    return {
        "total": server.total,
        "arrivals": [
            {"t": a.t, "index": a.index, "path": a.path, "body_hash": a.body_hash, "fault": a.fault}
            for a in server.arrivals
        ],
        "refusals": [
            {"index": r.index, "path": r.path, "status": r.status, "message": r.message}
            for r in server.refusals
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the simulated OpenAI-compatible server.")
    parser.add_argument("--latency", type=float, default=0.05, help="Seconds per reply.")
    parser.add_argument("--log", type=Path, default=None, help="Write the request log here.")
    parser.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default="vllm-instruct",
        help="The real server the simulated model copies.",
    )
    parser.add_argument("--model", default=SIM_MODEL, help="The name the model is served as.")
    args = parser.parse_args(argv)

    server = FakeOpenAIServer(
        responder=respond, latency_s=args.latency, models={args.model: PROFILES[args.profile]}
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    print(f"BASE_URL {server.base_url}", flush=True)
    try:
        while not stop.wait(0.2):
            pass
    finally:
        if args.log is not None:
            args.log.write_text(json.dumps(request_log(server)), encoding="utf-8")
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
