"""The bus's envelope: who sent what, in reply to what, because of what, for which run and node.

The bus carries any immutable value (:data:`P`) without knowing its type: the domain's messages
are not the transport's (see :mod:`drpo.domain`). An envelope made in a running process holds
its payload as it is; to read envelopes back from JSON, parametrize the envelope with a tagged
union of the payloads expected, ``Envelope[SomeUnion].model_validate_json(text)``, and
``Envelope[SomeUnion].model_validate_json(env.model_dump_json()) == env``: the round trip is
lossless, which is what makes transcripts and resume trustworthy.

The one payload the bus makes itself is :class:`Failure`, the reply of a handler that raised.
"""

from __future__ import annotations

import os
import time
from typing import Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

#: What an envelope carries: any immutable value with a literal ``kind`` (pydantic models here).
P = TypeVar("P")


def new_id() -> str:
    """128 random bits as hex, like uuid4().hex but about twice as fast (it is on every message)."""
    return os.urandom(16).hex()


class Failure(BaseModel):
    """An agent could not handle a request (its handler raised). Requesters see it as an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["failure"] = "failure"
    error_type: str
    message: str


class Envelope(BaseModel, Generic[P]):
    """A payload with its routing and provenance."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    payload: P
    topic: str
    sender: str
    run_id: str | None = None
    message_id: str = Field(default_factory=new_id)
    correlation_id: str | None = None
    causation_id: str | None = None
    node_id: str | None = None
    timestamp: float = Field(default_factory=time.time)
