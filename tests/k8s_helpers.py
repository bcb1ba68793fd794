"""Helpers for tests that run rendered pods as local processes: a container's argv and the
environment Kubernetes would give it, with the cluster's addresses swapped for loopback."""

from __future__ import annotations

import re
from typing import Any

from components.train import distribute
from pipeline.cluster.manifests import CONFIG_PATH


def pod_environment(
    container: dict[str, Any], index: int | None = None, namespace: str = "finetune"
) -> dict[str, str]:
    """The variables Kubernetes sets in ``container``: its ``env`` with ``$(VAR)`` expanded,
    the downward API's namespace, and ``JOB_COMPLETION_INDEX`` for pod ``index`` of an
    Indexed Job."""
    env = {} if index is None else {distribute.INDEX_ENV: str(index)}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], item["value"])
        elif item["valueFrom"].get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[item["name"]] = namespace
    return env


def local_workers(
    train_job: dict[str, Any], ports: list[int], config_path: str
) -> list[tuple[list[str], dict[str, str]]]:
    """(argv, environment) of each pod of a rendered training Job, to run as local processes:
    the mounted configuration replaced by ``config_path`` and the workers' DNS names by
    ``127.0.0.1:<port>``. Add ``os.environ`` (PATH, ...) before starting them."""
    spec = train_job["spec"]
    (container,) = spec["template"]["spec"]["containers"]
    assert spec["completions"] == spec["parallelism"] == len(ports)
    argv = [config_path if a == CONFIG_PATH else a for a in container["command"] + container["args"]]
    hosts = ",".join(f"127.0.0.1:{port}" for port in ports)
    return [
        (argv, pod_environment(container, index) | {distribute.HOSTS_ENV: hosts})
        for index in range(len(ports))
    ]
