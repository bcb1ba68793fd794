"""``finetune run``: every stage in order, in this process, skipping the ones that are up to date.

The in-process executor of the one orchestrator (``pipeline.orchestrator``): each stage's
``run(config)`` is called here, one after the other. Runs in one process (a laptop, or one
pod); in a cluster, the driver runs the stages as Jobs (``pipeline.cluster.driver``).
"""

from __future__ import annotations

import importlib
import time
import traceback

from components.config import Config
from components.core.errors import ConfigError, FinetuneError
from components.preprocess.download import ensure_source
from components.train import distribute
from pipeline import orchestrator
from pipeline import record as run_record
from pipeline.orchestrator import StageFailed
from pipeline.record import RunRecord


class InProcess:
    """Runs each stage in this process (``finetune run``)."""

    name, resume, driver = "run", "re-run", None

    def groups(self, config: Config) -> tuple[tuple[str, tuple[str, ...]], ...]:
        return tuple((s.name, (s.name,)) for s in orchestrator.STAGES)

    def prepare(self, config: Config) -> None:
        if distribute.parse_tf_config().num_workers > 1:
            raise ConfigError(
                "TF_CONFIG names several workers, but `finetune run` runs every stage in this one "
                "process; run the stages as separate Jobs instead (`finetune train` on each worker)"
            )
        ensure_source(config)  # a missing local data.source is filled from data.download first

    def execute(
        self, config: Config, record: RunRecord, group: tuple[str, str], stages: list[str], why: str
    ) -> None:
        (name,), label = stages, group[1]
        entry = record.stages[name]
        entry.start(why)
        run_record.save(config.run_dir, record)
        clock = time.perf_counter()
        try:
            result = importlib.import_module(orchestrator.stage(name).module).run(config)
        except Exception as exc:
            seconds = time.perf_counter() - clock
            if isinstance(exc, FinetuneError):
                entry.fail(seconds, str(exc))
            else:  # unexpected: say what it was, keep where
                entry.fail(seconds, f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=-20))
            orchestrator.say(self, f"{label}: failed after {entry.seconds:.1f} s: {entry.error}")
            raise StageFailed(name, entry.error) from exc
        entry.done(time.perf_counter() - clock, orchestrator.outputs_of(config, name, result))
        orchestrator.say(self, f"{label}: done in {entry.seconds:.1f} s")


def run(config: Config, force: bool = False) -> dict:
    """Runs preprocess, train, evaluate and push for ``config`` in this process, skipping
    what is up to date (``pipeline.orchestrator.orchestrate``).

    Returns:
        The record written to ``<run_dir>/run.json``, as written.

    Raises:
        ConfigError: the source holds no files, or TF_CONFIG names several workers.
        StageError: a stage failed: names it and says which earlier outputs are kept.
    """
    record = orchestrator.orchestrate(config, InProcess(), force=force)
    assert record is not None  # only if_new_data ends without one
    return record.to_json()
