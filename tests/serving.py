"""Write a plain transformers copy (safetensors + tokenizer) of a local model, e.g. the GGUF one,
and serve such a copy with ``transformers serve``.

Why: ``transformers serve`` and other OpenAI-compatible servers want a normal model folder, and
a folder loads in well under a second where de-quantizing the GGUF file takes about 15 s. A model
loaded from GGUF refuses ``save_pretrained``, so we build a fresh model from its config, copy the
(de-quantized) weights in and save that.

dtype: the copy is always written in float32 (the de-quantized weights, nothing rounded away),
whatever dtype the backend computes in; the dtype is chosen when a copy is *loaded*.
:class:`~drpo.backends.local.LocalBackend` picks the device's default (bf16 on a CPU with native
bf16, see ``drpo.backends.local_model.default_dtype``), and :func:`start_transformers_serve`
passes the same default to ``transformers serve --dtype``, so both sides compute in one dtype and
their greedy answers can be compared exactly.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from drpo.backends.local_refs import resolve_model_ref

#: Written last: a folder with this file is a complete copy and is never rewritten.
COMPLETE_MARKER = ".drpo-plain-copy-complete"


def default_plain_copy_dir(model_ref: str = "smollm2") -> Path:
    """``$DRPO_CACHE_DIR/plain/<ref>`` (default ``~/.cache/drpo/plain/<ref>``)."""
    root = Path(os.environ.get("DRPO_CACHE_DIR", Path.home() / ".cache" / "drpo"))
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_ref.strip()) or "model"
    return root.expanduser() / "plain" / slug


def is_complete_copy(folder: str | Path) -> bool:
    """True when ``folder`` holds a finished copy (a half-written one has no marker)."""
    return (Path(folder) / COMPLETE_MARKER).is_file()


def save_plain_copy(model_ref: str = "smollm2", out_dir: str | Path | None = None) -> Path:
    """Save ``model_ref`` as a safetensors model folder with its tokenizer; return the folder.

    Idempotent: a complete copy is left as it is. The copy is written to a sibling temporary
    folder and moved into place, so an interrupted export never looks complete. The weights are
    saved in float32 (see the module docstring); the process-wide loaded model is reused when the
    local backend has already loaded it on the CPU in float32.
    """
    out = Path(out_dir) if out_dir is not None else default_plain_copy_dir(model_ref)
    out = out.expanduser().resolve()
    if is_complete_copy(out):
        return out
    resolved = resolve_model_ref(model_ref)
    from drpo.backends.local_model import load_model

    loaded = load_model(resolved, device="cpu", dtype="float32")
    staging = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _write_copy(loaded.model, loaded.tokenizer, staging)
        (staging / COMPLETE_MARKER).write_text(f"exported from {resolved.path}\n")
        _move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _write_copy(model: object, tokenizer: object, folder: Path) -> None:
    """Fresh model from the config, weights copied in, saved as safetensors with the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    source = model  # a GGUF-loaded model: refuses save_pretrained, so rebuild it
    config = source.config  # type: ignore[attr-defined]
    with torch.device("cpu"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=source.dtype)  # type: ignore[attr-defined]
    missing, unexpected = fresh.load_state_dict(source.state_dict(), strict=False)  # type: ignore[attr-defined]
    # Tied weights (lm_head = embeddings) may be listed once only; anything else is a real loss.
    tied = set(getattr(fresh, "_tied_weights_keys", None) or ())
    real_missing = [key for key in missing if key not in tied and "lm_head" not in key]
    if real_missing or unexpected:
        raise RuntimeError(
            f"weights do not match a fresh {type(fresh).__name__}: "
            f"missing {real_missing[:5]}, unexpected {unexpected[:5]}"
        )
    fresh.generation_config = source.generation_config  # type: ignore[attr-defined]
    fresh.save_pretrained(folder)
    tokenizer.save_pretrained(folder)  # type: ignore[attr-defined]


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename the finished copy into place; merge into an existing (incomplete) folder."""
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            staging.rename(out)
            return
        except OSError:  # someone created it meanwhile: fall through and merge
            pass
    marker = staging / COMPLETE_MARKER
    for item in staging.iterdir():
        if item != marker:
            target = out / item.name
            if item.is_dir():
                shutil.copytree(item, target, dirs_exist_ok=True)
            else:
                shutil.copy2(item, target)
    shutil.copy2(marker, out / COMPLETE_MARKER)  # last: only now is the copy complete


# --------------------------------------------------------------------------------------------
# transformers serve
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServedModel:
    """A running ``transformers serve``: its ``/v1`` base URL and the model name to send."""

    base_url: str
    model: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self, timeout_s: float = 15.0) -> None:
        """Terminate the server process we started; kill it if it does not exit in time."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout_s)


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


def start_transformers_serve(
    model_dir: str | Path,
    log_path: str | Path,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    extra_args: Sequence[str] = (),
    ready_timeout_s: float = 180.0,
) -> ServedModel:
    """Start ``transformers serve`` for ``model_dir`` on a free 127.0.0.1 port; wait until ready.

    Ready means ``GET /v1/models`` answers. The folder is the server's forced model, so it is
    loaded at start and the first request does not pay for the load. Offline: never downloads.
    ``dtype`` defaults to what ``LocalBackend`` picks on ``device`` (not the copy's float32), so
    the server and an in-process reference compute in the same dtype.
    """
    if dtype is None:
        from drpo.backends.local_model import default_dtype

        dtype = str(default_dtype(device)).removeprefix("torch.")
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
        device,
        "--dtype",
        dtype,
        "--log-level",
        "warning",
        *extra_args,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log_file = Path(log_path)
    with log_file.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    root = f"http://127.0.0.1:{port}"
    served = ServedModel(
        base_url=f"{root}/v1", model=str(model_dir), process=process, log_path=log_file
    )
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"transformers serve exited with {process.returncode}:\n"
                f"{log_file.read_text(errors='replace')[-3000:]}"
            )
        try:
            with urllib.request.urlopen(f"{root}/v1/models", timeout=2) as response:
                if response.status == 200:
                    return served
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    served.stop()
    raise RuntimeError(f"transformers serve did not answer within {ready_timeout_s} s")
