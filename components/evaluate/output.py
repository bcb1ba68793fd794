"""What evaluation leaves for push and for the run record: the verdict, read through one
typed reader; imports neither TensorFlow nor Beam."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from components.core import outputs, storage
from components.core.errors import StageError

STAGE = "evaluate"
VERDICT_FILE = "verdict.json"


@dataclass(frozen=True)
class Verdict:
    """``<run_dir>/evaluate/verdict.json``: the gate's decision and what it judged.

    Attributes:
        dir: The stage's folder.
        data: The verdict as written (metrics, intervals, notes; what push records).
        blessed: Whether the candidate beat the baseline.
        reason: Why, in one line.
        models: The SHA-256 and size of the two models it judged.
        export: The blessed export's facts (``fingerprint``, files), or {} when not blessed.
    """

    dir: str
    data: dict[str, Any]
    blessed: bool
    reason: str
    models: dict[str, Any] | None
    export: dict[str, Any]

    @classmethod
    def read(cls, run_dir: str) -> Verdict:
        """Raises StageError when evaluation has not run here or its verdict is unreadable."""
        folder = outputs.stage_dir(run_dir, STAGE)
        path = storage.join(folder, VERDICT_FILE)
        try:
            data = json.loads(storage.read_text(path))
        except FileNotFoundError:
            raise StageError(f"{path} not found; run `finetune evaluate` with this config first") from None
        except ValueError as e:
            raise StageError(f"{path} is not valid JSON ({e}); run `finetune evaluate` again") from None
        if not isinstance(data, dict):
            raise StageError(f"{path} is not a verdict; run `finetune evaluate` again")
        export = data.get("export") or {}
        return cls(
            folder, data, bool(data.get("blessed")), str(data.get("reason", "")), data.get("models"), export
        )

    @property
    def path(self) -> str:
        return storage.join(self.dir, VERDICT_FILE)

    @property
    def export_fingerprint(self) -> str | None:
        """The blessed export's content fingerprint (what push publishes it by)."""
        return self.export.get("fingerprint")
