"""What preprocessing leaves for the later stages, read through one typed reader (as
tf.Transform's ``TFTransformOutput`` is for its outputs); imports neither TensorFlow nor Beam."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from components.core import outputs

STAGE = "preprocess"


@dataclass(frozen=True)
class PreprocessOutput:
    """A finished preprocessing run under ``<run_dir>/preprocess``.

    Attributes:
        dir: The stage's folder.
        summary: Its ``summary.json`` (counts, dead letters, timings; what the report shows).
        classes: The label vocabulary, in label-id order.
        image_size: The side of the square images in the records.
        records: Examples per split (``train``, ``eval``, ``test``).
        shards: Each shard's ``{bytes, sha256}`` by relative path, or None when not recorded.
    """

    dir: str
    summary: dict[str, Any]
    classes: list[str]
    image_size: int
    records: dict[str, int]
    shards: dict[str, dict[str, Any]] | None

    @classmethod
    def read(cls, run_dir: str) -> PreprocessOutput:
        """Raises StageError when preprocessing has not run here or did not succeed."""
        summary = outputs.read_summary(run_dir, STAGE)
        return cls(
            dir=outputs.stage_dir(run_dir, STAGE),
            summary=summary,
            classes=list(summary["classes"]),
            image_size=int(summary["image_size"]),
            records={split: int(n) for split, n in (summary.get("records") or {}).items()},
            shards=summary.get("shards"),
        )

    def records_digest(self) -> str | None:
        """What training reads from this run (``outputs.records_digest``): its resume and
        ``finetune run``'s skip key on it."""
        return outputs.records_digest(self.summary)

    def intact(self) -> bool:
        """Every shard it recorded is still there with its size (one listing, no reads)."""
        return self.shards is not None and not outputs.changed_files(self.dir, self.shards)
