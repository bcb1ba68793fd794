"""TF_CONFIG for a training pod of the Indexed Job, derived with no operator.

Kubernetes gives every pod of an Indexed Job its index in ``JOB_COMPLETION_INDEX`` and the
hostname ``<job>-<index>``; with the headless Service named in the pod's ``subdomain`` that
hostname resolves as ``<job>-<index>.<service>``. The rendered training Job passes every
worker's address in ``FINETUNE_WORKER_HOSTS`` (``host:port``, comma-separated, in index
order), so each pod can build its own TF_CONFIG: all workers are ``worker`` tasks, and
worker 0 is the chief (``components.train.distribute.Cluster.is_chief``).

Runs in every training pod, before the strategy is created (TensorFlow reads TF_CONFIG from
the environment itself). A test runs the same pods as local processes by setting
``FINETUNE_WORKER_HOSTS=127.0.0.1:P0,127.0.0.1:P1`` and ``JOB_COMPLETION_INDEX``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from pipeline.errors import ConfigError

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
