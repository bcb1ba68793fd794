"""The one orchestrator: decide, run, record and report the stages, with either executor.

preprocess -> train -> evaluate (gate + export) -> push. A stage is skipped when the last
``run.json`` says it finished with the same key (``pipeline.keys``), its outputs are still
the ones it recorded (checked through each stage's typed output reader), and no stage before
it ran in this call; ``force`` runs everything. The record is saved at every transition, so
a run killed mid-stage leaves a truthful record and the next call resumes after the last
stage that finished. Push runs only with ``registry.uri`` set; it also runs when the
candidate is not blessed, and then records why nothing was pushed.

How stages run is the executor's business: :class:`pipeline.run.InProcess` (``finetune run``:
each stage in this process) or :class:`pipeline.cluster.driver.KubernetesJobs` (``finetune
drive``: stage Jobs, in the driver pod). An executor runs groups of stages (a Job may run
several) and moves their entries from running to ok or failed; everything else happens here.
Nothing here imports TensorFlow or Beam.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from components.config import Config
from components.core import outputs, storage
from components.core.errors import StageError
from components.evaluate.output import Verdict
from components.preprocess.output import PreprocessOutput
from components.push.output import PushOutput
from components.train.output import TrainOutput
from pipeline import keys as stage_keys_module
from pipeline import record as run_record
from pipeline.record import RunRecord

NO_REGISTRY = "registry.uri is not set"
NO_NEW_DATA = "no new data"


@dataclass(frozen=True)
class Stage:
    """One step of the run: its name, the module whose ``run(config)`` does it, and a check
    that returns the facts of its finished outputs (None when they are gone or unusable)."""

    name: str
    module: str
    finished: Callable[[Config], dict[str, Any] | None]


def _summary_facts(folder: str, summary: Mapping[str, Any]) -> dict[str, Any]:
    facts = {"dir": folder, "summary": storage.join(folder, "summary.json")}
    return facts | {k: summary[k] for k in ("records", "pushed", "version", "reason") if k in summary}


def _read(reader: Callable[[str], Any], run_dir: str) -> Any:
    try:
        return reader(run_dir)
    except (StageError, ValueError, KeyError, TypeError, FileNotFoundError):
        return None


def preprocess_finished(config: Config) -> dict[str, Any] | None:
    """Its records, while every shard it recorded is there with its size."""
    done = _read(PreprocessOutput.read, config.run_dir)
    return _summary_facts(done.dir, done.summary) if done and done.intact() else None


def train_finished(config: Config) -> dict[str, Any] | None:
    """Its models, while they are the ones it recorded and were trained on the records there now."""
    done, records = _read(TrainOutput.read, config.run_dir), _read(PreprocessOutput.read, config.run_dir)
    if (
        not done
        or not records
        or not all(storage.exists(done.model_path(m)) for m in ("baseline", "candidate"))
    ):
        return None
    return _summary_facts(done.dir, done.summary) if done.trained_on(records) and done.intact() else None


def evaluate_finished(config: Config) -> dict[str, Any] | None:
    """The verdict, and the export when it blessed the candidate: while the models it judged
    are the ones training left (digests) and the export is as it was written."""
    verdict, trained = _read(Verdict.read, config.run_dir), _read(TrainOutput.read, config.run_dir)
    if not verdict or not trained:
        return None
    try:
        if verdict.models != trained.current_models():
            return None  # judged other models (train ran again since, or a model was replaced)
    except FileNotFoundError:
        return None
    export_dir = storage.join(config.run_dir, "export")
    if verdict.blessed and not outputs.intact(export_dir):
        return None
    facts = {
        "dir": verdict.dir,
        "verdict": verdict.path,
        "blessed": verdict.blessed,
        "reason": verdict.reason,
    }
    facts["report"] = storage.join(config.run_dir, "report.html")
    return facts | ({"export": storage.join(export_dir, "saved_model")} if verdict.blessed else {})


def push_finished(config: Config) -> dict[str, Any] | None:
    """What it published, while the verdict's export is the one it published."""
    done, verdict = _read(PushOutput.read, config.run_dir), _read(Verdict.read, config.run_dir)
    if not done or done.fingerprint != (verdict.export_fingerprint if verdict else None):
        return None
    return _summary_facts(done.dir, done.summary)


STAGES = (
    Stage("preprocess", "components.preprocess.stage", preprocess_finished),
    Stage("train", "components.train.stage", train_finished),
    Stage("evaluate", "components.evaluate.stage", evaluate_finished),
    Stage("push", "components.push.stage", push_finished),
)


def stage(name: str) -> Stage:
    return next(s for s in STAGES if s.name == name)


def outputs_of(config: Config, name: str, answer: Any = None) -> dict[str, Any]:
    """The facts of a stage that just finished (plus what its own ``answer`` says that its
    files do not, for evaluate and push)."""
    facts = stage(name).finished(config) or {"dir": outputs.stage_dir(config.run_dir, name)}
    if isinstance(answer, dict):
        wanted = ("blessed", "reason", "pushed", "version")
        facts |= {k: answer[k] for k in wanted if k in answer and k not in facts}
    return facts


class StageFailed(Exception):
    """An executor's report that ``stage`` failed (its entry already records how)."""

    def __init__(self, stage: str, error: str):
        super().__init__(f"{stage}: {error}")
        self.stage, self.error = stage, error


