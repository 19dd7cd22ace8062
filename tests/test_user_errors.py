"""A bug never passes for a user's mistake (issue 19, item 6).

Only drpo's own user errors (:class:`drpo.errors.UserError` and what derives from it) print one
``error:`` line and exit 2; anything else (a ``KeyError`` is the case the issue found) prints its
traceback, and a run it stops is still recorded ``failed`` with the exception's name.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

import drpo
from drpo.agents.aspects import AspectCatalogue, AspectError
from drpo.agents.health import SearchCannotLearnError
from drpo.domain.events import RunStarted
from drpo.errors import UserError
from drpo.jobs.lifecycle import JobResult, RunLifecycle
from drpo.jobs.session import agent_session
from drpo.runs.store import RunStore

PACKAGE = Path(drpo.__file__).parent


def _drpo_exception_types() -> list[type[BaseException]]:
    """Every exception class defined in drpo's modules (imported, so each is really there)."""
    import importlib
    import pkgutil

    found = []
    for module_info in pkgutil.walk_packages([str(PACKAGE)], prefix="drpo."):
        try:
            module = importlib.import_module(module_info.name)
        except ImportError:  # an optional extra (otel) that is not installed here
            continue
        for value in vars(module).values():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == module.__name__
            ):
                found.append(value)
    return found


#: drpo's exceptions that are bugs or internal signals, never the user's to fix: each of these
#: must print a traceback. Every other exception class of drpo is a user error.
NOT_USER_ERRORS = {
    "drpo.agents.client.ProtocolError",  # an agent answered with the wrong type: a bug
    "drpo.agents.parsing.json_reader.ParseError",  # caught by the agents: an unreadable reply
    "drpo.agents.parsing.verdicts.ScoreRangeError",
    "drpo.agents.runtime.UnknownRunError",  # a request for a run never attached: a bug
    "drpo.backends.local_model.GenerationCancelled",  # internal: nobody reads the result
    "drpo.backends.openai_api._MalformedResponse",  # internal: becomes a backend error
    "drpo.backends.openai_http.HttpTransportError",  # internal: classified as a backend error
    "drpo.bus.bus.BusError",  # a topic nobody declared, a request nobody serves: bugs
    "drpo.bus.bus.NoServerError",
    "drpo.bus.bus.RemoteError",
    "drpo.bus.bus.UnknownTopicError",
    "drpo.runs.journal.BudgetExceeded",  # told by the journal's state, reported as a budget stop
    "drpo.runs.recorder.RecorderStoppedError",  # internal: the session is closing
}


def test_every_drpo_error_is_a_user_error_or_named_as_a_bug() -> None:
    """A new error type must choose: derive from UserError, or be listed here as a bug."""
    undecided = sorted(
        f"{kind.__module__}.{kind.__qualname__}"
        for kind in _drpo_exception_types()
        if not issubclass(kind, UserError)
        and f"{kind.__module__}.{kind.__qualname__}" not in NOT_USER_ERRORS
    )
    assert undecided == []


def test_lookup_errors_are_not_user_errors_but_an_unknown_aspect_is() -> None:
    assert not issubclass(KeyError, UserError) and not issubclass(LookupError, UserError)
    catalogue = AspectCatalogue.load_default()
    with pytest.raises(KeyError) as caught:  # still a mapping's KeyError for its callers
        catalogue["Humor"]
    assert isinstance(caught.value, AspectError) and isinstance(caught.value, UserError)
    assert str(caught.value).startswith("no aspect is named 'Humor'; the catalogue has ")


# ------------------------------------------------------------------------ the command


def _run_async_with(error: str) -> subprocess.CompletedProcess[str]:
    """A job coroutine raising ``error`` (a Python expression), run the way every job command
    runs its job: through ``run_async`` inside a typer command (a real process, so the
    traceback is the one a user would see)."""
    program = textwrap.dedent(
        f"""
        import typer
        from drpo.agents.health import SearchCannotLearnError
        from drpo.cli.support import run_async

        async def job():
            raise {error}

        app = typer.Typer(pretty_exceptions_enable=False)

        @app.command()
        def main() -> None:
            run_async(job)

        app()
        """
    )
    return subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120
    )


