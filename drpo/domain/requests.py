"""What each agent is asked, and what it answers: one request and one reply type per service.

Each class has a literal ``kind``, so a message read back from JSON (the run store, a transcript)
comes back as the same class (see :mod:`drpo.domain.messages`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from drpo.domain.values import AspectSelection, Critique, ICLExample, Value

#: How the critic selects aspects and scores answers: "json" (the paper's JSON replies) or
#: "logprobs" (token probabilities: yes/no per aspect, the expected 1-5 digit per score).
CriticMode = Literal["json", "logprobs"]
#: Which of drpo's repairs of the paper's critic are on (see ``drpo.agents.critic.CriticPolicy``).
CriticPolicyName = Literal["robust", "paper"]


class SelectAspects(Value):
    kind: Literal["select_aspects"] = "select_aspects"
    query: str
    model: str
    variant: Literal["search", "icl"] = "search"
    max_tokens: int = 2048
    #: "json": the paper's selection reply; "logprobs": yes/no probabilities per aspect.
    mode: CriticMode = "json"
    policy: CriticPolicyName = "robust"
    #: A selection asked for ahead of need (no verdict waits for it yet): its model calls yield
    #: to the ones the search is waiting on, where a backend can order its work (local batches).
    background: bool = False


class AspectsSelected(Value):
    kind: Literal["aspects_selected"] = "aspects_selected"
    selection: AspectSelection


#: How the aligned model is prompted: "raw" (one completion prompt: the paper's search layout
#: for models it served itself), "chat" (the paper's layout for chat-only API models: the
#: instructions and examples as the system message, the framed query as the user message), or
#: "inference" (the paper's inference layout: no "# instructions" header).
Framing = Literal["raw", "chat", "inference"]
#: How the ICL examples are headed: "paper" ("# Query:" first, then "#Query:"/"#Answer:", as the
#: paper's code writes them) or "uniform" ("# Query:"/"# Answer:" everywhere, like the query).
ICLHeaders = Literal["paper", "uniform"]


class ProposeAnswer(Value):
    kind: Literal["propose_answer"] = "propose_answer"
    model: str
    system_prompt: str
    icl_examples: tuple[ICLExample, ...] = ()
    query: str
    framing: Framing = "raw"
    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    icl_headers: ICLHeaders = "uniform"
    #: Cut a runaway continuation (a "# Query:" block the model invents after its answer).
    cut_runaway: bool = True


class Answer(Value):
    kind: Literal["answer"] = "answer"
    text: str


class Judge(Value):
    kind: Literal["judge"] = "judge"
    model: str
    query: str
    answer: str
    #: The aspects to judge on; None: the query's own, selected (once per run) by the critic.
    selection: AspectSelection | None = None
    mode: CriticMode = "json"
    variant: Literal["search", "icl"] = "search"
    max_tokens: int = 2048
    policy: CriticPolicyName = "robust"


class Judged(Value):
    kind: Literal["judged"] = "judged"
    critique: Critique


class EditPrompt(Value):
    kind: Literal["edit_prompt"] = "edit_prompt"
    model: str
    system_prompt: str
    query: str
    answer: str
    critique: Critique
    #: The last prompts of the path, the current one included (the editor shows at most 5).
    history: tuple[str, ...] = ()
    n: int = Field(default=1, ge=1)
    temperature: float = 0.2
    max_tokens: int = 2048
    #: "json": the paper's reply format; "text": a plain continuation, for small models.
    format: Literal["json", "text"] = "json"
    #: Most prompts of the path the editor is shown, the current one included (paper: 5).
    history_limit: int = Field(default=5, ge=1)
    #: Ask once more, with a format reminder, for a candidate that cannot be read (paper: no).
    retry_unreadable: bool = True


class PromptCandidates(Value):
    kind: Literal["prompt_candidates"] = "prompt_candidates"
    prompts: tuple[str, ...]
    dropped: int = 0


class EditAnswer(Value):
    kind: Literal["edit_answer"] = "edit_answer"
    model: str
    query: str
    answer: str
    critique: Critique
    max_tokens: int = 2048
    #: "json": the paper's {analysis, thought, new_response}; "text": a plain continuation.
    format: Literal["json", "text"] = "json"
    #: Ask once more, with a format reminder, when the rewrite cannot be read (paper: once too,
    #: through a bare retry of the same call).
    retry_unreadable: bool = True


class AnswerRewritten(Value):
    kind: Literal["answer_rewritten"] = "answer_rewritten"
    answer: str | None
    error: str | None = None
