"""The image, built from the Dockerfile and run the way the rendered pods run it (``make test-image``).

The image is built with podman (daemonless, from Debian's packages) on a base made here: no
container registry is reachable, so ``mmdebstrap`` builds a minimal Debian bookworm (Python
3.11) root file system from Debian's packages, imported as a local image and passed as
``PYTHON_IMAGE``. Then the image renders the cluster manifests itself (``finetune render`` on
configs/beans-cluster.yaml, tiny settings), and each stage Job's pod runs as containers
translated from the manifest (``tests.containers``): user 1000, read-only root file system,
the rendered ConfigMap at /etc/finetune, an emptyDir at /tmp, dropped capabilities, the pod's
memory limit, no credentials and no network. The two pods of the training Indexed Job train
together on a private (internal) podman network, each finding the other by the DNS names in
its rendered environment. Last, the image renders the predict Job (``finetune render
--predict``) and its pod classifies the images with the version just pushed, by its alias.

The one departure from the manifests: on a cluster ``run_dir``, ``data.source`` and
``registry.uri`` are gs:// URIs, and here they are mounted folders (``/data`` read-only,
``/outputs``), written into the ConfigMap's config.yaml in place of the bucket's.

Set ``FINETUNE_TEST_IMAGE`` to test an image built already (by ``make image`` or docker),
``FINETUNE_TEST_BASE_IMAGE`` to build on a base image of your own instead of mmdebstrap's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from pipeline.cluster.manifests import RUN_AS_UID
from tests import containers
from tests.train_helpers import TINY_SIZE, make_colour_images

pytestmark = [pytest.mark.image, pytest.mark.timeout(2400)]  # the first test builds the image
ROOT = Path(__file__).resolve().parent.parent
TAG = "localhost/finetune:test"
BASE_TAG = "localhost/finetune-test-base:bookworm"
BASE_PACKAGES = "python3,python3-venv,python-is-python3,ca-certificates"
NETWORK_SUBNET = "10.89.201"  # the internal network of the training pods: <subnet>.10, .11, ...
# Tiny settings rendered into the ConfigMap; gate.min_improvement=-1 blesses any candidate,
# so export and push run in the image too.
SETTINGS = [
    "model.weights=none",
    f"model.image_size={TINY_SIZE}",
    "train.batch_size=4",  # per replica: a global batch of 8 on the two workers
    "train.baseline_epochs=2",
    "train.finetune_epochs=1",
    "train.baseline_learning_rate=0.01",
    "evaluate.bootstrap_samples=200",
    "gate.min_improvement=-1",
]
IMAGES_PER_CLASS = 30


def _run(argv: list[str], env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)


def _check(result: subprocess.CompletedProcess, what: str) -> str:
    assert result.returncode == 0, (
        f"{what} exited {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def podman(tmp_path_factory) -> dict[str, str]:
    """The environment podman runs with (this machine's containers.conf); skips when podman
    cannot run containers here, saying why."""
    conf = containers.containers_conf(str(tmp_path_factory.mktemp("podman") / "containers.conf"))
    env = dict(os.environ) | {"CONTAINERS_CONF": conf}
    reason = containers.unusable_reason(env)
    if reason:
        pytest.skip(reason)
    return env


@pytest.fixture(scope="module")
def base_image(podman, tmp_path_factory):
    """A minimal Debian bookworm image with Python 3.11, from Debian's packages."""
    if os.environ.get("FINETUNE_TEST_BASE_IMAGE"):
        yield os.environ["FINETUNE_TEST_BASE_IMAGE"]
        return
    if not shutil.which("mmdebstrap"):
        pytest.skip("mmdebstrap is not installed (Debian: apt-get install mmdebstrap; .ci/run does)")
    tarball = str(tmp_path_factory.mktemp("base") / "bookworm.tar")
    started = time.perf_counter()
    argv = ["mmdebstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", tarball]
    _check(_run(argv, podman), "mmdebstrap")
    _check(_run(["podman", "import", tarball, BASE_TAG], podman), "podman import")
    os.remove(tarball)
    print(f"base image {BASE_TAG}: {time.perf_counter() - started:.0f} s")
    yield BASE_TAG
    _run(["podman", "rmi", "--force", BASE_TAG], podman)


@pytest.fixture(scope="module")
def image(podman, base_image) -> str:
    """The Dockerfile's image, built with podman (``--isolation chroot``: no daemon, no nested
    namespaces); pip inside the build trusts the host's CA bundle."""
    if os.environ.get("FINETUNE_TEST_IMAGE"):
        yield os.environ["FINETUNE_TEST_IMAGE"]
        return
    argv = [
        "podman",
        "build",
        "--isolation",
        "chroot",
        "--build-arg",
        f"PYTHON_IMAGE={base_image}",
        "-t",
        TAG,
    ]
    if os.path.exists(containers.HOST_CA_BUNDLE):
        argv += ["--volume", f"{containers.HOST_CA_BUNDLE}:{containers.HOST_CA_BUNDLE}:ro"]
    started = time.perf_counter()
    _check(_run([*argv, str(ROOT)], podman, timeout=1800), "podman build")
    size = _check(_run(["podman", "image", "inspect", "--format", "{{.Size}}", TAG], podman), "inspect")
    print(f"image {TAG}: built in {time.perf_counter() - started:.0f} s, {int(size) / 1e9:.2f} GB")
    yield TAG
    _run(["podman", "rmi", "--force", TAG], podman)
    _run(["podman", "image", "prune", "--force"], podman)  # the build stage's unnamed image


def _locked_down(image: str, *argv: str, entrypoint: str | None = None) -> list[str]:
    """``podman run`` as a stage pod runs: user 1000, read-only root but for /tmp (the pods'
    emptyDir), no network, no capabilities."""
    run = [
        "podman",
        "run",
        "--rm",
        "--user",
        f"{RUN_AS_UID}:{RUN_AS_UID}",
        "--network",
        "none",
        "--tmpfs",
        "/tmp",
    ]
    run += [
        "--read-only",
        "--read-only-tmpfs=false",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
    ]
    return run + (["--entrypoint", entrypoint] if entrypoint else []) + [image, *argv]


def test_the_image_holds_the_installed_package_and_no_credentials(podman, image):
    help_text = _check(_run(_locked_down(image), podman), "finetune --help")
    assert "preprocess" in help_text and "render" in help_text
    probe = (
        "import os, json, importlib.resources as r, pipeline, components.preprocess.stage as p; "
        "print(json.dumps({'uid': os.getuid(), 'pipeline': pipeline.__file__, 'stage': p.__file__, "
        "'template': r.files('components.evaluate').joinpath('report.html.j2').is_file(), "
        "'credentials': sorted(k for k in os.environ if 'CREDENTIALS' in k)}))"
    )
    result = _run(_locked_down(image, "-c", probe, entrypoint="python"), podman)
    _check(result, "probe")
    found = json.loads(result.stdout)
    assert found["uid"] == RUN_AS_UID
    assert found["pipeline"].startswith("/opt/venv/lib/python3.11/site-packages/")  # installed, not /app
    assert found["stage"].startswith("/opt/venv/lib/python3.11/site-packages/components/preprocess/")
    assert found["template"] is True and found["credentials"] == []


def _render(podman: dict[str, str], image: str, *flags: str) -> dict[str, dict]:
    """The image's own ``finetune render`` of configs/beans-cluster.yaml (plus ``flags``); the
    manifests by kind and name."""
    mount = ["--volume", f"{ROOT / 'configs'}:/configs:ro"]
    argv = _locked_down(image, "render", "--config", "/configs/beans-cluster.yaml", *flags)
    argv[2:2] = mount
    for setting in [f"cluster.image={image}", *SETTINGS]:
        argv += ["--set", setting]
    result = _run(argv, podman)
    _check(result, "finetune render")
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]  # stdout: the manifests alone
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def _mounted_config(config_map: dict) -> dict[str, str]:
    """The ConfigMap's files with gs:// run_dir, data.source and registry.uri replaced by the
    mounted folders; every other key as rendered."""
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    assert all(
        v.startswith("gs://")
        for v in (config["run_dir"], config["data"]["source"], config["registry"]["uri"])
    )
    config["run_dir"], config["data"]["source"] = "/outputs/run", "/data"
    config["registry"]["uri"] = "/outputs/registry"
    return {"config.yaml": yaml.safe_dump(config, sort_keys=False)}


