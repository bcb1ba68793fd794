"""The one module that talks to a Kubernetes API server: a thin adapter around the official
client (``kubernetes``), with the manifests of ``pipeline.cluster`` as plain dicts in and
the API's own JSON shape (camelCase dicts) out.

Where it runs: on a workstation (``finetune submit``, ``status``, ``logs``, ``schedule``)
with a kubeconfig, and in the driver pod (``finetune drive``) with the pod's service account,
chosen by ``KUBERNETES_SERVICE_HOST`` (Kubernetes sets it in every pod). Each
:class:`Cluster` has its own ``ApiClient``: no global client configuration.

Errors say what to check, in one line: no kubeconfig or an unknown context is a
``ConfigError`` (exit code 2); an unreachable API server, rejected credentials, missing
rights or a rejected object is a :class:`ClusterError` (exit code 1).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from components.core.errors import ConfigError, FinetuneError

Manifest = dict[str, Any]
REQUEST_TIMEOUT = 30  # seconds per call; log streams have none
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"  # set by the Job controller on its pods
# kind -> (API group attribute of Cluster, the client's method suffix)
KINDS: dict[str, tuple[str, str]] = {
    "ConfigMap": ("core", "config_map"),
    "ServiceAccount": ("core", "service_account"),
    "Service": ("core", "service"),
    "Pod": ("core", "pod"),
    "Role": ("rbac", "role"),
    "RoleBinding": ("rbac", "role_binding"),
    "Job": ("batch", "job"),
    "CronJob": ("batch", "cron_job"),
}


class ClusterError(FinetuneError, RuntimeError):
    """A call to the API server failed; ``status`` is the HTTP status (None: no answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def connect(context: str | None = None, namespace: str = "finetune") -> Cluster:
    """A :class:`Cluster` for ``namespace``: the pod's service account inside a pod (unless a
    ``context`` is named), else the kubeconfig (``KUBECONFIG`` or ``~/.kube/config``).

    Raises:
        ConfigError: no usable kubeconfig, the context is not in it, or the pod's service
            account token cannot be read. Nothing is sent to the server yet.
    """
    if os.environ.get("KUBERNETES_SERVICE_HOST") and context is None:
        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
        except ConfigException as e:
            raise ConfigError(
                f"KUBERNETES_SERVICE_HOST is set (running in a pod?) but its service account cannot be "
                f"used: {str(e).rstrip('.')}; check automountServiceAccountToken, or unset "
                "KUBERNETES_SERVICE_HOST and pass --context to use a kubeconfig"
            ) from None
        return Cluster(client.ApiClient(configuration), namespace, "the pod's service account")
    paths = os.environ.get("KUBECONFIG") or "~/.kube/config"
    try:
        api = config.new_client_from_config(config_file=paths, context=context)
    except ConfigException as e:
        raise ConfigError(_kubeconfig_problem(paths, context, e)) from None
    where = f"context '{context}'" if context else "the current context"
    return Cluster(api, namespace, f"{where} of {paths}")


def _kubeconfig_problem(paths: str, context: str | None, error: ConfigException) -> str:
    files = [os.path.expanduser(p) for p in paths.split(os.pathsep) if p]
    if not any(os.path.isfile(f) for f in files):
        return (
            f"no kubeconfig: {' '.join(files)} does not exist (set KUBECONFIG or create one, e.g. "
            "`gcloud container clusters get-credentials CLUSTER --location LOCATION`; check with "
            "`kubectl config get-contexts`)"
        )
    if context and "contexts list" in str(error):
        return f"kubeconfig {paths} has no context '{context}'; see `kubectl config get-contexts`"
    hint = f" with context '{context}'" if context else " (is current-context set?)"
    return f"cannot use kubeconfig {paths}{hint}: {error}; check `kubectl config view`"


class Cluster:
    """One namespace of one cluster. Methods take and return the API's JSON shape (dicts)."""

    def __init__(self, api: client.ApiClient, namespace: str, where: str) -> None:
        self.api, self.namespace, self.where = api, namespace, where
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)
        self.rbac = client.RbacAuthorizationV1Api(api)

    @property
    def host(self) -> str:
        return self.api.configuration.host

    def _call(self, what: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``method(*args)`` with a request timeout, its errors turned into one-line ClusterErrors."""
        kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT)
        with self.errors(what):
            return method(*args, **kwargs)

    @contextlib.contextmanager
    def errors(self, what: str) -> Iterator[None]:
        """Turns the client's exceptions inside the block into a :class:`ClusterError`."""
        try:
            yield
        except ApiException as e:
            raise ClusterError(self._rejected(what, e), e.status) from None
        except (urllib3.exceptions.HTTPError, OSError) as e:
            cause = getattr(e, "reason", None) or e
            raise ClusterError(
                f"cannot reach the Kubernetes API server at {self.host} ({self.where}) to {what}: "
                f"{_short(cause)}; check that the cluster is running and reachable (network, VPN, "
                "authorized networks): `kubectl cluster-info`"
            ) from None

    def _rejected(self, what: str, error: ApiException) -> str:
        message = _api_message(error)
        if error.status == 401:
            return (
                f"the API server at {self.host} rejected the credentials of {self.where} (401) to "
                f"{what}: refresh them (e.g. `gcloud container clusters get-credentials`)"
            )
        if error.status == 403:
            return f"not allowed to {what} in namespace {self.namespace} ({self.where}): {message}"
        if error.status == 404 and "namespaces" in message:
            return (
                f"{message}: create it first, labelled for the restricted Pod Security Standard: "
                f"`kubectl apply -f namespace.yaml` from `finetune render --out DIR`, or `kubectl create "
                f"namespace {self.namespace} && kubectl label namespace {self.namespace} "
                "pod-security.kubernetes.io/enforce=restricted`"
            )
        return f"cannot {what}: {error.status} {error.reason}: {message}"

    def _method(self, verb: str, kind: str) -> Callable[..., Any]:
        group, suffix = KINDS[kind]
        return getattr(getattr(self, group), f"{verb}_namespaced_{suffix}")

    def read(self, kind: str, name: str) -> Manifest | None:
        """The object as the API returns it, or None when there is none."""
        try:
            found = self._call(f"read {kind} {name}", self._method("read", kind), name, self.namespace)
        except ClusterError as e:
            if e.status == 404:
                return None
            raise
        return self.api.sanitize_for_serialization(found)

    def create(self, manifest: Manifest) -> Manifest:
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        body = to_model(manifest)
        created = self._call(f"create {kind} {name}", self._method("create", kind), self.namespace, body)
        return self.api.sanitize_for_serialization(created)

    def apply(self, manifest: Manifest) -> str:
        """Create-or-replace; returns ``created``, ``replaced`` or ``recreated``.

        A Job cannot be changed once created: an existing one is deleted (with its pods) and
        created again. Anything else is replaced whole at its current resourceVersion.
        """
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        try:
            self.create(manifest)
            return "created"
        except ClusterError as e:
            if e.status != 409:
                raise
        if kind == "Job":
            self.delete_job(name)
            self.create(manifest)
            return "recreated"
        current = self.read(kind, name) or {"metadata": {}}
        body = json.loads(json.dumps(manifest))  # a copy whose metadata can take the version
        body["metadata"]["resourceVersion"] = current["metadata"].get("resourceVersion")
        replace = self._method("replace", kind)
        self._call(f"replace {kind} {name}", replace, name, self.namespace, to_model(body))
        return "replaced"

    def delete(self, kind: str, name: str, propagation: str = "Background") -> bool:
        """Deletes one object (and, with ``Background``, what it owns); False when none existed."""
        method = self._method("delete", kind)
        try:
            self._call(f"delete {kind} {name}", method, name, self.namespace, propagation_policy=propagation)
        except ClusterError as e:
            if e.status == 404:
                return False
            raise
        return True

    def delete_cron_job(self, name: str, missing: str) -> None:
        """Deletes CronJob ``name``; a Job it already started goes on (``Orphan``).

        Raises:
            FinetuneError: there is no such CronJob; the message starts with ``missing``
                (what the user asked for that is not there).
        """
        if not self.delete("CronJob", name, propagation="Orphan"):
            raise FinetuneError(
                f"{missing} in namespace {self.namespace}: no CronJob {name} ({self.where}); "
                f"see `kubectl -n {self.namespace} get cronjobs`"
            )

    def delete_job(self, name: str, timeout: float = 600.0) -> bool:
        """Deletes Job ``name`` (propagation Background) and waits until it and its pods are gone,
        so that a new Job of that name never meets the old pods (the training Service would
        route to them). Returns False when there was no such Job.

        Raises:
            ClusterError: the Job or its pods were still there after ``timeout`` seconds.
        """
        existed = self.delete("Job", name)
        deadline, pause = time.monotonic() + timeout, 0.5
        while self.read("Job", name) is not None or self.job_pods(name):
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"Job {name} or its pods are still there {timeout:.0f} s after deleting it; "
                    f"see `kubectl -n {self.namespace} get pods -l {JOB_NAME_LABEL}={name}` (finalizers?)"
                )
            time.sleep(pause)
            pause = min(pause * 2, 5.0)
        return existed

    def list_jobs(self, selector: str) -> list[Manifest]:
        found = self._call(
            "list Jobs", self.batch.list_namespaced_job, self.namespace, label_selector=selector
        )
        return [self.api.sanitize_for_serialization(job) for job in found.items]

    def list_pods(self, selector: str) -> list[Manifest]:
        found = self._call(
            "list pods", self.core.list_namespaced_pod, self.namespace, label_selector=selector
        )
        return [self.api.sanitize_for_serialization(pod) for pod in found.items]

    def job_pods(self, job: str) -> list[Manifest]:
        """The pods Job ``job`` created (all attempts, oldest first)."""
        pods = self.list_pods(f"{JOB_NAME_LABEL}={job}")
        return sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "")

    def pod_events(self, pods: list[str]) -> list[Manifest]:
        """The events about pods ``pods`` that the API still keeps (about an hour), oldest first."""
        found = self._call(
            "list events",
            self.core.list_namespaced_event,
            self.namespace,
            field_selector="involvedObject.kind=Pod",
        )
        events = [self.api.sanitize_for_serialization(e) for e in found.items]
        return [e for e in events if (e.get("involvedObject") or {}).get("name") in set(pods)]

    def log_lines(self, pod: str, container: str, follow: bool = False) -> Iterator[str]:
        """The container's log, line by line; with ``follow`` until the container ends."""
        what = f"read the log of {pod}/{container}"
        if not follow:
            text = self._call(
                what, self.core.read_namespaced_pod_log, pod, self.namespace, container=container
            )
            yield from text.splitlines()
            return
        with self.errors(what):
            stream = watch.Watch().stream(
                self.core.read_namespaced_pod_log, name=pod, namespace=self.namespace, container=container
            )
            yield from stream


def to_model(manifest: Manifest) -> Any:
    """The client's model of ``manifest`` (``V1Job`` for a Job), which its typed calls take;
    ``ApiClient().sanitize_for_serialization`` turns it back into the same dict."""
    return getattr(client, f"V1{manifest['kind']}").from_dict(manifest)


def _api_message(error: ApiException) -> str:
    """The ``message`` of the API's Status answer, or its raw body."""
    try:
        return str(json.loads(error.body)["message"])
    except (TypeError, ValueError, KeyError):
        return str(error.body or error.reason or "").strip()[:300]


def _short(cause: object) -> str:
    """``Connection refused`` rather than urllib3's nested repr."""
    text = str(cause)
    return text.rsplit(": ", 1)[-1].strip(" )'\"") if "Errno" in text or "Failed to" in text else text
