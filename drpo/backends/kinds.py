"""Backend kinds in one table: how a model spec is read, built, configured and priced.

A model is named by a spec, ``KIND:MODEL[@BASE_URL]`` (``local:smollm2``,
``openai:gpt-4o-mini``, ``openai:my-model@http://127.0.0.1:8000/v1``). Each kind registers, in
:data:`KINDS`, what it needs: a check of its spec, its settings model, a factory that builds the
backend, and a price lookup. Adding a kind (an Anthropic client, a vLLM-native one) is one entry
here and its backend module; nothing else names kinds.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from drpo.backends.base import Backend
from drpo.backends.pricing import ModelPrice, PriceTable
from drpo.backends.settings import EndpointSettings, KindSettings, LocalSettings
from drpo.errors import UserError

DEFAULT_MODEL = "local:smollm2"


class ModelSpecError(UserError, ValueError):
    """A model spec that cannot be understood; the message says what a valid one looks like."""


@dataclass(frozen=True)
class ModelSpec:
    kind: str
    model: str
    base_url: str | None = None

    def __str__(self) -> str:
        text = f"{self.kind}:{self.model}"
        return f"{text}@{self.base_url}" if self.base_url else text


@dataclass(frozen=True)
class BackendKind:
    """One kind of backend and everything drpo needs to know about it."""

    name: str
    #: What a spec of this kind looks like, for error messages.
    example: str
    settings: type[KindSettings]
    #: Raises ModelSpecError when a spec of this kind is malformed (e.g. a base URL).
    check: Callable[[ModelSpec], None]
    #: Builds the backend: cheap, loading no model and calling nothing (a run builds its
    #: backends before its job starts, so a missing API key fails before any model loads);
    #: raises a UserError for what cannot work (an API backend with no key).
    build: Callable[[ModelSpec, Any], Backend]
    #: USD per million tokens, or None when unknown.
    price: Callable[[ModelSpec, Any], ModelPrice | None]
    #: True when the model is served on chat completions only (no raw completion prompts).
    chat_only: Callable[[ModelSpec], bool] = lambda spec: False


# ------------------------------------------------------------------------------------ openai


def _check_openai(spec: ModelSpec) -> None:
    if spec.base_url is not None and not spec.base_url.startswith(("http://", "https://")):
        raise ModelSpecError(f"base URL in {str(spec)!r} must start with http:// or https://")


def _price_openai(spec: ModelSpec, settings: EndpointSettings) -> ModelPrice | None:
    """The configured price, else the built-in list price of a known API model."""
    if settings.input_price is not None or settings.output_price is not None:
        fresh = settings.input_price or 0.0
        cached = settings.cached_input_price
        return ModelPrice(fresh, fresh if cached is None else cached, settings.output_price or 0.0)
    return PriceTable.default().price_for(spec.model)


#: OpenAI's chat model families, also when served through a proxy or a compatible gateway.
_OPENAI_CHAT_MODEL = re.compile(r"^(gpt-(3\.5-turbo(?!-instruct)|4|5)|o[1-9]|chatgpt-)", re.I)


def _chat_only_openai(spec: ModelSpec) -> bool:
    """OpenAI serves its chat models on /v1/chat/completions only; another server (vLLM,
    SGLang, TGI) may serve a base model on /v1/completions, and says so when it refuses."""
    return spec.base_url is None or bool(_OPENAI_CHAT_MODEL.match(spec.model))


def _build_openai(spec: ModelSpec, settings: EndpointSettings) -> Backend:
    from drpo.backends.openai_api import OpenAIBackend
    from drpo.backends.ratelimit import RateLimits

    price = _price_openai(spec, settings)
    return OpenAIBackend(
        spec.model,
        base_url=spec.base_url,
        api_key_env=settings.api_key_env,
        limits=RateLimits(rpm=settings.rpm, tpm=settings.tpm, max_in_flight=settings.max_in_flight),
        prices=PriceTable({spec.model: price}) if price is not None else PriceTable(),
        http=settings.http_client,
    )


# ------------------------------------------------------------------------------------ local


def _check_local(spec: ModelSpec) -> None:
    if spec.base_url is not None:
        raise ModelSpecError(f"a local model takes no base URL: {str(spec)!r}")


def _build_local(spec: ModelSpec, settings: LocalSettings) -> Backend:
    from drpo.backends.local import LocalBackend

    return LocalBackend(
        spec.model,
        device=settings.device,
        dtype=settings.dtype,
        max_batch_size=settings.max_batch_size,
    )


def _price_local(spec: ModelSpec, settings: LocalSettings) -> ModelPrice:
    return ModelPrice(0.0, 0.0, 0.0)  # your own hardware: no per-token price


KINDS: dict[str, BackendKind] = {
    kind.name: kind
    for kind in (
        BackendKind(
            name="openai",
            example="'openai:gpt-4o-mini' or 'openai:MODEL@http://127.0.0.1:8000/v1'",
            settings=EndpointSettings,
            check=_check_openai,
            build=_build_openai,
            price=_price_openai,
            chat_only=_chat_only_openai,
        ),
        BackendKind(
            name="local",
            example="'local:smollm2' or 'local:/path/to/model-folder-or.gguf'",
            settings=LocalSettings,
            check=_check_local,
            build=_build_local,
            price=_price_local,
        ),
    )
}


def kind_of(name: str) -> BackendKind:
    try:
        return KINDS[name]
    except KeyError:
        raise ModelSpecError(
            f"unknown backend kind {name!r}: use one of {', '.join(KINDS)}"
        ) from None


def parse_model_spec(text: str) -> ModelSpec:
    """Parse ``KIND:MODEL[@BASE_URL]``; a bare name without a kind is an error, not a guess."""
    kind, sep, rest = text.strip().partition(":")
    if not sep or not rest:
        examples = " or ".join(k.example for k in KINDS.values())
        raise ModelSpecError(f"model spec {text!r} has no kind: write KIND:MODEL, e.g. {examples}")
    if kind not in KINDS:
        raise ModelSpecError(
            f"unknown backend kind {kind!r} in {text!r}: use one of {', '.join(KINDS)}"
        )
    model, at, base_url = rest.partition("@")
    spec = ModelSpec(kind=kind, model=model, base_url=base_url if at else None)
    KINDS[kind].check(spec)
    return spec


def endpoint_settings(spec_text: str, raw: Any = None) -> KindSettings:
    """The settings of the endpoint ``spec_text``, from its ``[endpoints]`` entry (a mapping or
    settings object; None for the kind's defaults). Raises ModelSpecError or ValueError with
    what is wrong."""
    spec = parse_model_spec(spec_text)
    model = kind_of(spec.kind).settings
    if isinstance(raw, model):
        return raw
    if isinstance(raw, KindSettings):
        raw = raw.model_dump(exclude_unset=True)
    try:
        return model.model_validate(dict(raw or {}))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in exc.errors()
        )
        raise ValueError(
            f"[endpoints.{spec_text!r}] is not valid for a {spec.kind} model: {problems}"
        ) from None


def validate_endpoints(raw: Mapping[str, Any]) -> dict[str, KindSettings]:
    """Every ``[endpoints]`` entry checked against its own kind (keys must be model specs)."""
    return {str(parse_model_spec(key)): endpoint_settings(key, value) for key, value in raw.items()}


def price_of(spec_text: str, settings: Any = None) -> ModelPrice | None:
    """What calls to ``spec_text`` cost, as its backend will charge them."""
    spec = parse_model_spec(spec_text)
    return kind_of(spec.kind).price(spec, endpoint_settings(spec_text, settings))


def is_chat_only(spec_text: str) -> bool:
    """Whether ``spec_text`` names a model served on chat completions only."""
    spec = parse_model_spec(spec_text)
    return kind_of(spec.kind).chat_only(spec)


def build_backend(spec_text: str, settings: Any = None) -> Backend:
    spec = parse_model_spec(spec_text)
    return kind_of(spec.kind).build(spec, endpoint_settings(spec_text, settings))
