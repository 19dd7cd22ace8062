"""Where the public data in ``shared/data`` lives: beside the repository (as on a developer's
machine and in CI), or where ``DRPO_SHARED_DATA`` points. Tests read it there, never copy it."""

import os
from pathlib import Path

SHARED_DATA = Path(
    os.environ.get("DRPO_SHARED_DATA")
    or Path(__file__).resolve().parents[1].parent / "shared" / "data"
)
