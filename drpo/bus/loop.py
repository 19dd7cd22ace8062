"""The event loop every drpo process runs on: anyio on asyncio, with uvloop where it is installed.

Why uvloop: a busy run is CPU-bound in its one event loop (50 searches at once keep a core
saturated on an ordinary CPU), and every model call costs the loop several wake-ups: the HTTP
exchange, the journal's and the recorder's commits (each a round trip to aiosqlite's thread),
the bus's request and reply. uvloop (libuv under asyncio's interface, the loop uvicorn and
vLLM's server run on) does the same work for less CPU per wake-up; anyio selects it with its
``use_uvloop`` backend option, and every library drpo runs on the loop (aiohttp, aiosqlite,
anyio's threads and signals) works on it unchanged. It is a dependency except on Windows, which
uvloop does not support: there, and when ``DRPO_EVENT_LOOP=asyncio`` asks for it (to compare,
or to rule the loop out when debugging), drpo runs on asyncio's own loop.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from importlib.util import find_spec
from typing import Any, TypeVar, TypeVarTuple

import anyio

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

#: ``DRPO_EVENT_LOOP=asyncio`` runs on asyncio's own loop even where uvloop is installed.
LOOP_ENV = "DRPO_EVENT_LOOP"


def uses_uvloop() -> bool:
    """Whether :func:`run` runs on uvloop (installed, and not turned off by ``LOOP_ENV``)."""
    if os.environ.get(LOOP_ENV, "").strip().lower() == "asyncio":
        return False
    return find_spec("uvloop") is not None


def backend_options() -> dict[str, Any]:
    """anyio's asyncio backend options for drpo's loop (see the module's docstring)."""
    return {"use_uvloop": True} if uses_uvloop() else {}


def run(func: Callable[[*Ts], Awaitable[T]], *args: *Ts) -> T:
    """``anyio.run(func, *args)`` on drpo's event loop."""
    return anyio.run(func, *args, backend="asyncio", backend_options=backend_options())


__all__ = ["LOOP_ENV", "backend_options", "run", "uses_uvloop"]
