"""A whole DRPO search through the real stack (bus, agents, journal, store, OpenAI backend)
against a loopback OpenAI-compatible server that simulates the model."""

from __future__ import annotations

import pytest
from fakeserver import serve_fake_openai
from sim_server_main import sim_models
from simulated_llm import respond

from drpo.jobs.artifact import AlignedPrompt
from drpo.jobs.config import build_config
from drpo.jobs.optimize import RunPlan, run_searches
from drpo.runs.store import RunStore

pytestmark = [pytest.mark.anyio, pytest.mark.network]


def api_config(base_url: str, **search):
    """The paper preset on the simulated model. It needs a server with both endpoints
    (``sim_models()``): the proposer sends its raw prompt to /v1/completions until the chat
    layout lands, which an OpenAI chat model refuses."""
    model = f"openai:sim@{base_url}"
    return build_config(
        overrides={
            "preset": "paper",
            "models": {"base": model, "critic": model, "editor": model},
            "search": {"depth": 4, "depth_extension": 2, "num_train_queries": 12, **search},
            "proposer": {"k": 0},
        }
    )


async def test_search_runs_end_to_end_and_records_everything(tmp_path):
    with serve_fake_openai(models=sim_models(), responder=respond) as server:
        config = api_config(server.base_url)
        async with RunStore.open(tmp_path / "drpo.db") as store:
            plans = [RunPlan(config=config, artifact_path=tmp_path / "artifact.json")]
            [outcome] = await run_searches(plans, store=store)
            assert outcome.status == "finished", outcome.error
            run = await store.get_run(outcome.run_id)
            calls = await store.list_calls(outcome.run_id)
            totals = await store.run_totals(outcome.run_id)
            kinds = [m.envelope.payload.kind async for m in store.iter_messages(outcome.run_id)]
    assert run.status == "finished"
    artifact = AlignedPrompt.load(tmp_path / "artifact.json")
    assert artifact.run_id == outcome.run_id
    assert artifact.system_prompt == outcome.result.best.system_prompt
    assert run.result["best_prompt"] == artifact.system_prompt
    # every request the server answered is in the journal, once
    assert len(calls) == server.total
    assert set(totals.by_role) == {"proposer", "critic", "editor"}
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
    levels = outcome.result.levels
    assert kinds.count("level_completed") == levels - 1
    assert kinds.count("node_created") >= levels


async def test_sweep_runs_concurrently_on_shared_backends(tmp_path):
    with serve_fake_openai(models=sim_models(), responder=respond, latency_s=0.02) as server:
        configs = [api_config(server.base_url, seed=seed) for seed in (1, 2, 3)]
        async with RunStore.open(tmp_path / "drpo.db") as store:
            outcomes = await run_searches([RunPlan(config=c) for c in configs], store=store)
        # three searches were in flight together
        assert server.max_in_progress > 6
    assert [o.status for o in outcomes] == ["finished"] * 3
    assert len({o.run_id for o in outcomes}) == 3
