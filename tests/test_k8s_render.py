"""Kubernetes manifests: schema-valid on two Kubernetes versions, k8s/ kept identical to
``finetune render``, the worker group's TF_CONFIG, and configuration errors that say what to fix.

Offline: the schemas come bundled with ``kubernetes-validate``; there is no cluster, no kubectl
and no Docker engine here, so kustomize's resource lists are followed by hand (the tree uses no
patches or transformers) and the Dockerfile is checked against the manifests as text.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from components.config import Config, load_config
from components.core.errors import ConfigError
from components.train import distribute
from components.train.distribute import parse_tf_config
from pipeline.cli import main
from pipeline.cluster import jobs, manifests, render
from pipeline.cluster.manifests import with_cluster
from tests.k8s_helpers import local_workers, pod_environment

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_CONFIG = ROOT / "configs" / "beans-cluster.yaml"
K8S = ROOT / "k8s"
SCHEDULE = "0 2 * * *"  # the schedule the k8s/ tree is rendered with (k8s/README.md)
REGENERATE = f"finetune render --config configs/beans-cluster.yaml --schedule '{SCHEDULE}' --kustomize k8s"
# Two minors bundled with kubernetes-validate: an older one still in service and the newest.
KUBERNETES_VERSIONS = ("1.31", "1.37")


def _config(*overrides: str) -> Config:
    return load_config(str(CLUSTER_CONFIG), list(overrides))


VARIANTS = {
    "cpu": (),
    "gpu": ("cluster.gpus_per_worker=2", "cluster.node_selector={pool: train}"),
    "key-secret": (
        "cluster.workload_identity=",
        "cluster.credentials_secret=gcs-key",
        "cluster.workers=1",
        "registry.uri=",
        "registry.promote_to=",
    ),
}


def _documents(config: Config, schedule: str | None = SCHEDULE) -> list[dict]:
    return [doc for f in render.manifest_files(config, schedule) for doc in f.documents]


def _pods(config: Config) -> dict[str, dict]:
    """Pod specs by Job (stage Jobs and the driver)."""
    all_jobs = jobs.stage_jobs(config) | {"driver": jobs.driver_job(config)}
    return {stage: job["spec"]["template"]["spec"] for stage, job in all_jobs.items()}


def _containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


# -- schema validation ---------------------------------------------------------------------------


def test_the_chosen_kubernetes_versions_are_bundled():
    bundled = {re.sub(r"^(\d+\.\d+).*", r"\1", v) for v in kubernetes_validate.utils.all_versions()}
    assert set(KUBERNETES_VERSIONS) <= bundled, f"kubernetes-validate bundles {sorted(bundled)}"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_manifest_validates_strictly(version, variant):
    documents = _documents(_config(*VARIANTS[variant]))
    assert {d["kind"] for d in documents} == {
        "Namespace",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Service",
        "ConfigMap",
        "Job",
        "CronJob",
    }
    for doc in documents:
        # Strict: an unknown or misspelled field fails, as `kubectl apply --validate=strict` would.
        assert kubernetes_validate.validate(doc, version, strict=True) == version


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_file_in_k8s_validates_strictly(version):
    files = sorted(K8S.rglob("*.yaml"))
    assert len(files) == 18
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc["kind"] != "Kustomization":
                kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_rejects_a_misspelled_field():
    job = jobs.train_job(_config())
    job["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="'resource' was unexpected"):
        kubernetes_validate.validate(job, KUBERNETES_VERSIONS[0], strict=True)


# -- k8s/ is what `finetune render` writes ----------------------------------------------------


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*.yaml"))}


def test_k8s_tree_is_what_render_writes(tmp_path):
    render.write_kustomize(_config(), tmp_path, SCHEDULE)
    expected, actual = _tree(tmp_path), _tree(K8S)
    assert sorted(actual) == sorted(expected), f"k8s/ has drifted; regenerate it: {REGENERATE}"
    for name, text in expected.items():
        assert actual[name] == text, f"k8s/{name} has drifted; regenerate it: {REGENERATE}"


def _kustomize_build(folder: Path) -> list[dict]:
    """`kubectl kustomize` for a tree of plain resource lists (what render writes)."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert set(kustomization) == {"apiVersion", "kind", "resources"}, "nothing to emulate but resources"
    built = []
    for resource in kustomization["resources"]:
        path = folder / resource
        built += _kustomize_build(path) if path.is_dir() else list(yaml.safe_load_all(path.read_text()))
    return built


def _key(doc: dict) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


