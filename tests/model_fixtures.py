"""Session-scoped fixtures around the real embedded model, for any test module to use.

Register them once for the whole suite in ``tests/conftest.py`` (or per test module) with::

    pytest_plugins = ("model_fixtures",)

* ``local_backend``: the embedded SmolLM2 loaded once per session (GGUF) in the device's default
  dtype (bf16 on a GPU or on a CPU with native bf16, else float32). Other
  ``LocalBackend("smollm2")`` instances made after it reuse the same loaded model at no cost, so
  a test that needs its own batch settings or fresh stats just makes one (one that asks for
  another dtype loads a second copy, once per session).
* ``plain_model_dir``: a float32 safetensors copy of the embedded model, kept across sessions in
  pytest's cache folder (``.pytest_cache``, ignored by git); ``LocalBackend(str(dir))`` loads
  it in well under a second, in the same default dtype.
* ``transformers_server``: a real ``transformers serve`` on 127.0.0.1 serving that copy in that
  same default dtype (a :class:`~serving.ServedModel` with ``base_url`` and the ``model`` name
  to send), so its greedy answers can be compared with ``LocalBackend``'s exactly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest

if TYPE_CHECKING:
    from serving import ServedModel

    from drpo.backends.local import LocalBackend

# Tests must never reach the network for models; set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def local_backend() -> Iterator[LocalBackend]:
    """The embedded model behind one shared ``LocalBackend``, loaded once for the session."""
    from drpo.backends.local import LocalBackend

    backend = LocalBackend("smollm2")
    backend.load()
    yield backend
    anyio.run(backend.aclose)


@pytest.fixture(scope="session")
def plain_model_dir(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A plain transformers copy of the embedded model (exported once, reused across sessions)."""
    from serving import save_plain_copy

    cache = getattr(request.config, "cache", None)
    root = cache.mkdir("drpo-models") if cache is not None else tmp_path_factory.mktemp("models")
    return save_plain_copy("smollm2", Path(root) / "smollm2-plain")


@pytest.fixture(scope="session")
def transformers_server(
    plain_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServedModel]:
    """A ``transformers serve`` of the embedded model's plain copy, for the whole session."""
    from serving import start_transformers_serve

    log_path = tmp_path_factory.mktemp("transformers-serve") / "serve.log"
    served = start_transformers_serve(plain_model_dir, log_path)
    try:
        yield served
    finally:
        served.stop()
