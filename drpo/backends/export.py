"""Write a plain transformers copy (safetensors + tokenizer) of a local model, e.g. the GGUF one.

Why: ``transformers serve`` and other OpenAI-compatible servers want a normal model folder, and
a folder loads faster than de-quantizing the GGUF file at every start. A model loaded from GGUF
refuses ``save_pretrained``, so we build a fresh model from its config, copy the (de-quantized)
weights in and save that. The copy keeps the loaded dtype (float32 on the CPU), so it computes
exactly what :class:`~drpo.backends.local.LocalBackend` computes from the GGUF file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from drpo.backends.local import resolve_model_ref

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
    folder and moved into place, so an interrupted export never looks complete. Reuses the
    process-wide loaded model when the local backend has already loaded it on the CPU.
    """
    out = Path(out_dir) if out_dir is not None else default_plain_copy_dir(model_ref)
    out = out.expanduser().resolve()
    if is_complete_copy(out):
        return out
    resolved = resolve_model_ref(model_ref)
    from drpo.backends.local_model import load_model

    loaded = load_model(resolved, device="cpu")
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