@pytest.mark.parametrize("variant, gpus", [("cpu", 0), ("gpu", 1)])
def test_each_overlay_builds_to_the_applied_part_of_render(variant, gpus):
    built = _kustomize_build(K8S / "overlays" / variant)
    assert len({_key(d) for d in built}) == len(built), "a resource appears twice"
    files = render.manifest_files(with_cluster(_config(), gpus_per_worker=gpus), SCHEDULE)
    applied = [d for f in files if f.applied for d in f.documents]
    assert sorted(built, key=_key) == sorted(applied, key=_key)
    assert {_key(d) for d in built} == {
        ("ServiceAccount", "beans-driver"),
        ("ServiceAccount", "beans-stage"),
        ("Role", "beans-driver"),
        ("RoleBinding", "beans-driver"),
        ("Service", "beans-train"),
        ("ConfigMap", "beans-config"),
        ("Job", "beans-driver"),
    }


def test_render_prints_every_manifest_and_out_writes_an_applicable_folder(tmp_path, capsys):
    assert main(["render", "--config", str(CLUSTER_CONFIG), "--schedule", SCHEDULE]) == 0
    printed = list(yaml.safe_load_all(capsys.readouterr().out))
    assert printed == _documents(_config())
    cpu = K8S / "overlays" / "cpu"
    from_tree = [
        d
        for name in ("configmap", "driver", "preprocess", "train", "evaluate", "schedule")
        for d in yaml.safe_load_all((cpu / f"{name}.yaml").read_text())
    ]
    base = [
        d
        for name in ("namespace", "rbac", "service")
        for d in yaml.safe_load_all((K8S / "base" / f"{name}.yaml").read_text())
    ]
    assert sorted(base + from_tree, key=_key) == sorted(printed, key=_key)

    assert main(["render", "--config", str(CLUSTER_CONFIG), "--out", str(tmp_path)]) == 0
    built = _kustomize_build(tmp_path)
    assert {d["kind"] for d in built} == {
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Service",
        "ConfigMap",
        "Job",
    }
    assert not (tmp_path / "schedule.yaml").exists()


def test_the_configmap_holds_exactly_the_rendered_configuration(tmp_path):
    config = _config(*VARIANTS["gpu"])
    path = tmp_path / "config.yaml"
    path.write_text(manifests.config_map(config)["data"]["config.yaml"])
    assert load_config(str(path)) == config  # the pods run what was rendered


# -- the Jobs ------------------------------------------------------------------------------------


def test_every_pod_runs_a_finetune_stage_with_the_mounted_configuration():
    config = _config()
    for stage, pod in _pods(config).items():
        assert pod["restartPolicy"] == "Never"
        assert pod["serviceAccountName"] == ("beans-driver" if stage == "driver" else "beans-stage")
        assert pod["securityContext"]["runAsUser"] == manifests.RUN_AS_UID
        for container in _containers(pod):
            argv = container["command"] + container["args"]
            expected = ["drive"] if stage == "driver" else [container["name"]]
            assert argv == ["finetune", *expected, "--config", "/etc/finetune/config.yaml"]
            assert container["image"] == config.cluster.image
            # read-only root: the only writable place in the pod is the scratch emptyDir at /tmp
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert {"name": "scratch", "mountPath": manifests.SCRATCH_DIR} in container["volumeMounts"]
        assert {"name": "scratch", "emptyDir": {}} in pod["volumes"]
    assert [c["name"] for c in _containers(_pods(config)["evaluate"])] == ["evaluate", "push"]


# Pod Security Standards, "restricted" (kubernetes.io/docs/concepts/security/pod-security-standards):
# the volume types it allows, and the capabilities a container may add.
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"
}  # fmt: skip


