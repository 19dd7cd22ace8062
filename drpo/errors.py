"""The one base of drpo's user errors: the errors raised on purpose, whose message alone says
what is wrong and how to go on (a bad config, an endpoint that refuses, a damaged database).

What derives from :class:`UserError` is printed by the command as one ``error:`` line, and a run
it stops is recorded ``failed`` and reported as such. Anything else is a bug: the command prints
its traceback (exit 1) and the run is still recorded ``failed`` with the exception's name, so a
``KeyError`` never passes for a user's mistake.

This module is the lowest layer of drpo (it imports nothing), so every layer's error types can
derive from it; each keeps its older base too (``ValueError``, ``RuntimeError``, ``KeyError``)
for the code that catches it by that.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix from its message; printed without a traceback."""
