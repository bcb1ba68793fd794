"""Every distributed-training rule in one place.

TF_CONFIG is parsed once into a :class:`Cluster`; the strategy is chosen from the
environment (TPU, several workers, several local GPUs, or one device); ``is_chief`` says
who writes final outputs (the others save to local temporary files, see ``phases._save``);
and ``barrier`` lines the workers up where one of them has just changed shared files.

Runs on every worker. The strategy must be created before TensorFlow runs any op, so
:func:`create_strategy` is the first TensorFlow call of the training stage.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.config import Config, tri_state
from pipeline.errors import ConfigError

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


def precision_policy(config: Config, device: str) -> str:
    """The Keras dtype policy: mixed float16 on GPU, mixed bfloat16 on TPU, float32 on CPU.

    Raises:
        ConfigError: ``train.mixed_precision: true`` on a machine with neither GPU nor TPU.
    """
    choice = tri_state(config.train.mixed_precision)
    if choice == "false" or (choice == "auto" and device == "cpu"):
        return "float32"
    if device == "cpu":
        raise ConfigError(
            "train.mixed_precision: true needs a GPU or TPU and this machine has neither; "
            "use 'auto' (mixed precision where it helps) or 'false'"
        )
    return "mixed_bfloat16" if device == "tpu" else "mixed_float16"


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
