"""Reading training queries and ICL examples from the formats people actually have.

Queries: a JSON list of strings or of objects with ``instruction`` (Alpaca, just-eval-instruct) or
``query`` (LIMA subsample); JSON Lines with the same fields; or plain text, one query per line
(the paper's ``mal_train.txt``). ICL examples: the paper's JSON object ``{query: answer}``, or a
list (JSON or JSON Lines) of ``{query, answer}`` objects.

A malformed file raises :class:`DataFormatError` naming the file, the line or record, and what
was expected there, so a user can fix it without reading this code.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

from drpo.domain.values import ICLExample
from drpo.errors import UserError

QUERY_FIELDS = ("instruction", "query")
TRAIN_KINDS = ("helpful", "knowledge", "advice", "creative", "harmful")


class DataFormatError(UserError, ValueError):
    """A data file that cannot be read as the expected format."""

    def __init__(self, path: str | Path, where: str | None, expected: str) -> None:
        self.path = str(path)
        self.where = where
        self.expected = expected
        location = f"{self.path}, {where}" if where else self.path
        super().__init__(f"{location}: expected {expected}")


class TrainQuery(NamedTuple):
    """A shipped training query and its kind (one of :data:`TRAIN_KINDS`)."""

    query: str
    kind: str


# --------------------------------------------------------------------------------------------
# Reading records


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataFormatError(path, None, f"UTF-8 text ({error})") from None


def _is_jsonl(path: Path, text: str) -> bool:
    """JSON Lines by extension, or by content: several lines that each start an object."""
    if path.suffix.lower() == ".jsonl":
        return True
    lines = [line for line in text.splitlines() if line.strip()]
    return len(lines) > 1 and all(line.lstrip().startswith("{") for line in lines[:2])


def _json_records(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    """(location, value) for each record of a JSON Lines file, or the whole JSON document."""
    if _is_jsonl(path, text):
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield f"line {number}", json.loads(line)
            except json.JSONDecodeError as error:
                raise DataFormatError(
                    path, f"line {number}", f"one JSON value per line ({error.msg})"
                ) from None
        return
    try:
        yield "", json.loads(text)
    except json.JSONDecodeError as error:
        raise DataFormatError(
            path, f"line {error.lineno}, column {error.colno}", f"valid JSON ({error.msg})"
        ) from None


def _looks_like_json(path: Path, text: str) -> bool:
    """JSON by extension; plain text for ``.txt`` (a query may start with "["); else sniffed."""
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        return True
    if suffix == ".txt":
        return False
    return text.lstrip()[:1] in ("[", "{")


# --------------------------------------------------------------------------------------------
# Queries


def _query_from(value: Any, path: Path, where: str) -> str:
    expected = "a query string or an object with a non-empty 'instruction' or 'query' string"
    if isinstance(value, dict):
        value = next((value[f] for f in QUERY_FIELDS if f in value), None)
    if not isinstance(value, str) or not value.strip():
        raise DataFormatError(path, where, expected)
    return value.strip()


def load_queries(path: str | Path) -> list[str]:
    """The queries in a JSON, JSON Lines or plain-text file, in file order.

    Plain text is one query per line; blank lines are skipped. Leading and trailing space is
    removed from every query.
    """
    path = Path(path)
    text = _read_text(path)
    if not _looks_like_json(path, text):
        queries = [line.strip() for line in text.splitlines() if line.strip()]
        if not queries:
            raise DataFormatError(path, None, "at least one query (the file is empty)")
        return queries
    queries = []
    for where, value in _json_records(path, text):
        if where:  # one JSON Lines record
            queries.append(_query_from(value, path, where))
            continue
        if not isinstance(value, list):
            raise DataFormatError(
                path, None, "a JSON list of queries (strings or objects with 'instruction'/'query')"
            )
        queries += [_query_from(item, path, f"record {i}") for i, item in enumerate(value)]
    if not queries:
        raise DataFormatError(path, None, "at least one query (the list is empty)")
    return queries


# --------------------------------------------------------------------------------------------
# ICL examples


def _example_from(value: Any, path: Path, where: str) -> ICLExample:
    if isinstance(value, dict):
        query, answer = value.get("query"), value.get("answer")
        if isinstance(query, str) and query.strip() and isinstance(answer, str) and answer.strip():
            return ICLExample(query=query.strip(), answer=answer.strip())
    raise DataFormatError(path, where, "an object with non-empty 'query' and 'answer' strings")


def load_icl_examples(path: str | Path) -> list[ICLExample]:
    """ICL examples from ``{query: answer}`` (the paper's ``ICL_examples.json``) or from a list
    (JSON or JSON Lines) of ``{query, answer}`` objects, in file order."""
    path = Path(path)
    text = _read_text(path)
    examples: list[ICLExample] = []
    for where, value in _json_records(path, text):
        if where:
            examples.append(_example_from(value, path, where))
        elif isinstance(value, list):
            examples += [_example_from(item, path, f"record {i}") for i, item in enumerate(value)]
        elif isinstance(value, dict):
            for query, answer in value.items():
                if not isinstance(answer, str) or not answer.strip() or not query.strip():
                    raise DataFormatError(
                        path, f"key {query[:60]!r}", "a non-empty query mapped to an answer string"
                    )
                examples.append(ICLExample(query=query.strip(), answer=answer.strip()))
        else:
            raise DataFormatError(
                path, None, "a JSON object {query: answer} or a list of {query, answer} objects"
            )
    if not examples:
        raise DataFormatError(path, None, "at least one ICL example (the file has none)")
    return examples


# --------------------------------------------------------------------------------------------
# The seed data shipped with drpo


def _package_json(name: str) -> Any:
    return json.loads(resources.files("drpo.data").joinpath(name).read_text(encoding="utf-8"))


def default_train_records() -> list[TrainQuery]:
    """drpo's own training queries with their kinds (helpful, knowledge, advice, creative,
    harmful), so callers can sample the kinds in proportion."""
    return [TrainQuery(r["query"], r["kind"]) for r in _package_json("train_queries.json")]


def default_train_queries() -> list[str]:
    """drpo's own training queries, in file order."""
    return [record.query for record in default_train_records()]


def default_icl_examples() -> list[ICLExample]:
    """drpo's own seed ICL examples, answers wrapped in ``<START>``/``<END>``."""
    return [ICLExample(**record) for record in _package_json("icl_examples.json")]
