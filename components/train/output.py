"""What training leaves for evaluation, read through one typed reader; imports neither
TensorFlow nor Beam."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from components.core import outputs, storage
from components.preprocess.output import PreprocessOutput

STAGE = "train"


@dataclass(frozen=True)
class TrainOutput:
    """A finished training run under ``<run_dir>/train``.

    Attributes:
        dir: The stage's folder.
        summary: Its ``summary.json``.
        models: ``{"baseline/model.keras": {bytes, sha256}, "candidate/...": ...}``, or None
            when not recorded.
        inputs_sha256: The preprocessing records it was trained on
            (:meth:`PreprocessOutput.records_digest`).
    """

    dir: str
    summary: dict[str, Any]
    models: dict[str, dict[str, Any]] | None
    inputs_sha256: str | None

    @classmethod
    def read(cls, run_dir: str) -> TrainOutput:
        """Raises StageError when training has not run here or did not succeed."""
        summary = outputs.read_summary(run_dir, STAGE)
        return cls(
            outputs.stage_dir(run_dir, STAGE), summary, summary.get("models"), summary.get("inputs_sha256")
        )

    def model_path(self, name: str) -> str:
        """The saved model ``name`` (``baseline`` or ``candidate``)."""
        return storage.join(self.dir, name, "model.keras")

    def current_models(self) -> dict[str, dict[str, Any]]:
        """The models there now, hashed (what evaluate records it judged)."""
        return outputs.file_facts(self.dir, outputs.MODEL_FILES)

    def intact(self) -> bool:
        """Its models are there with the sizes it recorded (one listing, no reads)."""
        return self.models is not None and not outputs.changed_files(self.dir, self.models)

    def trained_on(self, records: PreprocessOutput) -> bool:
        """Whether these models were trained on the records there now."""
        digest = records.records_digest()
        return digest is not None and self.inputs_sha256 == digest
