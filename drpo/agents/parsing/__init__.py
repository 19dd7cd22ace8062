"""Reading what models write, by job.

* :mod:`~drpo.agents.parsing.json_reader`: the lenient JSON reader (JSON values in prose, fences,
  with trailing commas, Python-style literals or cut off by the token limit), in linear time;
* :mod:`~drpo.agents.parsing.verdicts`: scores, aspect selections, judges' verdicts, and the
  rule that a verdict is never read from text the answer wrote (its docstring says what the rule
  guarantees and what it cannot);
* :mod:`~drpo.agents.parsing.text_fields`: the editor's text fields (a rewritten prompt or
  answer in a JSON object the model may have left invalid).

Everything here accepts what a careful human reader would accept, rejects what they would not,
and raises :class:`ParseError` with the reason and a snippet of the text when nothing usable is
there. The names below are the ones the agents and the tests use.
"""

from drpo.agents.parsing.json_reader import (
    ParseError,
    QuotedTexts,
    as_text,
    cut_off_values,
    extract_json,
    get_field,
    iter_json_values,
    normal_forms,
)
from drpo.agents.parsing.text_fields import parse_text_field, unescape_newlines
from drpo.agents.parsing.verdicts import (
    JudgementParse,
    ScoreRangeError,
    SelectionParse,
    find_verdict,
    parse_judgement,
    parse_score,
    parse_selection,
)

__all__ = [
    "JudgementParse",
    "ParseError",
    "QuotedTexts",
    "ScoreRangeError",
    "SelectionParse",
    "as_text",
    "cut_off_values",
    "extract_json",
    "find_verdict",
    "get_field",
    "iter_json_values",
    "normal_forms",
    "parse_judgement",
    "parse_score",
    "parse_selection",
    "parse_text_field",
    "unescape_newlines",
]
