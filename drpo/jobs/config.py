"""Settings of a run, from a TOML file and command-line flags, with presets.

Three presets, for every job alike (optimize, icl, eval, generate):

* ``paper`` is the paper's code to the letter (spec §1-§4): its sizes and sampling, its JSON
  replies, its ICL block spelling, and none of drpo's repairs (no retries of unreadable replies,
  no fallback aspects, whole-number scores only, ...);
* ``robust`` has the paper's sizes with drpo's repairs on (README lists each: setting, the
  paper's behaviour, ours, why);
* ``small`` (the default) is ``robust`` sized for the embedded 135M model, so that every job
  with no files given finishes on a 2-core CPU in minutes: token probabilities instead of JSON
  verdicts, and plain-text rewrites.

Every run records its full settings.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from drpo.agents.search import SearchSettings
from drpo.backends.kinds import (
    DEFAULT_MODEL,
    is_chat_only,
    parse_model_spec,
    validate_endpoints,
)
from drpo.backends.settings import KindSettings
from drpo.domain.requests import CriticMode, CriticPolicyName, Framing, ICLHeaders
from drpo.errors import UserError
from drpo.tracing.settings import TraceSettings


class ConfigError(UserError, ValueError):
    """A settings file or flag that cannot be used; the message says what to fix."""


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelsSettings(_Settings):
    """Which model plays each role. The paper uses one strong API model for critic and editor."""

    base: str = DEFAULT_MODEL
    critic: str = DEFAULT_MODEL
    editor: str = DEFAULT_MODEL

    @model_validator(mode="after")
    def _specs_parse(self) -> ModelsSettings:
        for spec in (self.base, self.critic, self.editor):
            parse_model_spec(spec)
        return self


class ProposerSettings(_Settings):
    """The model being aligned, during the search (spec §1.1, §1.2)."""

    #: "auto": the paper's chat layout for chat-only API models, else the raw completion layout
    #: (settled when the run is created and recorded); or "raw", "chat", "inference".
    framing: Literal["auto", "raw", "chat", "inference"] = "auto"
    k: int = Field(default=2, ge=0, le=8)
    max_tokens: int = Field(default=2048, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    #: "paper": the ICL block spelled as the paper's code writes it; "uniform": like the query.
    icl_headers: ICLHeaders = "uniform"
    #: Cut a "# Query:" block a model invents after its answer (the paper keeps it).
    cut_runaway: bool = True


class CriticSettings(_Settings):
    mode: CriticMode = "json"
    #: Token limit of selection and JSON-verdict replies (the paper: 2048).
    max_tokens: int = Field(default=2048, ge=16)
    #: Extra aspects with their own rubric: [{name, description, rubric}].
    custom_aspects: tuple[dict[str, Any], ...] = ()
    #: "robust": drpo's repairs of the paper's critic; "paper": none of them.
    policy: CriticPolicyName = "robust"


class EditorSettings(_Settings):
    #: Token limit of a rewritten prompt (the paper: 2048).
    max_tokens: int = Field(default=2048, ge=16)
    #: "json" (the paper's analysis/thought/new_system_prompt reply) or "text" (the prompt is
    #: written as a plain continuation: for models too small to write that JSON).
    format: Literal["json", "text"] = "json"
    #: Ask once more, with a format reminder, for a rewrite that cannot be read (paper: no).
    retry_unreadable: bool = True


class GenerateSettings(_Settings):
    """Answering with an aligned prompt (spec §1.3; ``drpo generate`` and ``drpo eval``)."""

    k: int = Field(default=3, ge=0, le=8)
    max_tokens: int = Field(default=512, ge=1)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    #: "searched": the layout the prompt was searched with (no train/inference mismatch);
    #: "inference": the paper's inference layout (spec §1.3).
    framing: Literal["searched", "inference"] = "searched"


class ICLSettings(_Settings):
    """The offline optimization of the ICL examples' answers (spec §4)."""

    #: Rewrite rounds per example (the paper: 5).
    rounds: int = Field(default=5, ge=0)
    #: Token limit of a rewritten answer.
    max_tokens: int = Field(default=2048, ge=16)


