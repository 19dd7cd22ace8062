"""The aligned-prompt artifact: what a run produces and what ``drpo generate`` uses.

A plain JSON file (never pickle, which the paper's code used and which needs its module paths to
load): the system prompt, the ICL examples to retrieve from, the base model, the settings, the
reward trace per level, and the run id it came from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from drpo.data.files import write_atomically
from drpo.domain.values import ICLExample
from drpo.errors import UserError

ARTIFACT_FORMAT = "drpo.aligned-prompt/2"
#: Format 1 called the inference layout "chat"; format 2 calls it "inference" and uses "chat"
#: for the paper's layout for chat-only models. Format 1 artifacts are read and translated.
FORMATS = (ARTIFACT_FORMAT, "drpo.aligned-prompt/1")


class ArtifactError(UserError, ValueError):
    """A file that is not a readable drpo artifact."""


class LevelTrace(BaseModel):
    model_config = ConfigDict(frozen=True)
    level: int
    best_score: float
    mean_score: float


class AlignedPrompt(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format: str = ARTIFACT_FORMAT
    system_prompt: str
    icl_examples: tuple[ICLExample, ...] = ()
    base_model: str
    run_id: str | None = None
    settings: dict[str, Any] = Field(default_factory=dict)
    score: float | None = None
    trace: tuple[LevelTrace, ...] = ()
    held_out: tuple[dict[str, Any], ...] = ()

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file + rename) so a crash never leaves half an artifact."""
        return write_atomically(path, self.model_dump_json(indent=2))

    @classmethod
    def load(cls, path: str | Path) -> AlignedPrompt:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ArtifactError(f"artifact {path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"artifact {path} is not JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("format") not in FORMATS:
            raise ArtifactError(
                f'{path} is not a drpo artifact (expected "format": "{ARTIFACT_FORMAT}")'
            )
        if data["format"] != ARTIFACT_FORMAT:
            data = _from_format_1(data)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ArtifactError(f"artifact {path} is malformed: {exc}") from None


def _from_format_1(data: dict[str, Any]) -> dict[str, Any]:
    """A format-1 artifact in format 2: its "chat" framing was the inference layout."""
    settings = dict(data.get("settings") or {})
    proposer = dict(settings.get("proposer") or {})
    if proposer.get("framing") == "chat":
        proposer["framing"] = "inference"
        settings["proposer"] = proposer
    return {**data, "format": ARTIFACT_FORMAT, "settings": settings}
