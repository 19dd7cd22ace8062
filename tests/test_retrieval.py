"""ICL retrieval with the real packaged all-MiniLM-L6-v2 model (loaded once, on the CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
from shared_data import SHARED_DATA, needs_shared_data

from drpo.agents.retrieval import ICLRetriever, RetrievalError, default_model_path, load_model
from drpo.data.loaders import default_icl_examples, load_icl_examples
from drpo.domain.values import ICLExample

PAPER_ICL = SHARED_DATA / "drpo" / "ICL_examples.json"


@pytest.fixture(scope="module")
def ours() -> ICLRetriever:
    return ICLRetriever(default_icl_examples())


def test_the_packaged_model_folder_is_found() -> None:
    path = Path(default_model_path())
    assert (path / "modules.json").is_file() and (path / "model.safetensors").is_file()


def test_solar_power_retrieves_the_renewable_energy_example_first(ours: ICLRetriever) -> None:
    (best, second) = ours.top_k("How do solar panels generate electricity for a home?", 2)
    assert best.query == "What are the most common types of renewable energy?"
    assert second.query != best.query


def test_a_harmful_query_retrieves_refusal_examples(ours: ICLRetriever) -> None:
    top = ours.top_k("Can you help me hack into my ex's Instagram account?", 2)
    assert all("I can't help" in e.answer for e in top)


@needs_shared_data
def test_the_papers_examples_work_too() -> None:
    retriever = ICLRetriever(load_icl_examples(PAPER_ICL))
    (best,) = retriever.top_k("What are the advantages of wind and solar power?", 1)
    assert best.query == "Can you tell me some common types of renewable energy sources?"


def test_batched_equals_one_by_one(ours: ICLRetriever) -> None:
    queries = ["Is it going to rain in London today?", "What is a Python tuple?"]
    assert ours.top_k_many(queries, 3) == [ours.top_k(q, 3) for q in queries]
    assert ours.top_k(queries[0], 1)[0].query == "What's the weather like in London right now?"
    assert ours.top_k(queries[1], 1)[0].query.startswith("What's the difference between a list")


def test_k_edge_cases(ours: ICLRetriever) -> None:
    everything = ours.top_k("anything", 100)
    assert sorted(e.query for e in everything) == sorted(e.query for e in ours.examples)
    assert ours.top_k("anything", 0) == []
    assert ICLRetriever([]).top_k("anything", 3) == []
    assert ours.top_k_many([], 2) == []


@pytest.mark.anyio
async def test_async_retrieval_matches_sync(ours: ICLRetriever) -> None:
    query = "How do wind turbines work?"
    assert await ours.atop_k(query, 2) == ours.top_k(query, 2)
    assert await ours.atop_k_many([query], 2) == [ours.top_k(query, 2)]


def test_models_are_cached_per_process(ours: ICLRetriever) -> None:
    assert load_model(default_model_path()) is load_model(default_model_path())


def test_a_missing_model_folder_is_a_clear_error(tmp_path: Path) -> None:
    retriever = ICLRetriever([ICLExample(query="q", answer="a")], model_path=str(tmp_path / "x"))
    with pytest.raises(RetrievalError, match="does not exist"):
        retriever.top_k("q", 1)
