"""A sweep in several worker processes (``workers``, ``drpo optimize --workers``) against the strict
simulated server: the same runs as in one process, limits split so that together they keep to
each endpoint's, local models refused, and a sweep whose every process is killed (SIGKILL)
resumes without paying for a recorded call again.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from fakeserver import serve_fake_openai
from sim_server_main import (
    assert_nothing_recorded_was_sent_again,
    journal,
    model_flags,
    query_db,
    run_drpo,
    run_status,
    sim_models,
    start_drpo,
    wait_for,
    wait_until_quiet,
)
from simulated_llm import respond

from drpo.backends.settings import EndpointSettings, LocalSettings
from drpo.jobs.config import ConfigError, build_config
from drpo.jobs.optimize import RunPlan
from drpo.jobs.workers import (
    WorkerReport,
    endpoint_shares,
    limit_share,
    run_in_workers,
    run_sweep,
    split,
    worker_count,
)
from drpo.runs.store import RunStore

SEEDS = (0, 1, 2)


def api_config(base_url: str, seed: int, **top: Any):
    model = f"openai:sim@{base_url}"
    return build_config(
        overrides={
            "preset": "paper",
            "models": {"base": model, "critic": model, "editor": model},
            "search": {"depth": 4, "depth_extension": 1, "num_train_queries": 12, "seed": seed},
            "proposer": {"k": 0},
            **top,
        }
    )


async def _sweep(db: Path, base_url: str, workers: int) -> tuple[list[dict[str, Any]], list]:
    """The sweep's runs as comparable values (everything but the run id), and worker reports."""
    plans = [RunPlan(config=api_config(base_url, seed)) for seed in SEEDS]
    reports: list[WorkerReport] = []
    async with RunStore.open(db) as store:
        if workers == 1:
            outcomes = await run_sweep(plans, store=store, workers=1)
        else:
            config = plans[0].config
            outcomes = await run_in_workers(
                plans, store=store, workers=workers, endpoints=config.endpoints, reports=reports
            )
        runs = []
        for outcome in outcomes:
            assert outcome.status == "finished", outcome.error
            calls = await store.list_calls(outcome.run_id)
            record = await store.get_run(outcome.run_id)
            kinds = Counter(
                [m.envelope.payload.kind async for m in store.iter_messages(outcome.run_id)]
            )
            summary = dict(outcome.summary or {})
            summary.pop("artifact")  # the path holds the run id
            artifact = summary.pop("artifact_json")
            artifact.pop("run_id")
            runs.append(
                {
                    "settings": record.config["settings"],
                    "queries": record.config["queries"],
                    "summary": summary,
                    "artifact": artifact,
                    "trace": outcome.result.trace if outcome.result else None,
                    "keys": sorted(call.key for call in calls),
                    "tries": sum(call.tries for call in calls),
                    "messages": kinds,
                }
            )
    return runs, reports


@pytest.mark.anyio
@pytest.mark.network
async def test_two_workers_make_the_same_runs_as_one_process(tmp_path: Path) -> None:
    with serve_fake_openai(models=sim_models(), responder=respond, latency_s=0.005) as server:
        alone, _ = await _sweep(tmp_path / "one.db", server.base_url, workers=1)
        sent_alone = server.total
        together, reports = await _sweep(tmp_path / "two.db", server.base_url, workers=2)
        sent_together = server.total - sent_alone
    # the searches ran in two other processes...
    pids = {report.pid for report in reports}
    assert len(pids) == 2 and os.getpid() not in pids
    assert sorted(len(report.outcomes) for report in reports) == [1, 2]
    # ...and made the same runs: settings, queries, results, journal keys, transcript
    assert together == alone
    assert sent_together == sent_alone == sum(run["tries"] for run in alone)


def test_limits_are_split_so_the_workers_keep_to_them_together() -> None:
    limited = EndpointSettings(rpm=3000, tpm=90_000, max_in_flight=10)
    shares = [limit_share(limited, part / 5) for part in (3, 2)]  # 5 searches, 3 + 2
    assert [s.rpm for s in shares] == [1800, 1200]
    assert [s.tpm for s in shares] == [54_000, 36_000]
    assert [s.max_in_flight for s in shares] == [6, 4]
    assert sum(s.max_in_flight for s in shares) <= limited.max_in_flight
    assert limit_share(limited, 1.0) == limited
    # an endpoint without settings gets a share of the defaults' in-flight guard
    config = api_config("http://127.0.0.1:9/v1", 0)
    [(spec, share)] = endpoint_shares([RunPlan(config=config)], {}, 0.5).items()
    assert spec == "openai:sim@http://127.0.0.1:9/v1"
    assert share.max_in_flight == EndpointSettings().max_in_flight // 2 and share.rpm is None
    assert limit_share(LocalSettings(), 0.5) == LocalSettings()
    # round robin, never more workers than searches
    assert split(list(range(5)), 2) == [[0, 2, 4], [1, 3]]
    assert worker_count([RunPlan(config=config)] * 3, 8) == 3
    with pytest.raises(ConfigError):
        worker_count([], 0)