def _restricted_violations(pod: dict) -> list[str]:
    """What in ``pod`` the ``restricted`` Pod Security profile would refuse (empty: admitted)."""
    found = []
    pod_security = pod.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            found.append(key)
    for volume in pod.get("volumes", []):
        if not set(volume) - {"name"} <= RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']}: {sorted(set(volume) - {'name'})}")
    for c in _containers(pod):
        security = pod_security | c.get("securityContext", {})
        if c.get("securityContext", {}).get("privileged"):
            found.append(f"{c['name']}: privileged")
        if security.get("allowPrivilegeEscalation") is not False:
            found.append(f"{c['name']}: allowPrivilegeEscalation must be false")
        if security.get("runAsNonRoot") is not True or security.get("runAsUser") == 0:
            found.append(f"{c['name']}: must run as non-root")
        if security.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
            found.append(f"{c['name']}: seccompProfile must be RuntimeDefault or Localhost")
        capabilities = security.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []) or set(capabilities.get("add", [])) - {
            "NET_BIND_SERVICE"
        }:
            found.append(f"{c['name']}: must drop ALL capabilities and add none but NET_BIND_SERVICE")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            found.append(f"{c['name']}: hostPort")
    return found


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_pod_meets_the_restricted_pod_security_standard(variant):
    config = _config(*VARIANTS[variant])
    pods = _pods(config) | {
        "schedule": jobs.cron_job(config, SCHEDULE)["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    }
    for stage, pod in pods.items():
        assert _restricted_violations(pod) == [], stage
    privileged = pods["train"] | {"hostNetwork": True, "volumes": [{"name": "h", "hostPath": {"path": "/"}}]}
    assert _restricted_violations(privileged) == ["hostNetwork", "volume h: ['hostPath']"]  # the check bites


def test_stage_pods_get_an_api_token_only_for_workload_identity():
    for variant, token in (("cpu", None), ("key-secret", False)):
        pods = _pods(_config(*VARIANTS[variant]))
        for stage, pod in pods.items():
            expected = None if stage == "driver" else token  # the driver calls the API
            assert pod.get("automountServiceAccountToken") == expected, (variant, stage)


def test_every_job_has_a_deadline_and_the_driver_outlasts_its_stages():
    config = _config("cluster.stage_timeout_seconds=7200", "cluster.backoff_limit=2")
    for stage, job in jobs.stage_jobs(config).items():
        assert job["spec"]["activeDeadlineSeconds"] == 7200, stage
    driver = jobs.driver_job(config)["spec"]["activeDeadlineSeconds"]
    # each stage Job's deadline plus the grace the driver gives it, for 3 Jobs and 2 restarts
    assert driver == (7200 + jobs.DEADLINE_GRACE_SECONDS) * (3 + 2) + 3600 == jobs.driver_deadline(config)
    assert jobs.cron_job(config, SCHEDULE)["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"] == driver
    with pytest.raises(ConfigError, match="cluster.stage_timeout_seconds: 10 must be between 60"):
        _config("cluster.stage_timeout_seconds=10")


def test_job_names_are_the_stage_names():
    documents = {_key(d) for d in _documents(_config()) if d["kind"] in ("Job", "CronJob")}
    assert documents == {
        ("Job", "beans-preprocess"),
        ("Job", "beans-train"),
        ("Job", "beans-evaluate"),
        ("Job", "beans-driver"),
        ("CronJob", "beans-schedule"),
    }


def test_training_is_one_indexed_group_that_fails_and_restarts_together():
    config = _config("cluster.workers=3")
    job, service = jobs.train_job(config), manifests.worker_service(config)
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 3
    assert spec["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"  # first failure fails the Job
    assert "backoffLimitPerIndex" not in spec  # that would restart one pod, not the group
    (rule,) = spec["podFailurePolicy"]["rules"]
    assert rule == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "train", "operator": "In", "values": [2]},
    }
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    assert pod["subdomain"] == service["metadata"]["name"] == job["metadata"]["name"]
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (container,) = pod["containers"]
    assert container["ports"] == [{"name": "grpc", "containerPort": manifests.WORKER_PORT}]
    assert service["spec"]["ports"][0]["targetPort"] == manifests.WORKER_PORT


def test_gpus_and_node_selectors_come_from_the_configuration():
    cpu = jobs.train_job(_config("cluster.node_selector={pool: train}"))["spec"]["template"]["spec"]
    assert cpu["nodeSelector"] == {"pool": "train"} and "tolerations" not in cpu
    assert "nvidia.com/gpu" not in cpu["containers"][0]["resources"]["limits"]
    gpu_config = _config(*VARIANTS["gpu"])
    gpu = jobs.train_job(gpu_config)["spec"]["template"]["spec"]
    assert gpu["nodeSelector"] == {"pool": "train", "cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert gpu["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    (container,) = gpu["containers"]
    assert container["resources"]["limits"] == {"memory": "8Gi", "nvidia.com/gpu": "2"}
    assert container["resources"]["requests"] == {"cpu": "2", "memory": "8Gi"}
    assert container["image"] == gpu_config.cluster.gpu_image
    evaluate = jobs.evaluate_job(gpu_config)["spec"]["template"]["spec"]
    assert evaluate["nodeSelector"] == {"pool": "train"}  # only training pods ask for GPU nodes


def test_the_driver_has_only_namespaced_rights_to_run_stages():
    config = _config()
    role, binding = manifests.driver_role(config)
    assert role["kind"] == "Role" and role["metadata"]["namespace"] == "finetune"
    rights = {
        (g, r): set(rule["verbs"])
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    assert rights == {
        ("batch", "jobs"): {"get", "list", "watch", "create", "delete"},
        ("", "services"): {"get", "list", "watch", "create", "delete"},
        ("", "pods"): {"get", "list", "watch"},
        ("", "pods/log"): {"get"},
        ("", "events"): {"list"},
    }
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "beans-driver",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "beans-driver", "namespace": "finetune"}
    ]
    assert not any(d["kind"].startswith("Cluster") for d in _documents(config))


def test_credentials_come_from_the_cluster():
    config = _config()
    for account in manifests.service_accounts(config):
        assert account["metadata"]["annotations"] == {
            "iam.gke.io/gcp-service-account": "finetune@YOUR_PROJECT.iam.gserviceaccount.com"
        }
    assert all(
        "env" not in c or all(e["name"] != "GOOGLE_APPLICATION_CREDENTIALS" for e in c["env"])
        for pod in _pods(config).values()
        for c in _containers(pod)
    )
    keyed = _config(*VARIANTS["key-secret"])
    assert all("annotations" not in a["metadata"] for a in manifests.service_accounts(keyed))
    for pod in _pods(keyed).values():
        assert {"name": "credentials", "secret": {"secretName": "gcs-key"}} in pod["volumes"]
        for container in _containers(pod):
            assert {
                "name": "GOOGLE_APPLICATION_CREDENTIALS",
                "value": "/var/secrets/google/key.json",
            } in container["env"]
            assert {"name": "credentials", "mountPath": "/var/secrets/google", "readOnly": True} in container[
                "volumeMounts"
            ]


def test_the_schedule_creates_the_driver_job_one_run_at_a_time():
    config = _config("cluster.starting_deadline_seconds=600")
    cron = jobs.cron_job(config, "@daily")
    spec = cron["spec"]
    assert spec["schedule"] == "@daily" and spec["concurrencyPolicy"] == "Forbid"
    assert spec["startingDeadlineSeconds"] == 600
    assert spec["successfulJobsHistoryLimit"] == 3 and spec["failedJobsHistoryLimit"] == 3
    assert spec["jobTemplate"]["spec"] == jobs.driver_job(config, scheduled=True)["spec"]


# -- TF_CONFIG of the training pods -------------------------------------------------------------


def test_each_training_pod_derives_its_tf_config_from_its_index_and_the_service():
    config = _config("cluster.workers=3")
    hosts = [f"beans-train-{i}.beans-train.finetune.svc:2222" for i in range(3)]
    (container,) = jobs.train_job(config)["spec"]["template"]["spec"]["containers"]
    for index in range(3):
        env = pod_environment(container, index, namespace="finetune")
        spec = json.loads(distribute.tf_config_from_environment(env))
        assert spec == {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}
        cluster = parse_tf_config({"TF_CONFIG": json.dumps(spec)})
        assert (cluster.num_workers, cluster.worker_index, cluster.is_chief) == (3, index, index == 0)


def test_the_training_pods_run_as_local_processes_on_loopback():
    """What a test that runs the rendered worker group on this machine starts."""
    pods = local_workers(jobs.train_job(_config()), [2001, 2002], "/tmp/c.yaml")
    for index, (argv, env) in enumerate(pods):
        assert argv == ["finetune", "train", "--config", "/tmp/c.yaml"]
        spec = json.loads(distribute.tf_config_from_environment(env))
        assert spec["cluster"]["worker"] == ["127.0.0.1:2001", "127.0.0.1:2002"]
        assert spec["task"] == {"type": "worker", "index": index}


def test_ensure_tf_config_sets_it_only_when_missing():
    env = {distribute.HOSTS_ENV: "127.0.0.1:2001, 127.0.0.1:2002", distribute.INDEX_ENV: "1"}
    derived = distribute.ensure_tf_config(env)
    assert env["TF_CONFIG"] == derived
    assert json.loads(derived)["cluster"]["worker"] == ["127.0.0.1:2001", "127.0.0.1:2002"]
    assert distribute.ensure_tf_config(env) is None  # TF_CONFIG set: it wins
    assert distribute.ensure_tf_config({}) is None  # not a training pod: one process


@pytest.mark.parametrize(
    "env, message",
    [
        ({distribute.HOSTS_ENV: "a:1,b:2"}, "JOB_COMPLETION_INDEX: expected the pod's completion index"),
        ({distribute.HOSTS_ENV: "a:1,b:2", distribute.INDEX_ENV: "x"}, "got 'x'"),
        ({distribute.HOSTS_ENV: "a:1,b:2", distribute.INDEX_ENV: "2"}, "2 is outside the worker group of 2"),
        ({distribute.HOSTS_ENV: "a:1,b", distribute.INDEX_ENV: "0"}, "'b' is not host:port"),
        ({distribute.HOSTS_ENV: "a:1,a:1", distribute.INDEX_ENV: "0"}, "every worker needs its own address"),
    ],
)
def test_a_bad_worker_environment_says_what_is_wrong(env, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        distribute.tf_config_from_environment(env)


# -- configuration errors ------------------------------------------------------------------------


def test_zero_workers_fails_before_rendering_and_says_what_to_fix(capsys):
    code = main(["render", "--config", str(CLUSTER_CONFIG), "--set", "cluster.workers=0"])
    assert code == 2
    assert "cluster.workers: 0 must be between 1 and 1000" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["run_dir=runs/beans"], "run_dir: 'runs/beans' must be a gs:// URI on a cluster"),
        (["cluster.image="], "cluster.image: required to run on a cluster"),
        (["registry.uri=registry"], "registry.uri: 'registry' must be a gs:// URI (or empty)"),
        (["model.weights=/tmp/w.h5"], "model.weights: '/tmp/w.h5' must be imagenet, none or a gs:// URI"),
        (["name=" + "a" * 41], "at most 40"),
    ],
)
def test_what_a_cluster_needs_is_checked_when_rendering(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        render.manifest_files(_config(*overrides))


@pytest.mark.parametrize(
    "override, message",
    [
        ("cluster.cpu=two", "cluster.cpu: 'two' is not a Kubernetes quantity"),
        ("cluster.node_selector={gpu: true}", "cluster.node_selector.gpu: True must be a string"),
        ("cluster.credentials_secret=key", "set workload_identity or credentials_secret, not both"),
        ("cluster.workload_identity=me@example.com", "must be a Google service account email"),
        ("cluster.namespace=My_NS", "cluster.namespace: 'My_NS' must be 1-63 lowercase"),
        ("cluster.starting_deadline_seconds=5", "must be between 10 and"),
        ("cluster.worker=2", "unknown key 'cluster.worker'; did you mean 'workers'?"),
    ],
)
def test_bad_cluster_values_fail_when_the_configuration_loads(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _config(override)


def test_a_bad_schedule_says_what_a_schedule_looks_like(capsys):
    assert main(["render", "--config", str(CLUSTER_CONFIG), "--schedule", "nightly"]) == 2
    assert "--schedule: 'nightly' is not a cron schedule: five fields" in capsys.readouterr().err


def test_the_default_configuration_still_loads_without_a_cluster():
    config = load_config(None, ["run_dir=runs/x", "data.source=images"])
    assert config.cluster.workers == 1 and config.cluster.image == ""
    with pytest.raises(ConfigError, match="cluster.image: required"):
        render.render_text(config)


# -- the image ----------------------------------------------------------------------------------


def test_the_dockerfile_matches_the_manifests():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["finetune"]' in dockerfile
    assert f"USER {manifests.RUN_AS_UID}:{manifests.RUN_AS_UID}" in dockerfile
    assert f"--uid {manifests.RUN_AS_UID}" in dockerfile
    assert dockerfile.count("-c constraints.txt") == 2  # the package, and CUDA for VARIANT=gpu
    assert '"tensorflow[and-cuda]==2.21.*"' in dockerfile
    for copied in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, flags=re.M):
        for path in copied.split():
            assert (ROOT / path).exists(), f"the Dockerfile copies {path}, which does not exist"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not {"setup.py", "constraints.txt", "pipeline", "components"} & set(ignored)
    assert "GOOGLE_APPLICATION_CREDENTIALS" not in dockerfile  # credentials come from the cluster
    assert f"MPLCONFIGDIR={manifests.SCRATCH_DIR}/" in dockerfile  # the root file system is read-only


def test_the_namespace_is_labelled_restricted_and_not_applied_by_kustomize():
    files = {f.name: f for f in render.manifest_files(_config())}
    namespace = files["namespace.yaml"]
    assert not namespace.applied and namespace.shared
    (document,) = namespace.documents
    labels = document["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert {labels[f"pod-security.kubernetes.io/{m}"] for m in ("audit", "warn")} == {"restricted"}
    assert document["metadata"]["name"] == _config().cluster.namespace
    rules = {r["resources"][0]: r["verbs"] for r in files["rbac.yaml"].documents[-2]["rules"]}
    assert rules["events"] == ["list"]  # the driver reads a stuck pod's events, nothing more
