"""benchmarks/callpath.py keeps working: every client it compares makes its calls end to end.

A smoke test with a handful of calls per client against the simulated server process; it
asserts what was done, never how fast (timings belong to the benchmark, not to tests).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import callpath

pytestmark = pytest.mark.network


@pytest.fixture(scope="module")
def server() -> Iterator[callpath.Server]:
    with callpath.sim_server(0.0) as running:
        yield running


@pytest.mark.parametrize("mode", callpath.ORDER)
def test_every_client_makes_its_calls(server: callpath.Server, mode: str) -> None:
    runner = callpath.RUNNERS[mode]
    sample = anyio.run(lambda: runner(server, calls=12, concurrency=3, warmup=3, profile=None))
    assert sample.mode == mode and sample.calls == 12
    assert sample.cpu_s > 0 and sample.loop_cpu_s > 0 and sample.wall_s > 0
    assert sample.server_cpu_s >= 0


def test_the_report_prints_ratios_to_the_bare_clients_and_the_http_clients(
    server: callpath.Server, capsys: pytest.CaptureFixture[str]
) -> None:
    modes = ("aiohttp", "sdk", "drpo", *(f"drpo:{kind}" for kind in callpath.OTHER_CLIENTS))
    rounds = {
        mode: [
            anyio.run(
                lambda m=mode: callpath.RUNNERS[m](
                    server, calls=6, concurrency=2, warmup=2, profile=None
                )
            )
            for _ in range(2)
        ]
        for mode in modes
    }
    options = {"calls": 6, "concurrency": 2, "latency": 0.0, "rounds": 2, "callers": 2}
    args = type("Args", (), options)()
    callpath._print_report(rounds, rounds["drpo"][0], args)
    out = capsys.readouterr().out
    assert "drpo full path / bare SDK CPU per call" in out
    assert "one core carries" in out
    for kind in callpath.HTTP_CLIENTS:  # every client of the full path, in the comparison
        assert f"drpo     {kind}" in out


def test_every_mode_has_a_runner_and_a_note() -> None:
    assert set(callpath.ORDER) == set(callpath.RUNNERS) == set(callpath.NOTES)
    for kind in callpath.OTHER_CLIENTS:  # each compared layer runs on every HTTP client
        assert {f"backend:{kind}", f"drpo:{kind}"} <= set(callpath.ORDER)
