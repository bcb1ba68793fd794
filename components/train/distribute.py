"""Every distributed-training rule in one place.

TF_CONFIG is parsed once into a :class:`Cluster`; the strategy is chosen from the
environment (TPU, several workers, several local GPUs, or one device); ``is_chief`` says
who writes final outputs (the others save to local temporary files, see ``phases._save``);
``barrier`` lines the workers up where one of them has just changed shared files; and, where
``FINETUNE_WORKER_RECORDS`` names a folder, every worker (the chief too) records there the
digest of the weights it ended each phase with (:func:`record_phase`), so a test or a
benchmark can check that the workers agree without reading their logs.

Runs on every worker. The strategy must be created before TensorFlow runs any op, so
:func:`create_strategy` is the first TensorFlow call of the training stage.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from components.config import Config, tri_state
from components.core import storage
from components.core.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cluster:
    """This process's place in the worker group, from TF_CONFIG.

    Attributes:
        num_workers: Tasks that train (``chief`` plus ``worker``); 1 without TF_CONFIG.
        task_type: ``chief``, ``worker``, or None without TF_CONFIG.
        task_index: Index within ``task_type``.
        worker_index: Position among all training tasks (the chief, when present, is 0).
    """

    num_workers: int = 1
    task_type: str | None = None
    task_index: int = 0
    worker_index: int = 0

    @property
    def is_chief(self) -> bool:
        """The chief writes the models, logs and summaries; it is the ``chief`` task, or
        worker 0 when the cluster has no chief, or the only process."""
        return self.worker_index == 0

    @property
    def multi_worker(self) -> bool:
        return self.num_workers > 1

    def describe(self) -> str:
        if not self.multi_worker:
            return "single worker"
        return f"worker {self.worker_index + 1}/{self.num_workers} ({self.task_type} {self.task_index})"


# A pod of the Kubernetes Indexed Job builds its own TF_CONFIG, with no operator: Kubernetes
# gives it its index in JOB_COMPLETION_INDEX, and the rendered Job lists every worker's
# host:port (<job>-<index>.<service>, resolved through the headless Service) in
# FINETUNE_WORKER_HOSTS, in index order. All are `worker` tasks; worker 0 is the chief.
# A test runs the same pods as local processes with FINETUNE_WORKER_HOSTS=127.0.0.1:P0,...

HOSTS_ENV = "FINETUNE_WORKER_HOSTS"
INDEX_ENV = "JOB_COMPLETION_INDEX"


def tf_config_from_indexed_job(index: int, hosts: Sequence[str]) -> dict[str, Any]:
    """The TF_CONFIG of pod ``index`` of a worker group at ``hosts``.

    Args:
        index: The pod's completion index (0 is the chief).
        hosts: Every worker's ``host:port``, in index order.

    Returns:
        ``{"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}``.

    Raises:
        ConfigError: no hosts, a host without a port, a repeated host, or an index outside
            the group.
    """
    hosts = list(hosts)
    if not hosts:
        raise ConfigError(f"{HOSTS_ENV}: no worker addresses; expected host:port,host:port,...")
    for host in hosts:
        name, _, port = host.rpartition(":")
        if not name or not port.isdigit():
            raise ConfigError(f"{HOSTS_ENV}: '{host}' is not host:port (e.g. beans-train-0.beans-train:2222)")
    if len(set(hosts)) != len(hosts):
        raise ConfigError(f"{HOSTS_ENV}: every worker needs its own address, got {hosts}")
    if not 0 <= index < len(hosts):
        raise ConfigError(
            f"{INDEX_ENV}: {index} is outside the worker group of {len(hosts)} "
            f"(expected 0 to {len(hosts) - 1}); parallelism and completions must equal the hosts listed"
        )
    return {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}


def tf_config_from_environment(environ: Mapping[str, str] = os.environ) -> str | None:
    """TF_CONFIG (JSON) for this pod from ``FINETUNE_WORKER_HOSTS`` and
    ``JOB_COMPLETION_INDEX``; None when TF_CONFIG is already set (it wins) or when
    ``FINETUNE_WORKER_HOSTS`` is not (not a training pod: one process, no TF_CONFIG).

    Raises:
        ConfigError: the hosts are set but the index is missing or not an integer, or
            :func:`tf_config_from_indexed_job` rejects them.
    """
    if environ.get("TF_CONFIG", "").strip() or not environ.get(HOSTS_ENV, "").strip():
        return None
    raw_index = environ.get(INDEX_ENV, "").strip()
    try:
        index = int(raw_index)
    except ValueError:
        raise ConfigError(
            f"{INDEX_ENV}: expected the pod's completion index (an integer) beside {HOSTS_ENV}, "
            f"got '{raw_index}'; Kubernetes sets it in Indexed Jobs (completionMode: Indexed)"
        ) from None
    hosts = [h.strip() for h in environ[HOSTS_ENV].split(",") if h.strip()]
    return json.dumps(tf_config_from_indexed_job(index, hosts))


def ensure_tf_config(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Sets TF_CONFIG in ``environ`` from the Indexed Job's environment when it is not set;
    returns what it set (None: nothing to do). Call before the strategy is created."""
    derived = tf_config_from_environment(environ)
    if derived is not None:
        environ["TF_CONFIG"] = derived
    return derived


def parse_tf_config(environ: Mapping[str, str] = os.environ) -> Cluster:
    """Reads TF_CONFIG (the JSON that Kubernetes operators and Vertex AI set).

    Raises:
        ConfigError: TF_CONFIG is not valid JSON, names no task, or names a task type this
            trainer does not run (``evaluator``, ``ps``).
    """
    raw = environ.get("TF_CONFIG", "").strip()
    if not raw:
        return Cluster()
    try:
        spec = json.loads(raw)
        cluster, task = spec.get("cluster", {}), spec.get("task", {})
        task_type, task_index = task["type"], int(task.get("index", 0))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(
            f"TF_CONFIG: expected {{'cluster': {{'worker': [...]}}, 'task': {{'type': ..., 'index': ...}}}}, "
            f"got {raw[:200]!r} ({e})"
        ) from None
    extra = sorted(set(cluster) - {"chief", "worker"})
    if extra or task_type not in ("chief", "worker"):
        raise ConfigError(
            f"TF_CONFIG: task types {extra or [task_type]} are not supported; this trainer runs "
            "MultiWorkerMirroredStrategy with 'chief' and 'worker' tasks only"
        )
    chiefs, workers = list(cluster.get("chief", [])), list(cluster.get("worker", []))
    members = [("chief", i) for i in range(len(chiefs))] + [("worker", i) for i in range(len(workers))]
    if (task_type, task_index) not in members:
        raise ConfigError(f"TF_CONFIG: task {task_type} {task_index} is not in the cluster {cluster}")
    return Cluster(
        num_workers=len(members),
        task_type=task_type,
        task_index=task_index,
        worker_index=members.index((task_type, task_index)),
    )


@dataclass(frozen=True)
class Placement:
    """What the strategy runs on, for the summary and the precision policy."""

    strategy: Any
    name: str
    device: str  # "tpu", "gpu" or "cpu"
    replicas: int


def _tpu_resolver() -> Any | None:
    """A TPU cluster resolver when this machine is told about a TPU (TPU_NAME, or a TPU VM's
    local accelerator); None otherwise, without probing the network."""
    import tensorflow as tf

    name = os.environ.get("TPU_NAME") or ("local" if os.path.exists("/dev/accel0") else "")
    if not name:
        return None
    try:
        return tf.distribute.cluster_resolver.TPUClusterResolver(tpu=name)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"TPU '{name}' named by the environment cannot be resolved: {e}") from None