def _mounted_predict_config(config_map: dict) -> dict[str, str]:
    """The predict ConfigMap's config.yaml with its gs:// input, output and registry replaced by
    the mounted folders; every other key as rendered."""
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    predict = config["predict"]
    assert all(
        v.startswith("gs://") for v in (predict["input"], predict["output"], config["registry"]["uri"])
    )
    predict["input"], predict["output"] = "/data", "/outputs/predictions"
    config["registry"]["uri"] = "/outputs/registry"
    return {"config.yaml": yaml.safe_dump(config, sort_keys=False)}


class Pods:
    """Runs a rendered Job's pods as containers, with /data and /outputs mounted."""

    def __init__(self, podman: dict[str, str], root: Path, config_maps: dict, data: Path, outputs: Path):
        self.podman, self.root, self.config_maps = podman, root, config_maps
        self.mounts = [(str(data), "/data", True), (str(outputs), "/outputs", False)]

    def argvs(self, job: dict, index: int | None = None, **network) -> list[list[str]]:
        """Each container's ``podman run`` argv of pod ``index`` of ``job``, in order."""
        pod = job["spec"]["template"]["spec"]
        name = job["metadata"]["name"] + ("" if index is None else f"-{index}")
        folder = self.root / name
        volumes = containers.new_pod_volumes(pod, str(folder), self.config_maps)
        return [
            containers.run_argv(
                pod,
                c,
                name=f"{name}-{c['name']}",
                volumes=volumes,
                mounts=self.mounts,
                index=index,
                **network,
            )
            for c in containers.pod_containers(pod)
        ]

    def run(self, job: dict) -> str:
        """Runs the pod of a one-pod Job to the end; returns its containers' logs."""
        logs = []
        for argv in self.argvs(job):
            logs.append(_check(_run(argv, self.podman), argv[argv.index("--name") + 1]))
        return "\n".join(logs)

    def run_indexed(self, job: dict, network: str) -> list[str]:
        """Runs every pod of an Indexed Job at once on ``network``; returns each pod's log.
        Each pod gets Kubernetes' hostname ``<job>-<index>``, and every pod the headless
        Service's records ``<job>-<index>.<subdomain>.<namespace>.svc``."""
        spec, name = job["spec"], job["metadata"]["name"]
        assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
        subdomain, namespace = spec["template"]["spec"]["subdomain"], job["metadata"]["namespace"]
        ips = [f"{NETWORK_SUBNET}.{10 + i}" for i in range(spec["completions"])]
        hosts = {f"{name}-{i}.{subdomain}.{namespace}.svc": ip for i, ip in enumerate(ips)}
        procs = []
        for i, ip in enumerate(ips):
            (argv,) = self.argvs(job, i, network=network, hostname=f"{name}-{i}", ip=ip, hosts=hosts)
            log = open(self.root / f"{name}-{i}.log", "w+")
            procs.append((subprocess.Popen(argv, env=self.podman, stdout=log, stderr=subprocess.STDOUT), log))
        texts = []
        for proc, log in procs:
            proc.wait(timeout=900)
            log.seek(0)
            texts.append(log.read())
            log.close()
        assert [p.returncode for p, _ in procs] == [0] * len(procs), "\n\n".join(t[-4000:] for t in texts)
        return texts


