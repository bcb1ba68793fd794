"""The translation of rendered pods into ``podman run`` (tests/containers.py), which the image
test relies on to run the pods as their manifests say: checked here without podman."""

from __future__ import annotations

import json
import os

import pytest

from components.config import load_config
from pipeline.cluster import jobs
from tests import containers

CLUSTER_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "beans-cluster.yaml"
)


def _pairs(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_a_training_pod_becomes_the_podman_run_of_its_manifest():
    job = jobs.train_job(load_config(CLUSTER_CONFIG, ["cluster.memory=6Gi"]))
    pod = job["spec"]["template"]["spec"]
    (container,) = containers.pod_containers(pod)
    volumes = {"config": "/host/config", "scratch": "/host/scratch"}
    argv = containers.run_argv(
        pod,
        container,
        name="beans-train-1",
        volumes=volumes,
        mounts=[("/host/data", "/data", True)],
        index=1,
        network="net",
        hostname="beans-train-1",
        ip="10.0.0.11",
        hosts={"beans-train-0.beans-train.finetune.svc": "10.0.0.10"},
    )
    assert argv[:2] == ["podman", "run"]
    assert _pairs(argv, "--user") == ["1000:1000"] and _pairs(argv, "--network") == ["net"]
    assert "--read-only" in argv and "--read-only-tmpfs=false" in argv  # only the mounts are writable
    assert _pairs(argv, "--security-opt") == ["no-new-privileges"] and _pairs(argv, "--cap-drop") == ["ALL"]
    assert _pairs(argv, "--memory") == [str(6 * 2**30)]
    assert _pairs(argv, "--volume") == [
        "/host/config:/etc/finetune:ro",
        "/host/scratch:/tmp",
        "/host/data:/data:ro",
    ]
    env = dict(e.split("=", 1) for e in _pairs(argv, "--env"))
    assert env == {
        "JOB_COMPLETION_INDEX": "1",
        "POD_NAMESPACE": "finetune",
        "FINETUNE_WORKER_HOSTS": ",".join(f"beans-train-{i}.beans-train.finetune.svc:2222" for i in (0, 1)),
    }
    assert _pairs(argv, "--add-host") == ["beans-train-0.beans-train.finetune.svc:10.0.0.10"]
    assert _pairs(argv, "--hostname") == ["beans-train-1"] and _pairs(argv, "--ip") == ["10.0.0.11"]
    entry = argv.index("--entrypoint")
    assert json.loads(argv[entry + 1]) == ["finetune"]
    assert argv[entry + 2 :] == [container["image"], "train", "--config", "/etc/finetune/config.yaml"]


def test_what_the_translation_cannot_honour_raises_instead_of_being_dropped(tmp_path):
    keyed = load_config(CLUSTER_CONFIG, ["cluster.workload_identity=", "cluster.credentials_secret=gcs-key"])
    pod = jobs.preprocess_job(keyed)["spec"]["template"]["spec"]
    with pytest.raises(ValueError, match="secret"):
        containers.new_pod_volumes(pod, str(tmp_path / "a"), {"beans-config": {"config.yaml": ""}})
    volumes = {"config": "c", "scratch": "s", "credentials": "k"}
    with pytest.raises(ValueError, match="configMap and emptyDir"):
        containers.run_argv(pod, pod["containers"][0], name="x", volumes=volumes)
    plain = jobs.preprocess_job(load_config(CLUSTER_CONFIG, []))["spec"]["template"]["spec"]
    privileged = plain | {"securityContext": plain["securityContext"] | {"sysctls": []}}
    with pytest.raises(ValueError, match="sysctls"):
        containers.run_argv(privileged, plain["containers"][0], name="x", volumes={})


def test_pod_volumes_hold_the_configmap_files_and_an_empty_writable_scratch(tmp_path):
    pod = jobs.evaluate_job(load_config(CLUSTER_CONFIG, []))["spec"]["template"]["spec"]
    assert [c["name"] for c in containers.pod_containers(pod)] == ["evaluate", "push"]  # init first
    folders = containers.new_pod_volumes(
        pod, str(tmp_path), {"beans-config": {"config.yaml": "name: beans\n"}}
    )
    assert open(os.path.join(folders["config"], "config.yaml")).read() == "name: beans\n"
    assert os.listdir(folders["scratch"]) == [] and os.stat(folders["scratch"]).st_mode & 0o1777 == 0o1777


@pytest.mark.parametrize(
    ("quantity", "flag"),
    [("8Gi", str(8 * 2**30)), ("512Mi", str(512 * 2**20)), ("1G", "1000000000"), ("300", "300")],
)
def test_memory_quantities(quantity, flag):
    assert containers.memory_flag(quantity) == flag
