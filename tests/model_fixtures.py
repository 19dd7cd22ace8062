"""Session-scoped fixtures around the real embedded model, for any test module to import.

Use them from a test module or conftest with::

    from model_fixtures import local_backend, plain_model_dir, transformers_server  # noqa: F401

* ``local_backend``: the embedded SmolLM2 loaded once per session (GGUF, CPU float32 or GPU
  bf16). Other ``LocalBackend("smollm2")`` instances made after it reuse the same loaded model
  at no cost, so a test that needs its own batch settings or fresh stats just makes one.
* ``plain_model_dir``: a safetensors copy of the embedded model, kept across sessions in
  pytest's cache folder (``.pytest_cache``, ignored by git); loads in well under a second.
* ``transformers_server``: a real ``transformers serve`` on 127.0.0.1 serving that copy
  (a :class:`ServedModel` with ``base_url`` and the ``model`` name to send).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest

if TYPE_CHECKING:
    from drpo.backends.local import LocalBackend

# Tests must never reach the network for models; set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SERVER_START_TIMEOUT_S = 180.0


@pytest.fixture(scope="session")
def local_backend() -> Iterator[LocalBackend]:
    """The embedded model behind one shared ``LocalBackend``, loaded once for the session."""
    from drpo.backends.local import LocalBackend

    backend = LocalBackend("smollm2")
    backend.load()
    yield backend
    anyio.run(backend.aclose)


@pytest.fixture(scope="session")
def plain_model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain transformers copy of the embedded model (exported once, reused across sessions)."""
    from drpo.backends.export import save_plain_copy

    cache = getattr(request.config, "cache", None)
    root = cache.mkdir("drpo-models") if cache is not None else tmp_path_factory.mktemp("models")
    return save_plain_copy("smollm2", Path(root) / "smollm2-plain")


@dataclass(frozen=True)
class ServedModel:
    """A running OpenAI-compatible server: where it is and which model name to send."""

    base_url: str
    model: str
    process: subprocess.Popen[bytes]
    log_path: Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def transformers_cli() -> list[str]:
    """The ``transformers`` command of this interpreter's environment."""
    script = Path(sys.executable).with_name("transformers")
    if script.exists():
        return [str(script)]
    return [
        sys.executable,
        "-c",
        "import sys; from transformers.cli.transformers import main; sys.exit(main())",
    ]


def start_transformers_serve(model_dir: Path, log_path: Path, *, extra_args: tuple[str, ...] = ()) -> ServedModel:
    """Start ``transformers serve`` for ``model_dir`` on a free loopback port; wait until ready.

    Ready means ``GET /v1/models`` answers; the model itself is preloaded (it is the server's
    forced model), so the first request does not pay for the load.
    """
    port = free_port()
    command = [
        *transformers_cli(),
        "serve",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--log-level",
        "warning",
        *extra_args,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log = log_path.open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    log.close()
    base = f"http://127.0.0.1:{port}"
    served = ServedModel(base_url=f"{base}/v1", model=str(model_dir), process=process, log_path=log_path)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"transformers serve exited with {process.returncode}:\n{log_path.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(f"{base}/v1/models", timeout=2) as response:
                if response.status == 200:
                    return served
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    stop_server(served)
    raise RuntimeError(f"transformers serve did not answer within {SERVER_START_TIMEOUT_S} s")


def stop_server(served: ServedModel) -> None:
    """Terminate the server we started (by its process), killing it if it does not exit."""
    if served.process.poll() is None:
        served.process.terminate()
        try:
            served.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            served.process.kill()
            served.process.wait(timeout=15)


@pytest.fixture(scope="session")
def transformers_server(plain_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedModel]:
    """A ``transformers serve`` of the embedded model's plain copy, for the whole session."""
    log_path = tmp_path_factory.mktemp("transformers-serve") / "serve.log"
    served = start_transformers_serve(plain_model_dir, log_path)
    try:
        yield served
    finally:
        stop_server(served)
