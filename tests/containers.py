"""Rendered pods run as containers with podman, for the image tests (``make test-image``).

There is no Kubernetes node here, so a pod of a rendered Job becomes one ``podman run`` per
container, translated field by field from the manifest: the argv (``command`` + ``args``),
the environment (``env`` with ``$(VAR)`` expanded, the downward API's namespace and, in an
Indexed Job, ``JOB_COMPLETION_INDEX``), the user and group, ``readOnlyRootFilesystem``,
``allowPrivilegeEscalation``, dropped capabilities, the memory limit, and each volume mount
(a ConfigMap and an emptyDir become host folders). Anything the translation does not know
raises instead of being left out. What a test adds is explicit: the data and output mounts
(the pods read and write gs:// on a cluster) and the network.

Podman runs daemonless from Debian's packages; these machines need runc with the cgroupfs
manager (crun refuses their hybrid cgroups) and default ulimits no higher than the calling
process's own, set in a ``containers.conf`` of the test's (``CONTAINERS_CONF``).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

from tests.k8s_helpers import pod_environment

HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # Debian's, also where pip looks in a Debian base


def _ulimit(kind: int, fallback: int) -> int:
    soft, hard = resource.getrlimit(kind)
    limits = [v for v in (soft, hard) if v != resource.RLIM_INFINITY]
    return min(limits) if limits else fallback


def containers_conf(path: str) -> str:
    """Writes a ``containers.conf`` for this machine to ``path`` and returns ``path``: runc and
    cgroupfs, this process's open-file limit and at most 4096 processes per user (podman's
    defaults are higher than a sandbox may grant; a build step can start below our own limit)."""
    nofile = _ulimit(resource.RLIMIT_NOFILE, 65536)
    nproc = min(_ulimit(resource.RLIMIT_NPROC, 4096), 4096)  # a build step may start lower than ours
    with open(path, "w") as f:
        f.write(
            "[containers]\n"
            f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'runtime = "runc"\n'
            'events_logger = "file"\n'
        )
    return path


def unusable_reason(environ: Mapping[str, str]) -> str | None:
    """Why podman cannot run containers here (None: it can): the tests skip with this reason."""
    if not shutil.which("podman"):
        return "podman is not installed (Debian: apt-get install podman runc; .ci/run does)"
    if not shutil.which("runc"):
        return "runc is not installed (Debian: apt-get install runc)"
    info = subprocess.run(["podman", "info"], env=dict(environ), capture_output=True, text=True)
    if info.returncode:
        return f"`podman info` failed: {info.stderr.strip()[-500:]}"
    return None


def memory_flag(quantity: str) -> str:
    """A Kubernetes memory quantity (``8Gi``, ``512Mi``, ``1G``) as podman's ``--memory``."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return str(int(float(quantity[: -len(suffix)]) * factor))
    return str(int(quantity))


