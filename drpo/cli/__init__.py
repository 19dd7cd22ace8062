"""The ``drpo`` command (typer + rich): :mod:`~drpo.cli.app` assembles the subcommands, which live
in :mod:`~drpo.cli.jobs` (optimize, resume, icl, generate), :mod:`~drpo.cli.evaluate` (eval) and
:mod:`~drpo.cli.runs` (the run views).

Importing this package turns library progress bars off when stderr is not a terminal (a log
file, CI): a piped log should show the run's own one line per level, not transformers'
"Converting and de-quantizing GGUF tensors" bars (issue 16). That bar comes from a plain
``tqdm.auto.tqdm`` in transformers' GGUF loader, which ``transformers.utils.logging``'s switch
does not reach, so the libraries' environment switches are used (``TQDM_DISABLE``, read when tqdm
is imported; ``HF_HUB_DISABLE_PROGRESS_BARS``, read by huggingface_hub and by transformers'
``logging.is_progress_bar_enabled``). Both are set here, before either library is imported, and
only when the user has not set them.
"""

import os
import sys


def _quiet_library_progress_bars() -> None:
    stream = sys.stderr
    if stream is not None and stream.isatty():
        return
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


_quiet_library_progress_bars()
