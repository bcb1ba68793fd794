"""What push leaves in the run directory, read through one typed reader."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from components.core import outputs

STAGE = "push"


@dataclass(frozen=True)
class PushOutput:
    """A finished push under ``<run_dir>/push``: whether a version was published, which, and why.

    Attributes:
        fingerprint: The fingerprint of the export it published (or found published).
    """

    dir: str
    summary: dict[str, Any]
    pushed: bool
    version: int | None
    reason: str
    fingerprint: str | None

    @classmethod
    def read(cls, run_dir: str) -> PushOutput:
        """Raises StageError when push has not run here or did not succeed."""
        s = outputs.read_summary(run_dir, STAGE)
        folder = outputs.stage_dir(run_dir, STAGE)
        return cls(
            folder, s, bool(s.get("pushed")), s.get("version"), str(s.get("reason", "")), s.get("fingerprint")
        )
