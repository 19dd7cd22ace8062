"""A deterministic stand-in for a remote model, for the loopback fake OpenAI server.

It recognises which drpo role sent a request (aspect selection, JSON judge, digit judge,
prompt editor, answer editor, or the proposer) from the prompt's wording and answers in the
shape that role expects. Every reply is a pure function of the request body, so two runs that
ask the same things get the same answers: what the resume tests and the search benchmark need.
Test doubles live in tests/ only; benchmarks import this module from here.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

ASPECTS = ("Helpfulness", "Clarity", "Factuality", "Depth", "Engagement", "Safety")


def _text_of(body: Mapping[str, Any]) -> str:
    if "messages" in body:
        return "\n".join(str(m.get("content", "")) for m in body["messages"])
    return str(body.get("prompt", ""))


def _digest(text: str, salt: str = "") -> int:
    return int(hashlib.sha256((salt + text).encode()).hexdigest()[:12], 16)


def role_of(body: Mapping[str, Any]) -> str:
    """Which drpo role made the request, from its prompt's wording."""
    text = _text_of(body)
    if '"aspects_selection"' in text:
        return "select"
    if "Answer with one digit" in text:
        return "judge_digit"
    if "Answer yes or no." in text:
        return "relevance"
    if "Improved system prompt:" in text:
        return "edit_prompt_text"
    if "Below is the same answer rewritten" in text:
        return "edit_answer_text"
    if '"rationale"' in text and "Aspects and their scales" in text:
        return "judge"
    if '"new_system_prompt"' in text:
        return "edit_prompt"
    if '"new_response"' in text:
        return "edit_answer"
    return "propose"


def _aspects_in(text: str) -> list[str]:
    """The aspect keys of a judge template: lines like '  "Name": {"rationale": ...'."""
    return re.findall(r'^\s*"([A-Za-z -]+)": \{"rationale"', text, re.MULTILINE)


def respond(body: Mapping[str, Any]) -> str | list[str]:
    """The reply text (or one per choice when n > 1) for a request body."""
    text = _text_of(body)
    role = role_of(body)
    n = int(body.get("n") or 1)
    if role == "select":
        h = _digest(text)
        count = 2 + h % 4
        chosen = [ASPECTS[(h // 7 + i) % len(ASPECTS)] for i in range(count)]
        return json.dumps(
            {
                "query_analysis": {
                    "main_topic": "t",
                    "user_intent": "u",
                    "ambiguities": "",
                    "response_format": "prose",
                    "challenges": "",
                },
                "aspects_selection": {"reasoning": "simulated", "selected_aspects": chosen},
            }
        )
    if role == "judge":
        verdict = {
            name: {"rationale": "simulated", "score": 1 + _digest(text, name) % 5}
            for name in _aspects_in(text)
        }
        return json.dumps(verdict)
    if role == "judge_digit":
        return str(1 + _digest(text) % 5)
    if role == "relevance":
        return "yes" if _digest(text) % 3 else "no"
    if role == "edit_answer_text":
        return f"Improved answer {_digest(text) % 1000}: a direct reply, then the details.\n<END>"
    if role == "edit_prompt_text":
        return [
            f" a careful assistant (revision {_digest(text, str(i)) % 100000}).\n"
            "- Answer clearly and admit what you cannot know.\n"
            "- Refuse harmful requests politely."
            for i in range(n)
        ]
    if role == "edit_prompt":
        return [
            json.dumps(
                {
                    "analysis": "simulated",
                    "thought": "simulated",
                    "new_system_prompt": (
                        "You are a careful, honest assistant. "
                        f"Revision {_digest(text, str(i)) % 100000}: answer clearly, admit "
                        "what you cannot know, and refuse harmful requests politely."
                    ),
                }
            )
            for i in range(n)
        ]
    if role == "edit_answer":
        return json.dumps(
            {
                "analysis": "a",
                "thought": "t",
                "new_response": f"<START>\nImproved answer {_digest(text) % 1000}.\n<END>",
            }
        )
    return [f"Simulated answer {_digest(text, str(i)) % 100000}." for i in range(n)]
