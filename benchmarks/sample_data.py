"""Where the benchmark scripts find their data: the shared data set beside the checkout when it is there, else the
repository's bundled sample (``examples/data``)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROOTS = (REPO.parent / "shared" / "data", REPO / "examples" / "data")


def sample(*names: str) -> Path:
    """The first of ``names`` (paths under a data root) that exists, the shared data set tried first."""
    for root in ROOTS:
        for name in names:
            if (root / name).exists():
                return root / name
    sys.exit(f"{Path(sys.argv[0]).name}: none of {', '.join(names)} under {' or '.join(map(str, ROOTS))}")
