"""A fake model call for agent tests: scripted replies, in order, and every request recorded."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from drpo.backends.base import Choice, Completion, CompletionRequest

Reply = str | list[str] | Completion | Callable[[CompletionRequest], Any]


class Scripted:
    """A fake model call: answers requests with scripted replies, in order, and records them.

    A reply is a text, a list of texts (one choice each), a Completion, or a function of the
    request returning one of those (sync or async). A call past the script fails the test.
    """

    def __init__(self, *replies: Reply) -> None:
        self.replies = list(replies)
        self.requests: list[CompletionRequest] = []

    async def __call__(self, request: CompletionRequest) -> Completion:
        self.requests.append(request)
        if not self.replies:
            raise AssertionError(f"unexpected extra call: {request}")
        reply = self.replies.pop(0)
        if callable(reply):
            reply = reply(request)
            if hasattr(reply, "__await__"):
                reply = await reply
        return as_completion(reply)


def as_completion(reply: str | list[str] | Completion) -> Completion:
    if isinstance(reply, Completion):
        return reply
    texts = [reply] if isinstance(reply, str) else reply
    return Completion(choices=tuple(Choice(text=t) for t in texts), model="fake")
