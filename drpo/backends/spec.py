"""Model specs: the strings users write to name a model, such as ``local:smollm2``,
``openai:gpt-4o-mini`` or ``openai:my-model@http://127.0.0.1:8000/v1``."""

from __future__ import annotations

from dataclasses import dataclass

KNOWN_KINDS = ("openai", "local")
DEFAULT_MODEL = "local:smollm2"


class ModelSpecError(ValueError):
    """A model spec that cannot be understood; the message says what a valid one looks like."""


@dataclass(frozen=True)
class ModelSpec:
    kind: str
    model: str
    base_url: str | None = None

    def __str__(self) -> str:
        text = f"{self.kind}:{self.model}"
        return f"{text}@{self.base_url}" if self.base_url else text


def parse_model_spec(text: str) -> ModelSpec:
    """Parse ``KIND:MODEL[@BASE_URL]``; a bare name without a kind is an error, not a guess."""
    kind, sep, rest = text.strip().partition(":")
    if not sep or not rest:
        raise ModelSpecError(
            f"model spec {text!r} has no kind: write KIND:MODEL, e.g. 'local:smollm2', "
            "'openai:gpt-4o-mini' or 'openai:MODEL@http://127.0.0.1:8000/v1'"
        )
    if kind not in KNOWN_KINDS:
        raise ModelSpecError(
            f"unknown backend kind {kind!r} in {text!r}: use one of {', '.join(KNOWN_KINDS)}"
        )
    model, at, base_url = rest.partition("@")
    if kind == "openai" and at and not base_url.startswith(("http://", "https://")):
        raise ModelSpecError(f"base URL in {text!r} must start with http:// or https://")
    if kind == "local" and at:
        raise ModelSpecError(f"a local model takes no base URL: {text!r}")
    return ModelSpec(kind=kind, model=model, base_url=base_url or None)
