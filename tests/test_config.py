"""Settings layering, presets, clear errors; the call projection; the artifact format."""

from __future__ import annotations

import json

import pytest

from drpo.domain.values import ICLExample
from drpo.jobs.artifact import AlignedPrompt, ArtifactError
from drpo.jobs.config import ConfigError, build_config, load_toml
from drpo.jobs.projection import describe_projection, project_calls


def test_paper_preset_has_the_papers_defaults():
    config = build_config(overrides={"preset": "paper"})
    search = config.search
    assert (search.beam_size, search.n_actions, search.depth, search.depth_extension) == (
        2,
        3,
        20,
        10,
    )
    assert search.temperature == 0.2
    assert search.num_train_queries == 180
    assert config.proposer.k == 2
    assert config.critic.mode == "json"


def test_layers_preset_then_file_then_flags(tmp_path):
    path = tmp_path / "drpo.toml"
    path.write_text('preset = "paper"\n[search]\ndepth = 7\nbeam_size = 3\n')
    config = build_config(load_toml(path), {"search": {"depth": 9}})
    assert config.preset == "paper"
    assert config.search.depth == 9  # flag beats file
    assert config.search.beam_size == 3  # file beats preset
    assert config.search.n_actions == 3  # preset


def test_bad_settings_say_what_is_wrong(tmp_path):
    with pytest.raises(ConfigError, match=r"search\.beam_size"):
        build_config(overrides={"search": {"beam_size": 0}})
    with pytest.raises(ConfigError, match="unknown preset"):
        build_config(overrides={"preset": "huge"})
    with pytest.raises(ConfigError, match="no kind"):
        build_config(overrides={"models": {"base": "gpt-4o"}})
    with pytest.raises(ConfigError, match="unknown backend kind"):
        build_config(overrides={"models": {"critic": "anthropic:claude"}})
    with pytest.raises(ConfigError, match=r"search\.dpeth"):
        build_config(overrides={"search": {"dpeth": 3}})
    bad = tmp_path / "bad.toml"
    bad.write_text("[search\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")


def test_projection_matches_the_spec_call_counts():
    # spec §8: D=20, A=3, B=2 -> G=112 generations, O=37 optimizer requests, M=20: total 281
    config = build_config(overrides={"preset": "paper"})
    projection = project_calls(config)
    assert projection.proposer == 112
    assert projection.critic_judge == 112
    assert projection.editor == 37
    assert projection.critic_select == 20
    assert projection.total == 281
    # the bound at the extended depth: D=30 -> 431
    assert project_calls(config, 30).total == 431
    assert "281" in describe_projection(config)


def test_artifact_round_trip_and_errors(tmp_path):
    artifact = AlignedPrompt(
        system_prompt="Be kind.",
        icl_examples=(ICLExample(query="q", answer="<START>\na\n<END>"),),
        base_model="local:smollm2",
        run_id="abc",
        score=4.2,
    )
    path = artifact.save(tmp_path / "a" / "artifact.json")
    assert AlignedPrompt.load(path) == artifact
    assert json.loads(path.read_text())["format"] == "drpo.aligned-prompt/2"
    # a format-1 artifact still loads; its "chat" framing was today's "inference" layout
    old = json.loads(path.read_text()) | {"format": "drpo.aligned-prompt/1"}
    old["settings"] = {"proposer": {"framing": "chat", "k": 2}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    migrated = AlignedPrompt.load(tmp_path / "old.json")
    assert migrated.settings["proposer"] == {"framing": "inference", "k": 2}
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not JSON"):
        AlignedPrompt.load(tmp_path / "junk.json")
    (tmp_path / "other.json").write_text('{"hello": 1}')
    with pytest.raises(ArtifactError, match="not a drpo artifact"):
        AlignedPrompt.load(tmp_path / "other.json")
    with pytest.raises(ArtifactError, match="does not exist"):
        AlignedPrompt.load(tmp_path / "nope.json")
