"""What a model call costs, from a table of per-token prices.

Prices change more often than code, so the built-in table is only a convenience: it holds the
list prices of a few well-known OpenAI models at the time of writing, every entry can be
overridden from configuration (``PriceTable.from_dict`` reads the TOML shape), and a model the
table does not know costs 0.0 rather than a guess.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

from drpo.backends.base import Usage

PER_MILLION = 1_000_000

#: A dated snapshot name such as ``gpt-4o-2024-08-06`` is priced like its family, ``gpt-4o``.
_DATED_SNAPSHOT = re.compile(r"^(?P<family>.+)-\d{4}-\d{2}-\d{2}$")


class ModelPrice(NamedTuple):
    """US dollars per one million tokens: fresh input, cached input, and output."""

    input_per_m: float
    cached_input_per_m: float
    output_per_m: float


#: Defaults, not truth: OpenAI list prices (USD per 1M tokens) when this table was written.
#: Override them in the config file when they change or when your contract differs.
DEFAULT_PRICES: Mapping[str, ModelPrice] = {
    "gpt-4o": ModelPrice(2.50, 1.25, 10.00),
    "gpt-4o-mini": ModelPrice(0.15, 0.075, 0.60),
    "gpt-4.1": ModelPrice(2.00, 0.50, 8.00),
    "gpt-4.1-mini": ModelPrice(0.40, 0.10, 1.60),
    # No prompt caching for this model: cached input is billed as fresh input.
    "gpt-4-0125-preview": ModelPrice(10.00, 10.00, 30.00),
}


def _parse_price(model: str, value: Any) -> ModelPrice:
    """Accept ``{"input", "cached_input", "output"}`` (TOML tables) or a 3-sequence."""
    if isinstance(value, ModelPrice):
        return value
    if isinstance(value, Mapping):
        unknown = set(value) - {"input", "cached_input", "output"}
        if unknown or "input" not in value or "output" not in value:
            raise ValueError(
                f"price for {model!r} needs keys 'input' and 'output' (and optionally "
                f"'cached_input'), in USD per 1M tokens; got {sorted(value)}"
            )
        input_price = float(value["input"])
        cached = value.get("cached_input")
        return ModelPrice(
            input_price,
            input_price if cached is None else float(cached),
            float(value["output"]),
        )
    if isinstance(value, list | tuple) and len(value) == 3:
        return ModelPrice(*(float(part) for part in value))
    raise ValueError(
        f"price for {model!r} must be a table with 'input', 'cached_input', 'output' "
        f"or a list of those three numbers; got {value!r}"
    )


class PriceTable:
    """Model name -> ``ModelPrice``; ``cost(model, usage)`` turns token counts into dollars."""

    def __init__(self, prices: Mapping[str, ModelPrice] | None = None) -> None:
        self._prices: dict[str, ModelPrice] = dict(prices or {})

    @classmethod
    def default(cls) -> PriceTable:
        """The built-in list prices (see ``DEFAULT_PRICES``)."""
        return cls(DEFAULT_PRICES)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, include_defaults: bool = True) -> PriceTable:
        """Read ``{model: {"input": x, "cached_input": y, "output": z}}`` (as TOML gives it).

        Entries override the defaults model by model, so a config that prices one model keeps
        the defaults for the others unless ``include_defaults`` is false.
        """
        prices = dict(DEFAULT_PRICES) if include_defaults else {}
        prices.update({model: _parse_price(model, value) for model, value in data.items()})
        return cls(prices)

    def with_overrides(self, data: Mapping[str, Any]) -> PriceTable:
        """A copy of this table with some models re-priced."""
        prices = dict(self._prices)
        prices.update({model: _parse_price(model, value) for model, value in data.items()})
        return PriceTable(prices)

    def price_for(self, model: str) -> ModelPrice | None:
        """The exact entry, else the entry of the undated family of a dated snapshot name."""
        if model in self._prices:
            return self._prices[model]
        dated = _DATED_SNAPSHOT.match(model)
        if dated:
            return self._prices.get(dated.group("family"))
        return None

    def cost(self, model: str, usage: Usage) -> float:
        """Dollars for one call; cached prompt tokens are billed at the cached-input price."""
        price = self.price_for(model)
        if price is None:
            return 0.0
        cached = min(usage.cached_tokens, usage.prompt_tokens)
        fresh = usage.prompt_tokens - cached
        return (
            fresh * price.input_per_m
            + cached * price.cached_input_per_m
            + usage.completion_tokens * price.output_per_m
        ) / PER_MILLION

    def __contains__(self, model: object) -> bool:
        return isinstance(model, str) and self.price_for(model) is not None

    def __repr__(self) -> str:
        return f"PriceTable({sorted(self._prices)})"
