"""The catalogue of evaluation aspects the critic chooses from: data, not code.

The original code kept two hand-written vocabularies (the search used "Compliance", the ICL stage
"Compliance with Instructions") that were not interchangeable, and an aspect proposed by the model
outside the catalogue crashed the judge. Here there is one vocabulary; every other spelling is an
alias, and lookups ignore case, spaces, hyphens and underscores, so "compliance with instructions",
"Critical Thinking" and "critical-thinking" all land on the same aspect, and anything that does not
resolve is simply ``None`` for the caller to drop.

Users extend the catalogue from their config with :meth:`AspectCatalogue.with_custom`; the
catalogue's :attr:`~AspectCatalogue.version` is a content hash, so caches keyed by it never mix
selections or judgements made under different rubrics.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import resources
from typing import Any

from drpo.errors import UserError

SCORES = (1, 2, 3, 4, 5)


class AspectError(UserError, ValueError):
    """An aspect definition (shipped or user-supplied) that cannot be used; says what is wrong."""


class UnknownAspectError(AspectError, KeyError):
    """A name that names no aspect of the catalogue (a ``KeyError`` too, as a mapping's is)."""

    def __str__(self) -> str:  # KeyError's own would print the message quoted
        return str(self.args[0])


_NOT_ALNUM = re.compile(r"[^0-9a-z]+")


@lru_cache(maxsize=4096)
def normalize_name(name: str) -> str:
    """The lookup key of an aspect name: lower case, letters and digits only.

    Models write the same aspect as "Critical-Thinking", "critical thinking" or
    "**Critical_Thinking**"; all of them should find one aspect. Cached: a judgement's parser
    looks up the same few dozen names hundreds of thousands of times in a busy run (2.5 s of
    50 searches' 47 s profiled CPU before the cache).
    """
    return _NOT_ALNUM.sub("", name.lower())


@dataclass(frozen=True)
class Aspect:
    """One evaluation aspect.

    ``should`` completes the sentence "The answer should ..." and is what the critic reads when it
    selects aspects; ``rubric`` maps each score 1..5 to what an answer with that score looks like,
    and is what the judge reads.
    """

    name: str
    should: str
    rubric: tuple[tuple[int, str], ...]
    aliases: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "aspect") -> Aspect:
        """Build an aspect from its JSON/TOML form, checking every field with a clear message."""
        if not isinstance(data, Mapping):
            raise AspectError(f"{where}: expected an object with name, should, rubric")
        name = data.get("name")
        if not isinstance(name, str) or not normalize_name(name):
            raise AspectError(f"{where}: 'name' must be a non-empty string")
        where = f"{where} {name!r}"
        should = data.get("should", data.get("description"))
        if not isinstance(should, str) or not should.strip():
            raise AspectError(
                f"{where}: 'should' must be a non-empty string completing 'The answer should ...'"
            )
        rubric = _parse_rubric(data.get("rubric"), where)
        aliases = data.get("aliases", ())
        if isinstance(aliases, str) or not all(isinstance(a, str) for a in aliases):
            raise AspectError(f"{where}: 'aliases' must be a list of strings")
        return cls(
            name=name.strip(),
            should=should.strip(),
            rubric=rubric,
            aliases=tuple(a.strip() for a in aliases if a.strip()),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "aliases": list(self.aliases),
            "should": self.should,
            "rubric": {str(score): text for score, text in self.rubric},
        }

    def rubric_text(self, indent: str = "  ") -> str:
        """The rubric as lines "5: ...", best first, the order judges read scales in."""
        return "\n".join(f"{indent}{score}: {text}" for score, text in reversed(self.rubric))


def _parse_rubric(raw: Any, where: str) -> tuple[tuple[int, str], ...]:
    """A rubric is a mapping from each score 1..5 (as int or string keys) to a description."""
    expected = f"{where}: 'rubric' must map each score 1, 2, 3, 4, 5 to a description"
    if not isinstance(raw, Mapping):
        raise AspectError(expected)
    levels: dict[int, str] = {}
    for key, text in raw.items():
        try:
            score = int(str(key).strip())
        except ValueError:
            raise AspectError(f"{expected}; got key {key!r}") from None
        if score not in SCORES or not isinstance(text, str) or not text.strip():
            raise AspectError(f"{expected}; got {key!r}: {text!r}")
        levels[score] = text.strip()
    missing = [s for s in SCORES if s not in levels]
    if missing:
        raise AspectError(f"{expected}; missing {missing}")
    return tuple((s, levels[s]) for s in SCORES)


