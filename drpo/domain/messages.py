"""Every message of the search as one tagged union, to read messages back from JSON.

In a running search the bus carries these values as they are; this union is for the way back:
a stored transcript's ``{"kind": "judged", ...}`` becomes a :class:`~drpo.domain.requests.Judged`
again. Adding a message type is adding it here.
"""

from __future__ import annotations

from typing import Annotated, get_args

from pydantic import BaseModel, Field

from drpo.domain.events import LevelCompleted, NodeCreated, Note, RunFinished, RunStarted
from drpo.domain.requests import (
    Answer,
    AnswerRewritten,
    AspectsSelected,
    EditAnswer,
    EditPrompt,
    Judge,
    Judged,
    PromptCandidates,
    ProposeAnswer,
    SelectAspects,
)

#: Any message of the search, told apart by its ``kind``.
Message = Annotated[
    SelectAspects
    | AspectsSelected
    | ProposeAnswer
    | Answer
    | Judge
    | Judged
    | EditPrompt
    | PromptCandidates
    | EditAnswer
    | AnswerRewritten
    | RunStarted
    | NodeCreated
    | LevelCompleted
    | RunFinished
    | Note,
    Field(discriminator="kind"),
]

#: The classes of :data:`Message`.
MESSAGE_TYPES: tuple[type[BaseModel], ...] = get_args(get_args(Message)[0])
