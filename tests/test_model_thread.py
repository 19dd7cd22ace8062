"""The model thread (drpo/backends/model_thread.py): one thread runs a model's work, in order.

No torch here: the thread is plain Python. That the engine's torch work runs on it is checked on
a tiny model in tests/test_engine_tiny.py.
"""

from __future__ import annotations

import threading

import pytest

from drpo.backends.model_thread import ModelThread


def test_call_runs_on_the_model_thread_and_returns_its_result() -> None:
    thread = ModelThread("test-model")
    try:
        assert thread.call(threading.get_ident) == thread.ident != threading.get_ident()
        assert thread.call(lambda a, b: a + b, 2, 3) == 5
        # From the thread itself (inside a call or the work), a call runs at once.
        assert thread.call(lambda: thread.call(threading.get_ident)) == thread.ident
    finally:
        thread.stop()


def test_an_error_of_a_call_is_raised_in_the_caller_and_the_thread_goes_on() -> None:
    thread = ModelThread("test-model")

    def fails() -> None:
        raise ValueError("no room")

    try:
        with pytest.raises(ValueError, match="no room"):
            thread.call(fails)
        assert thread.call(lambda: 7) == 7
    finally:
        thread.stop()


def test_work_runs_when_woken_and_again_while_it_says_more_is_left() -> None:
    thread = ModelThread("test-model")
    left = [3]
    seen: list[int | None] = []
    finished = threading.Event()

    def work() -> bool:
        seen.append(threading.get_ident())
        left[0] -= 1
        if left[0] <= 0:
            finished.set()
        return left[0] > 0

    try:
        thread.work = work
        thread.wake()
        assert finished.wait(10)
        assert thread.call(lambda: len(seen)) == 3  # then it sleeps: no fourth run
        assert set(seen) == {thread.ident}
        left[0] = 1
        finished.clear()
        thread.wake()
        assert finished.wait(10)
    finally:
        thread.stop()


def test_an_error_escaping_the_work_does_not_end_the_thread() -> None:
    thread = ModelThread("test-model")
    ran = threading.Event()

    def work() -> bool:
        ran.set()
        raise RuntimeError("bug")

    try:
        thread.work = work
        thread.wake()
        assert ran.wait(10)
        assert thread.call(lambda: "alive") == "alive"
    finally:
        thread.stop()


def test_a_stopped_thread_refuses_calls() -> None:
    thread = ModelThread("test-model")
    thread.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        thread.call(lambda: None)