def test_workers_is_a_setting_not_recorded_with_the_run() -> None:
    config = api_config("http://127.0.0.1:9/v1", 0, workers=3)
    assert config.workers == 3
    assert "workers" not in config.model_dump(mode="json")
    assert build_config().workers == 1
    with pytest.raises(ConfigError):
        build_config(overrides={"workers": 0})


@pytest.mark.anyio
async def test_local_models_are_refused_with_several_workers(tmp_path: Path) -> None:
    plans = [RunPlan(config=build_config(overrides={"search": {"seed": s}})) for s in (1, 2)]
    async with RunStore.open(tmp_path / "drpo.db") as store:
        with pytest.raises(ConfigError, match="local:smollm2 would be loaded once per worker"):
            await run_sweep(plans, store=store, workers=2)
        assert await store.list_runs() == []  # refused before anything was created


# ------------------------------------------------------------------------------ killed sweep

SETTINGS = ("--preset", "paper", "--k", "0", "--depth", "6", "--num-queries", "12")


def _slow(info: Any) -> float:
    return 0.05 + int(info.body_hash[:4], 16) % 100 / 1000


def _owners(db: Path) -> dict[str, int]:
    return {row["run_id"]: row["pid"] for row in query_db(db, "SELECT run_id, pid FROM leases")}


def _all_mid_run(db: Path, proc: Any) -> dict[str, int] | None:
    """The workers' pids by run once both runs have journaled calls past their root."""
    if proc.poll() is not None:
        raise AssertionError(f"drpo exited ({proc.returncode}) before it could be killed")
    owners = _owners(db)
    if len(owners) < 2:
        return None
    for run_id in owners:
        rows = query_db(
            db, "SELECT count(*) FROM messages WHERE run_id = ? AND kind = 'level_completed'",
            (run_id,),
        )  # fmt: skip
        if not rows or rows[0][0] < 2:
            return None
    return owners


@pytest.mark.network
def test_a_killed_multi_worker_sweep_resumes_without_paying_twice(tmp_path: Path) -> None:
    db = tmp_path / "drpo.db"
    with serve_fake_openai(models=sim_models(), responder=respond, latency_s=_slow) as server:
        proc = start_drpo(
            "optimize", "--db", str(db), *model_flags(server.base_url), *SETTINGS,
            "--seed", "1", "--seed", "2", "--workers", "2", "--out", str(tmp_path / "out"),
            cwd=tmp_path, output=tmp_path / "optimize.log",
        )  # fmt: skip
        try:
            owners = wait_for(lambda: _all_mid_run(db, proc), timeout=120, what="both mid-run")
            assert proc.pid not in owners.values() and len(set(owners.values())) == 2
            for pid in {*owners.values(), proc.pid}:  # every process of the sweep, at once
                os.kill(pid, signal.SIGKILL)
            proc.wait(timeout=30)
            # reaped (by init: their parent is dead), so the leases' owners read as dead
            wait_for(lambda: not any(map(_exists, owners.values())), timeout=30, what="reaped")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        split_at = wait_until_quiet(server)
        before = {run_id: journal(db, run_id) for run_id in owners}
        assert all(before.values())
        assert {run_status(db, run_id)[0] for run_id in owners} == {"running"}  # nobody wrote
        server.latency_s = 0.005
        for run_id in owners:  # a dead owner on this machine: taken over at once
            resumed = run_drpo("resume", run_id, "--db", str(db), cwd=tmp_path, timeout=180)
            assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        arrivals = server.arrivals
    after = {run_id: journal(db, run_id) for run_id in owners}
    sent_by_resume = Counter(a.body_hash for a in arrivals[split_at:])
    assert_nothing_recorded_was_sent_again(
        [e for entries in before.values() for e in entries],
        [e for entries in after.values() for e in entries],
        sent_by_resume,
        arrivals,
    )
    assert all(run_status(db, run_id) == ("finished", None) for run_id in owners)
    assert sum(e.replayed for entries in after.values() for e in entries) > 0


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "zombie" in status.read_text())


@pytest.mark.network
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_workers_stop_and_record_their_runs_when_the_parent_stops_or_dies(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """Ctrl-C of the sweep (the parent asks each worker to stop), or ``kill -9`` of the parent
    alone (each worker sees it is orphaned): either way every worker records its runs
    interrupted and exits, so none goes on paying for calls nobody will read."""
    db = tmp_path / "drpo.db"
    with serve_fake_openai(models=sim_models(), responder=respond, latency_s=_slow) as server:
        proc = start_drpo(
            "optimize", "--db", str(db), *model_flags(server.base_url), *SETTINGS,
            "--seed", "1", "--seed", "2", "--workers", "2",
            cwd=tmp_path, output=tmp_path / "optimize.log",
        )  # fmt: skip
        try:
            owners = wait_for(lambda: _all_mid_run(db, proc), timeout=120, what="both mid-run")
            proc.send_signal(sig)
            returncode = proc.wait(timeout=60)
            wait_for(
                lambda: not any(map(_alive, owners.values())), timeout=30, what="workers to exit"
            )
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        wait_until_quiet(server)
    log = (tmp_path / "optimize.log").read_text(encoding="utf-8")
    assert returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL), log
    assert [run_status(db, run_id)[0] for run_id in owners] == ["interrupted"] * 2, log
    assert _owners(db) == {}  # leases released: `drpo resume` takes them without --force
