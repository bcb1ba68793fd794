"""What every benchmark shares (``benchmarks.common``: the benchmarks run as modules from the
repository root)."""

from __future__ import annotations

import json
import os
from typing import Any


def write_result(path: str, result: dict[str, Any]) -> None:
    """Writes the result as JSON to ``path`` (creating its folder) and prints it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