def create_strategy(cluster: Cluster) -> Placement:
    """Chooses the strategy from the environment: TPUStrategy when a TPU is named;
    MultiWorkerMirroredStrategy when TF_CONFIG has more than one task; MirroredStrategy on
    several local GPUs; the default strategy otherwise."""
    import tensorflow as tf

    resolver = _tpu_resolver()
    if resolver is not None:
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        strategy = tf.distribute.TPUStrategy(resolver)
        return Placement(strategy, "TPUStrategy", "tpu", strategy.num_replicas_in_sync)
    gpus = tf.config.list_physical_devices("GPU")
    device = "gpu" if gpus else "cpu"
    if cluster.multi_worker:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        return Placement(strategy, "MultiWorkerMirroredStrategy", device, strategy.num_replicas_in_sync)
    if len(gpus) > 1:
        strategy = tf.distribute.MirroredStrategy()
        return Placement(strategy, "MirroredStrategy", device, strategy.num_replicas_in_sync)
    return Placement(tf.distribute.get_strategy(), "default", device, 1)


def use_xla(config: Config, device: str) -> bool:
    """``train.xla``: auto compiles with XLA on GPU and TPU, not on CPU."""
    choice = tri_state(config.train.xla)
    return choice == "true" or (choice == "auto" and device != "cpu")


