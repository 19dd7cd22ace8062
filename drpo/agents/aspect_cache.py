"""The one cache of aspect selections, with one key.

A selection depends on the query, the critic model, how it selects (mode, the search's or the
ICL stage's variant), the aspect catalogue and the prompt wording; :meth:`AspectCache.key` puts
all of them in one :class:`AspectKey`. Two tiers share that key: each run's own selections in
memory (so every node of a run is judged on the same aspects of a query, and concurrent askers
wait for one call), and the database's ``aspect_cache`` table, shared by later runs. A fallback
selection (the critic's reply could not be read) is never written to the table: one formatting
glitch must not fix a query's aspects for every later run.
"""

from __future__ import annotations

from dataclasses import dataclass

from drpo.agents.aspects import AspectCatalogue
from drpo.agents.critic import CriticPolicy
from drpo.agents.prompts import PROMPTS_VERSION
from drpo.domain.requests import CriticMode
from drpo.domain.values import AspectSelection
from drpo.runs.store import RunStore, query_hash

#: ``AspectSelection.analysis`` marks a selection the critic could not make (see the critic).
FALLBACK_MARK = ("fallback", "true")


@dataclass(frozen=True)
class AspectKey:
    """Which selection: the query (hashed with how it is selected), the model, the versions."""

    query_hash: str
    model: str
    version: str

    @property
    def place(self) -> str:
        """Where the selection's model calls sit in a run's journal: one place per query."""
        return f"aspects:{self.query_hash[:16]}"


def selection_query_hash(query: str, mode: CriticMode, variant: str) -> str:
    """The query part of a selection's key: the query with how it is selected."""
    return query_hash(f"{variant}/{mode}\x00{query}")


def selection_place(query: str, mode: CriticMode, variant: str) -> str:
    """Where the selection for ``query`` makes its model calls in a run's journal (see
    :attr:`AspectKey.place`), for readers of the journal such as the trace builder."""
    return AspectKey(selection_query_hash(query, mode, variant), "", "").place


def is_fallback(selection: AspectSelection) -> bool:
    return selection.analysis.get(FALLBACK_MARK[0]) == FALLBACK_MARK[1]


class AspectCache:
    """The database tier of the aspect cache, addressed by :class:`AspectKey`."""

    def __init__(self, store: RunStore) -> None:
        self.store = store

    @staticmethod
    def key(
        *,
        query: str,
        model: str,
        mode: CriticMode,
        variant: str,
        policy: CriticPolicy,
        catalogue: AspectCatalogue,
    ) -> AspectKey:
        return AspectKey(
            query_hash=selection_query_hash(query, mode, variant),
            model=model,
            version=f"{catalogue.version}:{PROMPTS_VERSION}:{policy.selection_version}",
        )

    async def get(self, key: AspectKey) -> AspectSelection | None:
        return await self.store.get_aspect_selection(key.query_hash, key.model, key.version)

    async def put(self, key: AspectKey, selection: AspectSelection) -> None:
        """Remember a selection for later runs; a fallback selection is not remembered."""
        if not is_fallback(selection):
            await self.store.put_aspect_selection(key.query_hash, key.model, key.version, selection)
