"""The jobs drpo runs, side by side: ``optimize`` (the prompt search), ``icl`` (the ICL answers),
``evaluation`` (scoring prompts on a query set) and ``generate`` (answering with an aligned
prompt), with what they share: settings (:mod:`~drpo.jobs.config`), the agent session and the run
lifecycle. Nothing is imported here, so importing one job does not import the others."""