def barrier(placement: Placement, cluster: Cluster) -> None:
    """Blocks until every worker reaches it (an all-reduce of one number), so files the
    chief wrote or removed before it are seen by all after it. A no-op on one worker."""
    if not cluster.multi_worker:
        return
    import tensorflow as tf

    strategy = placement.strategy

    @tf.function
    def _all_reduce() -> tf.Tensor:
        value = strategy.run(lambda: tf.constant(1.0))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)

    seen = int(_all_reduce().numpy())
    if seen != placement.replicas:
        raise RuntimeError(f"barrier: {seen} of {placement.replicas} replicas answered")


# Where each worker records what it ended each phase with. Unset (the rendered pods leave it
# unset): nothing is recorded. Set: a folder, local or gs://, that every worker can write; the
# value is the same for all workers, each writes its own file in it.
RECORDS_ENV = "FINETUNE_WORKER_RECORDS"


def worker_record_path(folder: str, worker_index: int) -> str:
    """``<folder>/worker-<worker_index>.json``: one worker's record (see :func:`record_phase`)."""
    return storage.join(folder, f"worker-{worker_index}.json")


def record_phase(
    cluster: Cluster, phase: str, facts: dict[str, Any], environ: Mapping[str, str] = os.environ
) -> str | None:
    """Every worker, after a phase has trained: sets ``facts`` (the digest of the weights this
    worker ended the phase with, its steps) under ``phase`` in this worker's record in the
    folder ``FINETUNE_WORKER_RECORDS`` names. The record is kept across restarts, so a phase
    that a restarted run loads instead of training keeps the entry of the start that trained
    it. Returns the record's path, or None when the variable is not set (nothing written).

    The record is ``{"worker_index": i, "num_workers": n, "<phase>": facts, ...}``, written
    atomically; each worker writes only its own file, so no two processes write one file.
    """
    folder = environ.get(RECORDS_ENV, "").strip()
    if not folder:
        return None
    path = worker_record_path(folder, cluster.worker_index)
    record = json.loads(storage.read_text(path)) if storage.exists(path) else {}
    record |= {"worker_index": cluster.worker_index, "num_workers": cluster.num_workers, phase: facts}
    storage.write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def read_worker_records(folder: str, num_workers: int) -> list[dict[str, Any]]:
    """The records of workers ``0 .. num_workers - 1`` in ``folder`` (see :func:`record_phase`),
    in worker order; an empty dict for a worker that recorded nothing."""
    records = []
    for index in range(num_workers):
        path = worker_record_path(folder, index)
        records.append(json.loads(storage.read_text(path)) if storage.exists(path) else {})
    return records
