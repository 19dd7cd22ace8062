"""drpo: Dynamic Rewarding with Prompt Optimization as an asynchronous, event-driven agent system.

The public API, for callers in Python (the ``drpo`` command does the same from a shell)::

    import drpo

    run = drpo.optimize(preset="robust", base_model="openai:gpt-4o-mini",
                        critic_model="openai:gpt-4o", editor_model="openai:gpt-4o")
    answers = drpo.generate(["How do I start running?"], artifact=run.summary["artifact"])

Names are imported on first use, so ``import drpo`` (and ``drpo --help``) stays fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

#: Public name -> the module that defines it.
_EXPORTS = {
    "optimize": "drpo.api",
    "aoptimize": "drpo.api",
    "icl": "drpo.api",
    "aicl": "drpo.api",
    "generate": "drpo.api",
    "agenerate": "drpo.api",
    "evaluate": "drpo.api",
    "aevaluate": "drpo.api",
    "resume": "drpo.api",
    "aresume": "drpo.api",
    "settings": "drpo.api",
    "AlignedPrompt": "drpo.jobs.artifact",
    "OptimizeConfig": "drpo.jobs.config",
    "RunSettings": "drpo.jobs.config",
    "RunOutcome": "drpo.jobs.lifecycle",
    "SearchResult": "drpo.agents.search",
    "ICLExample": "drpo.domain.values",
    "RunStore": "drpo.runs.store",
}

__all__ = [
    "AlignedPrompt",
    "ICLExample",
    "OptimizeConfig",
    "RunOutcome",
    "RunSettings",
    "RunStore",
    "SearchResult",
    "__version__",
    "aevaluate",
    "agenerate",
    "aicl",
    "aoptimize",
    "aresume",
    "evaluate",
    "generate",
    "icl",
    "optimize",
    "resume",
    "settings",
]

if TYPE_CHECKING:
    from drpo.agents.search import SearchResult
    from drpo.api import (
        aevaluate,
        agenerate,
        aicl,
        aoptimize,
        aresume,
        evaluate,
        generate,
        icl,
        optimize,
        resume,
        settings,
    )
    from drpo.domain.values import ICLExample
    from drpo.jobs.artifact import AlignedPrompt
    from drpo.jobs.config import OptimizeConfig, RunSettings
    from drpo.jobs.lifecycle import RunOutcome
    from drpo.runs.store import RunStore


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'drpo' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
