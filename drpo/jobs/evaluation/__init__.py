"""Evaluation of aligned prompts on a query set (``drpo eval``), just-eval-instruct style.

* :mod:`~drpo.jobs.evaluation.protocol`: which aspects score which query (by ``category``), the
  query and tag loaders, seeded sampling, and the prompts under test;
* :mod:`~drpo.jobs.evaluation.runner`: the evaluation as a run of kind ``eval`` on the agent bus,
  every call through the journal (so an interrupted evaluation resumes for free);
* :mod:`~drpo.jobs.evaluation.stats`: per-aspect means, breakdowns, paired differences against the
  baseline with seeded bootstrap intervals, and the queries that changed most.
"""
