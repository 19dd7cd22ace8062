"""Where the public data in ``shared/data`` lives: beside the repository (as on a developer's
machine and in CI), or where ``DRPO_SHARED_DATA`` points. Tests read it there, never copy it.

A user's clone has no ``../shared`` beside it: tests that need the data are marked
``@needs_shared_data`` and skip there with the reason, instead of failing on a missing file.
CI sets ``DRPO_REQUIRE_SHARED_DATA``, so that there a missing data folder fails instead.
"""

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(
    os.environ.get("DRPO_SHARED_DATA")
    or Path(__file__).resolve().parents[1].parent / "shared" / "data"
)

_PRESENT = (SHARED_DATA / "just_eval_instruct.jsonl").is_file()

if not _PRESENT and os.environ.get("DRPO_REQUIRE_SHARED_DATA"):  # CI has the data: never skip
    raise RuntimeError(
        f"DRPO_REQUIRE_SHARED_DATA is set but the shared data is not at {SHARED_DATA}"
    )

needs_shared_data = pytest.mark.skipif(
    not _PRESENT,
    reason=f"the shared public data is not at {SHARED_DATA} "
    "(clone beside ../shared, or set DRPO_SHARED_DATA)",
)