class AspectCatalogue:
    """An ordered, immutable set of aspects with tolerant name lookup.

    Order matters: it is the order the critic sees the aspects in, and so part of the version.
    """

    def __init__(self, aspects: Sequence[Aspect]) -> None:
        self._aspects: tuple[Aspect, ...] = tuple(aspects)
        if not self._aspects:
            raise AspectError("an aspect catalogue needs at least one aspect")
        self._index: dict[str, Aspect] = {}
        # Canonical names first, so an alias can never shadow another aspect's real name.
        for aspect in self._aspects:
            key = normalize_name(aspect.name)
            if key in self._index:
                raise AspectError(f"aspect {aspect.name!r} is defined twice")
            self._index[key] = aspect
        for aspect in self._aspects:
            for alias in aspect.aliases:
                key = normalize_name(alias)
                owner = self._index.get(key)
                if owner is not None and owner is not aspect:
                    raise AspectError(
                        f"alias {alias!r} of {aspect.name!r} already names {owner.name!r}"
                    )
                self._index[key] = aspect
        self._keys = frozenset(self._index)
        payload = json.dumps([a.to_dict() for a in self._aspects], sort_keys=True)
        self._version = hashlib.sha256(payload.encode()).hexdigest()[:16]

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_dicts(cls, items: Sequence[Mapping[str, Any]]) -> AspectCatalogue:
        return cls([Aspect.from_dict(item, where=f"aspect #{i}") for i, item in enumerate(items)])

    @classmethod
    def load_default(cls) -> AspectCatalogue:
        """The 14 aspects shipped in ``drpo/data/aspects.json`` (parsed once per process)."""
        return _default_catalogue()

    def with_custom(self, extra: Sequence[Mapping[str, Any]]) -> AspectCatalogue:
        """A new catalogue with the user's aspects added at the end.

        A custom aspect whose name (or alias) resolves to an existing aspect replaces it in place,
        which is how a user adjusts a shipped rubric; the version changes either way.
        """
        aspects = list(self._aspects)
        for i, item in enumerate(extra):
            custom = Aspect.from_dict(item, where=f"custom aspect #{i}")
            existing = self.resolve(custom.name)
            if existing is None:
                aspects.append(custom)
            else:
                merged_aliases = tuple(dict.fromkeys((*existing.aliases, *custom.aliases)))
                if normalize_name(existing.name) != normalize_name(custom.name):
                    merged_aliases = (*merged_aliases, custom.name)
                replacement = Aspect(
                    name=existing.name,
                    should=custom.should,
                    rubric=custom.rubric,
                    aliases=merged_aliases,
                )
                aspects[aspects.index(existing)] = replacement
        return AspectCatalogue(aspects)

    # -- lookup -------------------------------------------------------------------------------

    @property
    def version(self) -> str:
        """A short content hash of every name, alias, description and rubric, in order."""
        return self._version

    @property
    def lookup_keys(self) -> frozenset[str]:
        """Every name and alias as :func:`normalize_name` looks it up (made once: the verdict
        reader asks for them on every reply)."""
        return self._keys

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self._aspects)

    def resolve(self, name: str) -> Aspect | None:
        """The aspect a model meant by ``name``, or None when it names no aspect we know."""
        if not isinstance(name, str):
            return None
        return self._index.get(normalize_name(name))

    def __getitem__(self, name: str) -> Aspect:
        aspect = self.resolve(name)
        if aspect is None:
            raise UnknownAspectError(
                f"no aspect is named {name!r}; the catalogue has {', '.join(self.names)}"
            )
        return aspect

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.resolve(name) is not None

    def __iter__(self) -> Iterator[Aspect]:
        return iter(self._aspects)

    def __len__(self) -> int:
        return len(self._aspects)

    def __repr__(self) -> str:
        return f"AspectCatalogue({len(self)} aspects, version={self.version})"

    def to_dicts(self) -> list[dict[str, Any]]:
        return [a.to_dict() for a in self._aspects]


@cache
def _default_catalogue() -> AspectCatalogue:
    text = resources.files("drpo.data").joinpath("aspects.json").read_text(encoding="utf-8")
    return AspectCatalogue.from_dicts(json.loads(text)["aspects"])