class DataSettings(_Settings):
    #: Training queries (JSON list, JSONL or one per line). None: the shipped seed set.
    train: str | None = None
    #: ICL examples (the paper's {query: answer} JSON, or a list). None: the shipped seed set.
    icl: str | None = None
    #: A sentence-transformers model folder for retrieval. None: the packaged all-MiniLM-L6-v2.
    retriever: str | None = None


class BudgetSettings(_Settings):
    max_cost_usd: float | None = None
    max_calls: int | None = None

    def overridden_by(self, override: BudgetSettings | None) -> BudgetSettings:
        """This budget with every limit ``override`` sets (a resume's ``--max-calls``...)."""
        if override is None:
            return self
        return self.model_copy(update=override.model_dump(exclude_none=True))


class RunSettings(_Settings):
    """Every setting of a run, of any job (optimize, icl, eval, generate): the preset, then
    the TOML file, then flags or keyword sections (:func:`build_config`); a run records them
    all. (Named ``OptimizeConfig`` before it held the other jobs' settings too; that name
    stays, for callers who use it.)"""

    preset: Literal["small", "robust", "paper"] = "small"
    name: str | None = None
    models: ModelsSettings = ModelsSettings()
    search: SearchSettings = SearchSettings()
    proposer: ProposerSettings = ProposerSettings()
    critic: CriticSettings = CriticSettings()
    editor: EditorSettings = EditorSettings()
    generate: GenerateSettings = GenerateSettings()
    icl: ICLSettings = ICLSettings()
    data: DataSettings = DataSettings()
    #: Per model spec, that kind's settings (``[endpoints."openai:gpt-4o"]``).
    endpoints: dict[str, SerializeAsAny[KindSettings]] = Field(default_factory=dict)
    budget: BudgetSettings = BudgetSettings()
    #: Where this process sends its runs' spans (``[trace]``, ``--trace``). Not part of what a
    #: run is: left out of the settings recorded with it (a resume asks again with --trace).
    trace: TraceSettings = Field(default_factory=TraceSettings, exclude=True)
    #: Worker processes a sweep's searches run in (``workers = N``, ``--workers``; 1: all in
    #: this process, on one event loop). How this process runs a sweep, not part of what a run
    #: is: left out of the recorded settings, like ``trace``. See ``drpo.jobs.workers``.
    workers: int = Field(default=1, ge=1, exclude=True)

    @field_validator("endpoints", mode="before")
    @classmethod
    def _endpoints_by_kind(cls, value: Any) -> Any:
        return validate_endpoints(value) if isinstance(value, dict) else value

    def with_budget(self, override: BudgetSettings | None) -> RunSettings:
        """These settings with every limit ``override`` sets (a resume's ``--max-calls``...):
        the one budget merge, used by every job that resumes with new limits and by the CLI's
        projection of such a resume."""
        if override is None:
            return self
        return self.model_copy(update={"budget": self.budget.overridden_by(override)})

    def proposer_framing(self) -> Framing:
        """The concrete layout the search prompts the base model with (see :meth:`settled`)."""
        framing = self.proposer.framing
        if framing == "auto":
            return "chat" if is_chat_only(self.models.base) else "raw"
        return framing

    def settled(self) -> RunSettings:
        """This config made concrete for its models, as a run records it:

        * ``proposer.framing = "auto"``: the paper's chat layout for chat-only API models
          (OpenAI serves them only on chat completions), the raw completion layout otherwise
          (base models on vLLM, SGLang, TGI, and the embedded model), as the paper's code did;
        * ``editor.format = "text"`` is a raw continuation, which a chat-only editor model
          cannot take: such an editor writes the JSON reply instead.
        """
        update: dict[str, Any] = {}
        if self.proposer.framing == "auto":
            update["proposer"] = self.proposer.model_copy(
                update={"framing": self.proposer_framing()}
            )
        if self.editor.format == "text" and is_chat_only(self.models.editor):
            update["editor"] = self.editor.model_copy(update={"format": "json"})
        return self.model_copy(update=update) if update else self


