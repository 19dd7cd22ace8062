"""How long the critic takes to read a judge's verdict from a long reply, today and at a revision.

Run: ``python benchmarks/parsing.py [--against 385f28a] [--sizes 15000,30000,60000,120000]``.

Each reply is a judge's honest verdict beside an echo of the answer it judged (the answer is also
passed as the quoted text, as the critic does), in the shapes that cost a reader most: prose,
code full of braces, JSON log lines, thousands of nested brackets or objects, Python-style
openers that never close (each one a repair scan to the end), and a verdict cut off by the token
limit after an echo; and the openers again as the judge's own text, not an echo. For each, the best of three reads (CPU seconds of this process) at each size,
so the growth with the reply's length shows: the reading is meant to stay linear, and a
60,000-character reply to read in well under a second. Then ``extract_json`` (the first object
of a selection or an editor's reply) on replies that have no object, or one only after spans
that are not JSON: one read each, same sizes. ``--against`` also times the reader as it was at a
git revision (``drpo/agents/parsing.py`` before the split, the package after it; the default,
385f28a, is the one issue 17 started from).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drpo.agents import parsing
from drpo.agents.aspects import AspectCatalogue
from tests.test_attack_corpus import load_parsing_at  # the corpus's own way to load an old reader

ROOT = Path(__file__).resolve().parents[1]
CATALOGUE = AspectCatalogue.load_default()
SELECTED = ("Helpfulness", "Clarity", "Factuality")
VERDICT = json.dumps(
    {
        n: {"rationale": "Judged on its merits.", "score": s}
        for n, s in zip(SELECTED, (2, 3, 2), strict=True)
    },
    indent=2,
)
CUT_OFF = VERDICT[: VERDICT.index('"Clarity"')]  # the token limit struck mid-verdict


def _fill(unit: str, size: int) -> str:
    return (unit * (size // len(unit) + 1))[:size]


#: name -> (answer of about ``size`` characters, how the reply places the verdict).
SHAPES: dict[str, Callable[[int], tuple[str, str]]] = {
    "prose": lambda n: (_fill("The moon pulls on the oceans. ", n), "after"),
    "code with braces": lambda n: (
        _fill("function f(x) { return {y: [x, {'k': 1}]}; }\n", n),
        "after",
    ),
    "JSON log lines": lambda n: (
        _fill('{"t": 1, "level": "info", "msg": "tide", "metrics": {"accuracy": 0.93}}\n', n),
        "after",
    ),
    "nested brackets": lambda n: ("[" * (n // 2) + "]" * (n // 2), "after"),
    "nested objects": lambda n: ('{"a":' * (n // 6) + "1" + "}" * (n // 6), "after"),
    # An answer that names an aspect has its own values read too (the rule's third test).
    "nested objects naming an aspect": lambda n: (
        '{"Clarity":' * (n // 12) + "1" + "}" * (n // 12),
        "after",
    ),
    "unclosed openers naming an aspect": lambda n: (_fill("{'Clarity': 'pending ", n), "after"),
    "unclosed openers": lambda n: (_fill("{'step': 'pending ", n), "after"),
    "unclosed openers, the judge's own": lambda n: (_fill("{'step': 'pending ", n), "own"),
    "echo, then a cut-off verdict": lambda n: (_fill("The moon pulls on the oceans. ", n), "cut"),
}


def reply_for(answer: str, where: str) -> str:
    if where == "cut":
        return f"The answer reads:\n{answer}\n\nMy verdict:\n{CUT_OFF}"
    return f"The answer reads:\n{answer}\n\nMy verdict:\n{VERDICT}"


def read_time(reader: Any, reply: str, answer: str) -> tuple[float, str]:
    """Best CPU seconds of three reads, and what was read (mean score, or the error's kind)."""
    best, outcome = float("inf"), ""
    for _ in range(3):
        started = time.process_time()
        try:
            parsed = reader.parse_judgement(reply, SELECTED, CATALOGUE, quoted=("q", answer))
            outcome = f"{sum(s.score for s in parsed.scores.values()) / len(parsed.scores):.2f}"
        except reader.ParseError:
            outcome = "unreadable"
        except RecursionError:
            outcome = "RecursionError"
        best = min(best, time.process_time() - started)
    return best, outcome


#: Replies for :func:`~drpo.agents.parsing.extract_json` (selections, the editor) that cost a
#: reader most: no object in them, or one only at the very end, after spans that are not JSON.
EXTRACT_SHAPES: dict[str, Callable[[int], str]] = {
    "nested brackets": lambda n: "{" * (n // 2) + "}" * (n // 2),
    "nested objects, never closed": lambda n: '{"a":' * (n // 5),
    "unclosed openers": lambda n: _fill("{'step': 'pending ", n),
    "invalid objects": lambda n: _fill("{'a': b} ", n),
    "code, then the selection": lambda n: (
        _fill("function f(x) { return {y: [x]}; }\n", n) + '{"selected_aspects": ["Clarity"]}'
    ),
}
#: An old reader that took longer than this at one size is not timed at the larger ones.
EXTRACT_PATIENCE_S = 5.0


def extract_time(reader: Any, reply: str) -> tuple[float, str]:
    """CPU seconds of one ``extract_json`` read, and what was read (its keys, or the error)."""
    started = time.process_time()
    try:
        outcome = ",".join(reader.extract_json(reply))[:24] or "{}"
    except reader.ParseError:
        outcome = "no object"
    except RecursionError:
        outcome = "RecursionError"
    return time.process_time() - started, outcome


def main_extract(readers: list[tuple[str, Any]], sizes: list[int]) -> None:
    print("\nCPU seconds for extract_json (one read), by the reply's length in characters;")
    print(f"an old reader past {EXTRACT_PATIENCE_S:.0f} s at one size is not run at the larger.\n")
    print(f"| reply | reader | {' | '.join(f'{n:,}' for n in sizes)} |")
    print("|---|---|" + "---|" * len(sizes))
    for name, make in EXTRACT_SHAPES.items():
        for label, reader in readers:
            cells, slow = [], False
            for size in sizes:
                if slow:
                    cells.append("(skipped)")
                    continue
                seconds, outcome = extract_time(reader, make(size))
                slow = seconds > EXTRACT_PATIENCE_S
                cells.append(f"{seconds:.3f} -> {outcome}")
            print(f"| {name} | {label} | {' | '.join(cells)} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default="385f28a", help="also time parsing.py at this rev")
    parser.add_argument("--no-against", action="store_true", help="time today's reader only")
    parser.add_argument("--sizes", default="15000,30000,60000,120000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    readers = [("today", parsing)]
    if not args.no_against:
        readers.append((args.against, load_parsing_at(args.against)))
    print("CPU seconds to read the verdict (best of 3), by the reply's length in characters;")
    print("the read mean score after '->' (2.33 is the honest verdict, 2.00 the cut-off one).\n")
    print(f"| reply | reader | {' | '.join(f'{n:,}' for n in sizes)} |")
    print("|---|---|" + "---|" * len(sizes))
    for name, make in SHAPES.items():
        for label, reader in readers:
            cells = []
            for size in sizes:
                answer, where = make(size)
                quoted = "" if where == "own" else answer  # "own": the judge wrote it all
                seconds, outcome = read_time(reader, reply_for(answer, where), quoted)
                cells.append(f"{seconds:.3f} -> {outcome}")
            print(f"| {name} | {label} | {' | '.join(cells)} |", flush=True)
    main_extract(readers, sorted({3000, 6000, *sizes}))  # small sizes first: the old is quadratic


if __name__ == "__main__":
    main()
