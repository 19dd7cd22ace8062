"""Runs: the SQLite run store, the recorder that persists every bus message, the call journal,
and where a run's files live. Import what you need from its module (``drpo.runs.store``, ...)."""