#: The name :class:`RunSettings` had when only the search used it; kept for callers.
OptimizeConfig = RunSettings


#: The paper's code to the letter (spec §1-§4, §3.4): beam 2, 3 actions, depth 20 (+10),
#: T=0.2, k=2, 180 queries, JSON replies, and none of drpo's repairs. Meant for strong API models.
PAPER_PRESET: dict[str, Any] = {
    "preset": "paper",
    "search": {
        "beam_size": 2,
        "n_actions": 3,
        "depth": 20,
        "depth_extension": 10,
        "temperature": 0.2,
        "num_train_queries": 180,
        "history": 5,
    },
    "proposer": {
        "k": 2,
        "max_tokens": 2048,
        "temperature": 0.0,
        "top_p": 1.0,
        "icl_headers": "paper",
        "cut_runaway": False,
    },
    "critic": {"mode": "json", "max_tokens": 2048, "policy": "paper"},
    "editor": {"max_tokens": 2048, "format": "json", "retry_unreadable": False},
    "generate": {
        "k": 3,
        "max_tokens": 512,
        "temperature": 0.7,
        "top_p": 0.95,
        "framing": "inference",
    },
    "icl": {"rounds": 5, "max_tokens": 2048},
}

#: The paper's sizes and sampling with drpo's repairs on (see README for each one).
ROBUST_PRESET: dict[str, Any] = {
    **PAPER_PRESET,
    "preset": "robust",
    "proposer": {**PAPER_PRESET["proposer"], "icl_headers": "uniform", "cut_runaway": True},
    "critic": {**PAPER_PRESET["critic"], "policy": "robust"},
    "editor": {**PAPER_PRESET["editor"], "retry_unreadable": True},
    "generate": {**PAPER_PRESET["generate"], "framing": "searched"},
}

#: ``robust`` sized for the embedded SmolLM2-135M on a 2-core CPU: a short, narrow search with
#: the logprobs critic (a 135M model cannot write reliable JSON verdicts, but its digit
#: probabilities are usable) and plain-text rewrites.
SMALL_PRESET: dict[str, Any] = {
    **ROBUST_PRESET,
    "preset": "small",
    "search": {
        "beam_size": 2,
        "n_actions": 2,
        "depth": 5,
        "depth_extension": 2,
        "temperature": 0.7,
        "num_train_queries": 12,
        "history": 5,
    },
    "proposer": {**ROBUST_PRESET["proposer"], "k": 1, "max_tokens": 128},
    "critic": {**ROBUST_PRESET["critic"], "mode": "logprobs", "max_tokens": 256},
    "editor": {**ROBUST_PRESET["editor"], "max_tokens": 160, "format": "text"},
    "generate": {**ROBUST_PRESET["generate"], "max_tokens": 256},
    "icl": {"rounds": 2, "max_tokens": 320},
}

PRESETS = {"small": SMALL_PRESET, "robust": ROBUST_PRESET, "paper": PAPER_PRESET}


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def build_config(
    file_settings: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None
) -> RunSettings:
    """Preset, then the TOML file, then flags: later layers win."""
    file_settings = file_settings or {}
    overrides = overrides or {}
    preset = overrides.get("preset") or file_settings.get("preset") or "small"
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
    layered = _deep_merge(_deep_merge(PRESETS[preset], file_settings), overrides)
    layered["preset"] = preset
    try:
        return RunSettings.model_validate(layered)
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(exc)) from None
    except ValueError as exc:  # a model spec that does not parse
        raise ConfigError(str(exc)) from None


def _describe_validation_error(exc: ValidationError) -> str:
    lines = ["invalid settings:"]
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        lines.append(f"  {where}: {error['msg']}")
    return "\n".join(lines)


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