@pytest.fixture()
def network(podman):
    """An internal podman network: the training pods reach each other and nothing else."""
    name = f"finetune-test-{os.getpid()}"
    _run(["podman", "network", "rm", "--force", name], podman)
    argv = ["podman", "network", "create", "--internal", "--subnet", f"{NETWORK_SUBNET}.0/24", name]
    _check(_run(argv, podman), "podman network create")
    yield name
    _run(["podman", "network", "rm", "--force", name], podman)


def test_the_rendered_pods_run_the_pipeline_in_the_image(podman, image, network, tmp_path):
    manifests = _render(podman, image)
    config_map = manifests["ConfigMap/beans-config"]
    preprocess, train, evaluate = (
        manifests[f"Job/beans-{stage}"] for stage in ("preprocess", "train", "evaluate")
    )
    assert train["spec"]["completions"] == 2  # cluster.workers in configs/beans-cluster.yaml
    data, outputs = tmp_path / "data", tmp_path / "outputs"
    images = make_colour_images(str(data), per_class=IMAGES_PER_CLASS)
    outputs.mkdir()
    if os.geteuid() == 0:
        os.chown(outputs, RUN_AS_UID, RUN_AS_UID)  # a bucket the pods' account may write
    else:
        outputs.chmod(0o777)
    pods = Pods(podman, tmp_path / "pods", {"beans-config": _mounted_config(config_map)}, data, outputs)
    run = outputs / "run"

    log = pods.run(preprocess)
    summary = json.loads((run / "preprocess" / "summary.json").read_text())
    assert sum(summary["records"].values()) == images, log

    chief, worker = pods.run_indexed(train, network)
    assert "MultiWorkerMirroredStrategy (worker 1/2" in chief and "[train] " not in worker
    summary = json.loads((run / "train" / "summary.json").read_text())
    assert (summary["strategy"], summary["workers"], summary["replicas"]) == (
        "MultiWorkerMirroredStrategy",
        2,
        2,
    )

    log = pods.run(evaluate)  # evaluate (the init container), then push
    verdict = json.loads((run / "evaluate" / "verdict.json").read_text())
    assert verdict["blessed"] is True, log
    assert "<html" in (run / "report.html").read_text()
    pushed = json.loads((run / "push" / "summary.json").read_text())
    assert pushed["pushed"] is True and pushed["promoted"], pushed
    version = outputs / "registry" / "beans" / str(pushed["version"])
    assert (version / "saved_model.pb").is_file() and (version / "variables").is_dir()

    # Batch prediction with the version just pushed, by its alias, as `finetune submit --predict`
    # runs it: the image renders the predict Job and its ConfigMap, and the pod classifies /data.
    alias = pushed["promoted"]["alias"]  # registry.promote_to of configs/beans-cluster.yaml
    flags = ["--predict", "--model", f"registry://beans@{alias}", "--input", "gs://bucket/new"]
    rendered = _render(podman, image, *flags, "--output", "gs://bucket/predictions")
    (job,) = [d for key, d in rendered.items() if key.startswith("Job/")]
    (predict_map,) = [d for key, d in rendered.items() if key.startswith("ConfigMap/")]
    name = predict_map["metadata"]["name"]
    predict_pods = Pods(
        podman, tmp_path / "predict-pods", {name: _mounted_predict_config(predict_map)}, data, outputs
    )
    log = predict_pods.run(job)
    predicted = json.loads((outputs / "predictions" / "summary.json").read_text())
    assert predicted["predictions"] == images and predicted["dead_letter"]["count"] == 0, log
    assert predicted["model"]["version"] == pushed["version"] and predicted["model"]["alias"] == alias
    rows = [
        json.loads(line)
        for f in predicted["files"]
        for line in (outputs / "predictions" / f).read_text().splitlines()
    ]
    assert len(rows) == images and {r["model"]["version"] for r in rows} == {pushed["version"]}

    if os.geteuid() == 0:  # everything the pods wrote belongs to the pods' user
        owners = {p.stat().st_uid for p in outputs.rglob("*")}
        assert owners == {RUN_AS_UID}, owners