def run_argv(
    pod: dict[str, Any],
    container: dict[str, Any],
    *,
    name: str,
    volumes: Mapping[str, str],
    mounts: Sequence[tuple[str, str, bool]] = (),
    index: int | None = None,
    namespace: str = "finetune",
    network: str = "none",
    hostname: str | None = None,
    ip: str | None = None,
    hosts: Mapping[str, str] | None = None,
) -> list[str]:
    """The ``podman run`` argv of ``container`` of the pod spec ``pod``.

    Args:
        pod: The pod spec (a Job's ``spec.template.spec``).
        container: One of its containers or init containers.
        name: The container's name.
        volumes: A host folder for each of the pod's volumes, by volume name.
        mounts: Extra ``(host path, container path, read-only)`` mounts the test adds.
        index: The pod's completion index in an Indexed Job.
        namespace: What the downward API gives as the pod's namespace.
        network: ``none`` or a podman network.
        hostname: The pod's hostname (Kubernetes: ``<job>-<index>`` in an Indexed Job).
        ip: The container's address on ``network``.
        hosts: ``--add-host`` names and addresses (the headless Service's DNS records).

    Raises:
        ValueError: a field this translation does not know how to honour.
    """
    security = pod.get("securityContext", {}) | container.get("securityContext", {})
    known = {"runAsNonRoot", "runAsUser", "runAsGroup", "fsGroup", "seccompProfile"}
    known |= {"allowPrivilegeEscalation", "readOnlyRootFilesystem", "capabilities"}
    if set(security) - known:
        raise ValueError(f"securityContext fields not translated: {sorted(set(security) - known)}")
    uid, gid = security["runAsUser"], security.get("runAsGroup", security["runAsUser"])
    if security.get("runAsNonRoot") and uid == 0:
        raise ValueError("runAsNonRoot with runAsUser 0")
    argv = ["podman", "run", "--rm", "--name", name, "--user", f"{uid}:{gid}", "--network", network]
    if "fsGroup" in security:
        argv += ["--group-add", str(security["fsGroup"])]
    if security.get("seccompProfile", {}).get("type", "RuntimeDefault") != "RuntimeDefault":
        raise ValueError(f"seccompProfile {security['seccompProfile']} not translated")
    if security.get("readOnlyRootFilesystem"):
        argv += ["--read-only", "--read-only-tmpfs=false"]  # only the mounts below are writable
    if security.get("allowPrivilegeEscalation") is False:
        argv += ["--security-opt", "no-new-privileges"]
    for cap in security.get("capabilities", {}).get("drop", []):
        argv += ["--cap-drop", cap]
    if set(security.get("capabilities", {})) - {"drop"}:
        raise ValueError(f"capabilities {security['capabilities']} not translated")
    memory = container.get("resources", {}).get("limits", {}).get("memory")
    if memory:
        argv += ["--memory", memory_flag(memory)]
    pod_volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = pod_volumes[mount["name"]]
        if not {"configMap", "emptyDir"} & set(volume):
            raise ValueError(f"volume {volume} not translated (configMap and emptyDir are)")
        read_only = mount.get("readOnly") or "configMap" in volume  # Kubernetes mounts ConfigMaps read-only
        argv += ["--volume", f"{volumes[mount['name']]}:{mount['mountPath']}{':ro' if read_only else ''}"]
    for host_path, path, read_only in mounts:
        argv += ["--volume", f"{host_path}:{path}{':ro' if read_only else ''}"]
    for key, value in pod_environment(container, index, namespace).items():
        argv += ["--env", f"{key}={value}"]
    if hostname:
        argv += ["--hostname", hostname]
    if ip:
        argv += ["--ip", ip]
    for host, address in (hosts or {}).items():
        argv += ["--add-host", f"{host}:{address}"]
    command = container["command"]
    return [*argv, "--entrypoint", json.dumps(command), container["image"], *container.get("args", [])]


def pod_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod's containers in the order a node runs them: init containers, then the rest
    (these pods have one main container, so "together" is "after")."""
    if len(pod["containers"]) != 1:
        raise ValueError("pods with several main containers run them together; not translated")
    return [*pod.get("initContainers", []), *pod["containers"]]


def new_pod_volumes(
    pod: dict[str, Any], root: str, config_maps: Mapping[str, Mapping[str, str]]
) -> dict[str, str]:
    """Host folders for the pod's volumes under ``root``: a ConfigMap's keys as files (read-only
    in the pod), an emptyDir as a new empty folder the pod's user can write (mode 1777, as
    Kubernetes makes it world-writable), shared by the pod's containers as on a node."""
    folders = {}
    for volume in pod.get("volumes", []):
        folder = os.path.join(root, volume["name"])
        os.makedirs(folder)
        if "configMap" in volume:
            for key, text in config_maps[volume["configMap"]["name"]].items():
                with open(os.path.join(folder, key), "w") as f:
                    f.write(text)
            os.chmod(folder, 0o755)
        elif "emptyDir" in volume:
            os.chmod(folder, 0o1777)
        else:
            raise ValueError(f"volume {volume} not translated (configMap and emptyDir are)")
        folders[volume["name"]] = folder
    return folders
