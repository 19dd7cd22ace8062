"""Shared pytest configuration: async tests run on asyncio through anyio's pytest plugin, and no
test ever reads or writes the data of the user who runs the suite.

Every test gets a home of its own (``HOME``, ``XDG_DATA_HOME`` and ``DRPO_DB`` in a temporary
folder), and so does every session- and module-scoped fixture (set up before any test's), so a
job run without ``--db``, here or in a ``drpo`` subprocess, lands in a throwaway database instead
of ``~/.local/share/drpo/drpo.db``. Read-only caches of the user's stay where they are (the
Hugging Face cache, ``DRPO_CACHE_DIR``): models are looked up there, never written by drpo.
``tests/test_user_data.py`` proves a full suite run leaves a given home untouched.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = ("model_fixtures",)

#: The home of whoever runs the suite, as it was before the fixtures below replaced it.
USER_HOME = Path.home()
#: The caches a test may read from the user's home (found as they would be without the fixture).
USER_CACHES = {
    "HF_HOME": os.environ.get("HF_HOME")
    or str(Path(os.environ.get("XDG_CACHE_HOME") or USER_HOME / ".cache") / "huggingface"),
    "DRPO_CACHE_DIR": os.environ.get("DRPO_CACHE_DIR") or str(USER_HOME / ".cache" / "drpo"),
}


def _give_home(patch: pytest.MonkeyPatch, home: Path) -> None:
    """Point everything drpo derives its data folder from at ``home``."""
    for name, value in USER_CACHES.items():
        patch.setenv(name, value)
    data = home / ".local" / "share"
    patch.setenv("HOME", str(home))
    patch.setenv("XDG_DATA_HOME", str(data))
    patch.setenv("DRPO_DB", str(data / "drpo" / "drpo.db"))


@pytest.fixture(scope="session", autouse=True)
def session_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A home for the session- and module-scoped fixtures (a model load, a recorded run)."""
    home = tmp_path_factory.mktemp("session-home")
    with pytest.MonkeyPatch.context() as patch:
        _give_home(patch, home)
        yield home


@pytest.fixture(autouse=True)
def isolated_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """This test's own home, empty (its default database is ``$DRPO_DB`` inside it)."""
    home = tmp_path_factory.mktemp("home")
    _give_home(monkeypatch, home)
    return home


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