class Executor(Protocol):
    """How stages run. ``name`` prefixes the log lines; ``resume`` says how a user resumes
    after a failure; ``driver`` is recorded in run.json (None for ``finetune run``)."""

    name: str
    resume: str
    driver: str | None

    def groups(self, config: Config) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """The units it runs, in order: (label, the stages each runs)."""

    def prepare(self, config: Config) -> None:
        """Checks and set-up before the input data is fingerprinted."""

    def execute(
        self, config: Config, record: RunRecord, group: tuple[str, str], stages: list[str], why: str
    ) -> None:
        """Runs ``stages`` (the configured ones of ``group``: its name and the label to log);
        moves their entries from
        running to ok (``outputs_of``) or failed, saving the record; raises StageFailed."""


def say(executor: Executor, message: str) -> None:
    print(f"[{executor.name}] {message}", flush=True)


def configured(config: Config, stages: tuple[str, ...]) -> list[str]:
    """The stages that run here (push only with ``registry.uri``)."""
    return [s for s in stages if s != "push" or config.registry.uri]


def orchestrate(
    config: Config, executor: Executor, force: bool = False, if_new_data: bool = False
) -> RunRecord | None:
    """Runs the stages with ``executor``, skipping what is up to date, and records the run.

    Args:
        config: The validated configuration.
        executor: Runs the stages (in this process, or as Kubernetes Jobs).
        force: Run every stage, up to date or not.
        if_new_data: End early, with "no new data", when the input data's fingerprint equals
            that of the last successful run (the scheduled runs).

    Returns:
        The record written to ``<run_dir>/run.json``, or None when there was no new data.

    Raises:
        ConfigError: the configuration or the input data cannot run.
        StageError: a stage failed: names it and says which earlier outputs are kept.
    """
    clock = time.perf_counter()
    executor.prepare(config)
    scan = stage_keys_module.scan_inputs(config, stage_keys_module.fingerprint_cache(config.run_dir))
    fingerprint = scan.value
    seconds = time.perf_counter() - clock
    say(executor, f"input data fingerprint {fingerprint[:12]} ({seconds:.2f} s; {scan.describe()})")
    previous = run_record.load(config.run_dir, lambda m: say(executor, m))
    if if_new_data and not run_record.has_new_data(previous, fingerprint):
        finished = (run_record.last_success(previous) or {}).get("finished")
        say(
            executor,
            f"{NO_NEW_DATA}: the input data ({fingerprint[:12]}) is that of the last successful run "
            f"({finished}); nothing to do",
        )
        return None
    keys = stage_keys_module.stage_keys(config, fingerprint)
    record = RunRecord.new(fingerprint, keys, force=force, driver=executor.driver, previous=previous)
    last = previous.stages if previous else {}
    run_record.save(config.run_dir, record)
    earlier_ran = False
    groups = executor.groups(config)
    for number, (group, members) in enumerate(groups, start=1):
        label, names = f"{number}/{len(groups)} {group}", configured(config, members)
        for name in members:
            if name not in names:
                record.stages[name].skip(NO_REGISTRY, None, {})
        if not names:
            say(executor, f"{label}: skipped ({NO_REGISTRY})")
            continue
        skip, why = _plan(config, record, last, keys, names, earlier_ran, force)
        if skip:
            say(executor, f"{label}: {why}, skipped")
        else:
            say(executor, f"{label}: running ({why})")
            _execute(config, executor, record, (group, label), names, why, clock)
            earlier_ran = True
        run_record.save(config.run_dir, record)
    record.finish(time.perf_counter() - clock)
    run_record.save(config.run_dir, record)
    report(config, record, lambda m: say(executor, m))
    return record


def _plan(
    config: Config,
    record: RunRecord,
    last: Mapping[str, run_record.StageEntry],
    keys: Mapping[str, str],
    names: list[str],
    earlier_ran: bool,
    force: bool,
) -> tuple[bool, str]:
    """Whether every stage of a group can be skipped (up to date, outputs there) and why;
    records them as skipped when so."""
    found = {}
    for name in names:
        ok, why = stage_keys_module.decide(last.get(name), keys[name], earlier_ran, force)
        facts = stage(name).finished(config) if ok else None
        if facts is None:
            return False, why if not ok else "its outputs are gone"
        found[name] = (why, facts)
    for name, (why, facts) in found.items():
        record.stages[name].skip(why, last[name].completed, facts)
    return True, next(iter(found.values()))[0]


def _execute(
    config: Config,
    executor: Executor,
    record: RunRecord,
    group: tuple[str, str],
    stages: list[str],
    why: str,
    clock: float,
) -> None:
    """Runs one group with the executor; records a failure and raises the StageError that names it."""
    try:
        executor.execute(config, record, group, stages, why)
    except StageFailed as failed:
        error = record.fail(failed.stage, failed.error, time.perf_counter() - clock, executor.resume)
        run_record.save(config.run_dir, record)
        raise error from failed.__cause__
    except Exception as e:  # the executor itself failed (the API server, say): record it too
        record.abort(f"stage '{group[0]}': {e}")
        run_record.save(config.run_dir, record)
        raise


def report(config: Config, record: RunRecord, say_line: Callable[[str], None]) -> None:
    """The end of the run: the verdict, the registry version, the report and the record."""
    evaluate, push = record.stages["evaluate"], record.stages["push"]
    verdict = evaluate.outputs or {}
    blessed = "BLESSED" if verdict.get("blessed") else "NOT BLESSED"
    say_line(f"verdict: {blessed}: {verdict.get('reason', '')}")
    pushed = push.outputs or {}
    if pushed.get("version") is not None:
        where = f"'{config.name}' in {config.registry.uri}"
        say_line(f"registry: version {pushed['version']} of {where} ({pushed.get('reason', '')})")
    else:
        say_line(f"registry: no version ({pushed.get('reason') or push.reason or ''})")
    say_line(f"report: {verdict.get('report', storage.join(config.run_dir, 'report.html'))}")
    say_line(f"record: {run_record.path(config.run_dir)} ({record.seconds:.1f} s)")