def test_a_key_error_in_a_job_prints_its_traceback_and_does_not_exit_2() -> None:
    result = _run_async_with("KeyError('node-7')")
    assert result.returncode not in (0, 2)
    assert "Traceback" in result.stderr and "KeyError: 'node-7'" in result.stderr
    assert "error:" not in result.stderr


def test_a_user_error_in_a_job_prints_one_line_and_exits_2() -> None:
    result = _run_async_with("SearchCannotLearnError('every verdict of level 1 was unreadable')")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: every verdict of level 1 was unreadable"


def test_a_user_error_inside_a_task_group_is_still_one_line() -> None:
    group = "ExceptionGroup('tasks', [SearchCannotLearnError('a'), SearchCannotLearnError('b')])"
    result = _run_async_with(group)
    assert result.returncode == 2 and result.stderr.strip() == "error: a"


def test_a_bug_beside_a_user_error_in_a_task_group_prints_the_traceback() -> None:
    group = "ExceptionGroup('tasks', [SearchCannotLearnError('a'), KeyError('b')])"
    result = _run_async_with(group)
    assert result.returncode not in (0, 2) and "Traceback" in result.stderr
    assert "KeyError: 'b'" in result.stderr


# ------------------------------------------------------------------------ the run's record


async def _run_job(db: Path, error: BaseException) -> tuple[BaseException | None, object]:
    """Run a job that raises ``error`` through the lifecycle every job uses; returns what the
    lifecycle raised (None when it returned) and the run's record."""

    async def job() -> JobResult[None]:
        raise error

    raised: BaseException | None = None
    async with RunStore.open(db) as store:
        run_id = await store.create_run("generate", {})
        async with agent_session(store) as session:
            lifecycle = RunLifecycle(session, run_id, sender="test")
            try:
                outcome = await lifecycle.run(job, RunStarted(config={}, queries=()))
            except Exception as exc:
                raised = exc
            else:
                assert outcome.status == "failed"
        return raised, await store.get_run(run_id)


@pytest.mark.anyio
async def test_a_bug_is_recorded_as_a_failed_run_naming_it_and_raised(tmp_path: Path) -> None:
    raised, record = await _run_job(tmp_path / "runs.db", KeyError("node-7"))
    assert isinstance(raised, KeyError)
    assert record.status == "failed" and record.error == "KeyError: 'node-7'"


@pytest.mark.anyio
async def test_a_user_error_fails_the_run_and_is_its_outcome(tmp_path: Path) -> None:
    error = SearchCannotLearnError("every verdict of level 1 was unreadable")
    raised, record = await _run_job(tmp_path / "runs.db", error)
    assert raised is None
    assert record.status == "failed"
    assert record.error == "SearchCannotLearnError: every verdict of level 1 was unreadable"


# ------------------------------------------------------------------------ interrupted, not failed


async def _interrupt_job(db: Path, on_cancel: BaseException) -> object:
    """Cancel a running job that answers its cancellation by raising ``on_cancel`` (as a worker
    that stops with an error does); returns the run's record."""
    started = anyio.Event()

    async def job() -> JobResult[None]:
        started.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            raise on_cancel from None
        raise AssertionError("unreachable")

    async with RunStore.open(db) as store:
        run_id = await store.create_run("generate", {})
        async with agent_session(store) as session:
            lifecycle = RunLifecycle(session, run_id, sender="test")
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(lifecycle.run, job, RunStarted(config={}, queries=()))
                    await started.wait()
                    scope.cancel()
            assert scope.cancelled_caught  # the cancellation came out, not the job's error
        return await store.get_run(run_id)


@pytest.mark.anyio
@pytest.mark.parametrize(
    "on_cancel",
    [RuntimeError("the model worker stopped"), SearchCannotLearnError("no verdicts")],
    ids=["bug", "user-error"],
)
async def test_a_job_that_raises_when_cancelled_is_recorded_interrupted(
    tmp_path: Path, on_cancel: BaseException
) -> None:
    record = await _interrupt_job(tmp_path / "runs.db", on_cancel)
    assert record.status == "interrupted" and record.error == "interrupted"
