"""drpo's event loop: uvloop where it is installed, asyncio's own when asked for."""

from __future__ import annotations

import asyncio

import pytest

from drpo.bus import loop


async def _loop_module(tag: str) -> tuple[str, str]:
    return type(asyncio.get_running_loop()).__module__, tag


def test_drpo_runs_on_uvloop_where_it_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("uvloop")  # a dependency everywhere but Windows
    monkeypatch.delenv(loop.LOOP_ENV, raising=False)
    assert loop.uses_uvloop()
    module, tag = loop.run(_loop_module, "x")
    assert module.startswith("uvloop") and tag == "x"


def test_asyncio_s_own_loop_when_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(loop.LOOP_ENV, "asyncio")
    assert not loop.uses_uvloop() and loop.backend_options() == {}
    module, _ = loop.run(_loop_module, "y")
    assert module.startswith("asyncio")
