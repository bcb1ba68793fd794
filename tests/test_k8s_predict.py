"""Batch prediction on Kubernetes (``finetune render|submit|schedule --predict``): the predict
Job and CronJob validate against the Kubernetes schemas and carry exactly the stage pods'
security; the ConfigMap holds the configuration the pod loads; what a cluster needs is checked
before anything is rendered or sent; the commands reach the cluster through the same client as
the run's; ``finetune status`` shows predict Jobs.

As in tests/test_k8s_driver.py there is no API server here and no stand-in for one: creating
the Job, its ConfigMap and the owner reference, following the log and unschedule's deletes are
not run; the objects they send are the ones tested here.
"""

from __future__ import annotations

import datetime
import re
import socket
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes import client

from components.config import Config, load_config
from components.core.errors import ConfigError
from pipeline.cli import build_parser, main
from pipeline.cluster import driver, jobs, predict_jobs, render, views
from pipeline.cluster.client import to_model
from pipeline.cluster.manifests import CONFIG_PATH
from tests.test_k8s_render import KUBERNETES_VERSIONS, _kustomize_build, _restricted_violations

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_CONFIG = str(ROOT / "configs" / "beans-cluster.yaml")
SCHEDULE = "0 6 * * *"
SERIALIZE = client.ApiClient().sanitize_for_serialization
PREDICT = (
    "--model",
    "registry://beans@production",
    "--input",
    "gs://YOUR_BUCKET/uploads",
    "--output",
    "gs://YOUR_BUCKET/predictions/today",
)
SETTINGS = [
    "predict.model=registry://beans@production",
    "predict.input=gs://YOUR_BUCKET/uploads",
    "predict.output=gs://YOUR_BUCKET/predictions/today",
]
VARIANTS = {
    "cpu": (),
    "gpu": ("cluster.gpus_per_worker=2", "cluster.node_selector={pool: batch}"),
    "gpu-dataflow": (
        "cluster.gpus_per_worker=2",
        "predict.runner=DataflowRunner",
        "predict.pipeline_options={project: p, region: europe-west4, temp_location: gs://YOUR_BUCKET/tmp}",
    ),
    "key-secret": ("cluster.workload_identity=", "cluster.credentials_secret=gcs-key"),
    "savedmodel": (
        "predict.model=gs://YOUR_BUCKET/runs/beans/export/saved_model",
        "registry.uri=",
        "registry.promote_to=",
    ),
}


def _config(*overrides: str) -> Config:
    return load_config(CLUSTER_CONFIG, [*SETTINGS, *overrides], training=False)


def _documents(config: Config) -> list[dict]:
    """Everything the predict commands render or send: the files of ``render --predict
    --schedule``, and a submission's Job and ConfigMap (made its dependent)."""
    name = predict_jobs.submission_name(config)
    job = predict_jobs.predict_job(config, name)
    owned = predict_jobs.owned_by(
        predict_jobs.config_map(config, name), job, "0d9f3c1e-77aa-4f0b-9c55-1b2d3e4f5a6b"
    )
    rendered = [doc for f in render.predict_files(config, SCHEDULE) for doc in f.documents]
    return [*rendered, job, owned]


def _pod(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


def _cron_pod(config: Config) -> dict:
    return predict_jobs.cron_job(config, SCHEDULE)["spec"]["jobTemplate"]["spec"]["template"]["spec"]


# -- schema validation ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_predict_manifest_validates_strictly(version, variant):
    documents = _documents(_config(*VARIANTS[variant]))
    kinds = sorted(d["kind"] for d in documents)
    assert kinds == ["ConfigMap"] * 3 + ["CronJob", "Job", "Job", "Namespace", "ServiceAccount"]
    for doc in documents:
        # Strict: an unknown or misspelled field fails, as `kubectl apply --validate=strict` would.
        assert kubernetes_validate.validate(doc, version, strict=True) == version


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_predict_manifest_sent_is_the_rendered_one(variant):
    """The client's typed calls take its models: each manifest survives the trip."""
    for doc in _documents(_config(*VARIANTS[variant])):
        assert SERIALIZE(to_model(doc)) == doc, doc["kind"]


# -- the pod ---------------------------------------------------------------------------------


def test_the_predict_pod_runs_finetune_predict_with_its_own_configmap():
    config = _config()
    submitted = predict_jobs.submission_name(config)
    for name, pod in (
        ("beans-predict", _pod(predict_jobs.predict_job(config))),
        (submitted, _pod(predict_jobs.predict_job(config, submitted))),
        ("beans-predict-schedule", _cron_pod(config)),
    ):
        (container,) = pod["containers"]
        assert container["command"] + container["args"] == ["finetune", "predict", "--config", CONFIG_PATH]
        args = build_parser().parse_args(container["args"])  # the pod's argv, read by this CLI
        assert (args.command, args.config, args.overrides) == ("predict", CONFIG_PATH, [])
        assert args.model is args.input is args.output is None  # all of it from the ConfigMap
        assert {"name": "config", "configMap": {"name": name}} in pod["volumes"]
        assert container["image"] == config.cluster.image


def test_the_predict_pod_has_the_stage_pods_security_and_account():
    for variant in ("cpu", "key-secret"):
        config = _config(*VARIANTS[variant])
        stage = _pod(jobs.preprocess_job(config))
        (stage_container,) = stage["containers"]
        for pod in (_pod(predict_jobs.predict_job(config)), _cron_pod(config)):
            (container,) = pod["containers"]
            assert pod["securityContext"] == stage["securityContext"]
            assert container["securityContext"] == stage_container["securityContext"]
            assert pod["serviceAccountName"] == stage["serviceAccountName"] == "beans-stage"
            assert pod.get("automountServiceAccountToken") == stage.get("automountServiceAccountToken")
            assert pod["restartPolicy"] == "Never"
            # the scratch emptyDir, the configuration read-only and the credentials, as a stage's
            assert container["volumeMounts"] == stage_container["volumeMounts"]
            assert container.get("env") == stage_container.get("env")
            assert [v for v in pod["volumes"] if v["name"] != "config"] == [
                v for v in stage["volumes"] if v["name"] != "config"
            ]
            assert _restricted_violations(pod) == []
    assert {"name": "credentials", "secret": {"secretName": "gcs-key"}} in _pod(
        predict_jobs.predict_job(config)
    )["volumes"]


def test_the_predict_job_has_the_stage_jobs_deadline_retries_and_failure_policy():
    config = _config("cluster.stage_timeout_seconds=7200", "cluster.backoff_limit=4", "cluster.cpu=3")
    spec = predict_jobs.predict_job(config)["spec"]
    stage = jobs.preprocess_job(config)["spec"]
    assert {k: v for k, v in spec.items() if k != "template"} == {
        k: v for k, v in stage.items() if k != "template"
    }
    assert spec["activeDeadlineSeconds"] == 7200 and spec["backoffLimit"] == 4
    (container,) = _pod(predict_jobs.predict_job(config))["containers"]
    assert container["resources"] == {"requests": {"cpu": "3", "memory": "8Gi"}, "limits": {"memory": "8Gi"}}


@pytest.mark.parametrize(
    "variant, gpus, selector",
    [
        ("cpu", 0, None),
        ("gpu", 1, {"pool": "batch", "cloud.google.com/gke-accelerator": "nvidia-l4"}),
        ("gpu-dataflow", 0, None),  # the pod only submits the pipeline: Dataflow's workers run it
    ],
)
def test_a_predict_pod_asks_for_one_gpu_only_when_the_model_runs_in_it(variant, gpus, selector):
    config = _config(*VARIANTS[variant])
    pod = _pod(predict_jobs.predict_job(config))
    (container,) = pod["containers"]
    assert container["resources"]["limits"].get("nvidia.com/gpu") == (str(gpus) if gpus else None)
    assert pod.get("nodeSelector") == selector
    assert ("tolerations" in pod) == bool(gpus)
    if gpus:
        assert pod["tolerations"] == _pod(jobs.train_job(config))["tolerations"]
    # every pod of a GPU configuration runs the GPU image, as the run's do
    expected = config.cluster.gpu_image if config.cluster.gpus_per_worker else config.cluster.image
    assert container["image"] == expected


def test_predict_local_runners_are_beams_local_runners():
    from components.preprocess.runners import LOCAL_RUNNERS

    assert predict_jobs.IN_POD_RUNNERS == LOCAL_RUNNERS


# -- names, labels, the schedule and the configuration --------------------------------------------


def test_each_submission_gets_a_new_name_and_everything_is_labelled_predict():
    config = _config()
    names = {predict_jobs.submission_name(config) for _ in range(20)}
    assert len(names) == 20 and all(re.fullmatch(r"beans-predict-[a-z0-9]{5}", n) for n in names)
    for doc in _documents(config):
        if doc["kind"] not in ("Namespace", "ServiceAccount"):
            assert doc["metadata"]["labels"]["app.kubernetes.io/component"] == "predict", doc["kind"]
    job = predict_jobs.predict_job(config)
    assert job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "predict"
    assert job["metadata"]["annotations"] == {
        "finetune/predict-model": "registry://beans@production",
        "finetune/predict-input": "gs://YOUR_BUCKET/uploads",
        "finetune/predict-output": "gs://YOUR_BUCKET/predictions/today",
    }
    owned = predict_jobs.owned_by(predict_jobs.config_map(config, "beans-predict-abcde"),
                                  predict_jobs.predict_job(config, "beans-predict-abcde"), "u-1")  # fmt: skip
    assert owned["metadata"]["ownerReferences"] == [
        {"apiVersion": "batch/v1", "kind": "Job", "name": "beans-predict-abcde", "uid": "u-1"}
    ]


def test_the_predict_schedule_runs_one_predict_job_at_a_time():
    config = _config("cluster.starting_deadline_seconds=600")
    cron = predict_jobs.cron_job(config, "@daily")
    assert cron["metadata"]["name"] == "beans-predict-schedule"
    spec = cron["spec"]
    assert spec["schedule"] == "@daily" and spec["timeZone"] == "Etc/UTC"
    assert spec["concurrencyPolicy"] == "Forbid" and spec["startingDeadlineSeconds"] == 600
    assert spec["jobTemplate"]["spec"] == predict_jobs.predict_job(config, "beans-predict-schedule")["spec"]
    template = spec["jobTemplate"]["metadata"]
    assert template["annotations"] == predict_jobs.predict_job(config)["metadata"]["annotations"]


def test_the_configmap_holds_exactly_the_configuration_the_pod_loads(tmp_path):
    # no run_dir, no data.source: predict needs neither
    config = load_config(None, ["name=beans", "cluster.image=registry.example/finetune:1",
                                "registry.uri=gs://b/registry", *SETTINGS], training=False)  # fmt: skip
    assert config.run_dir == "" and config.data.source == ""
    path = tmp_path / "config.yaml"
    path.write_text(predict_jobs.config_map(config, "beans-predict")["data"]["config.yaml"])
    loaded = load_config(str(path), training=False)  # what `finetune predict --config` loads in the pod
    assert loaded == config
    assert loaded.predict.model == "registry://beans@production"
    assert loaded.predict.output == "gs://YOUR_BUCKET/predictions/today"


# -- what a cluster needs ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["predict.input=/data/uploads"], "predict.input: '/data/uploads' must be a gs:// URI on a cluster"),
        (["predict.output=predictions/"], "predict.output: 'predictions/' must be a gs:// URI on a cluster"),
        (
            ["predict.model=runs/beans/export/saved_model"],
            "predict.model: 'runs/beans/export/saved_model' "
            "must be registry://NAME@ALIAS, registry://NAME/VERSION or a gs:// URI",
        ),  # fmt: skip
        (
            ["registry.uri=registry"],
            "registry.uri: 'registry' must be a gs:// URI on a cluster to resolve "
            "predict.model registry://beans@production",
        ),  # fmt: skip
        (
            ["predict.model="],
            "predict.model: required for a predict Job (--model or --set predict.model=...)",
        ),
        (["predict.input="], "predict.input: required for a predict Job (--input or"),
        (["predict.output="], "predict.output: required for a predict Job (--output or"),
        (["cluster.image="], "cluster.image: required to run on a cluster"),
        (["name=" + "a" * 41], "has 41 characters; at most 40 for a predict Job"),
    ],
)
def test_what_a_predict_job_needs_is_checked_when_rendering(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        render.predict_files(_config(*overrides))


def test_the_runs_own_needs_do_not_apply_and_a_schedule_needs_a_shorter_name():
    # a local run_dir and no data source (the run would refuse both), weights from a local file
    config = _config("run_dir=runs/beans", "data.source=", "model.weights=/tmp/w.h5")
    assert [f.name for f in render.predict_files(config)] == [
        "namespace.yaml",
        "serviceaccount.yaml",
        "predict.yaml",
    ]
    with pytest.raises(ConfigError, match="run_dir: 'runs/beans' must be a gs:// URI"):
        render.manifest_files(load_config(CLUSTER_CONFIG, ["run_dir=runs/beans"]))
    name = "b" * 36
    assert render.predict_files(_config(f"name={name}"))  # a Job: at most 40, as the run's
    with pytest.raises(
        ConfigError, match=re.escape(f"at most 35 for a predict schedule (it names {name}-predict-schedule)")
    ):
        render.predict_files(_config(f"name={name}"), SCHEDULE)
    with pytest.raises(ConfigError, match=re.escape("--schedule: 'nightly' is not a cron schedule")):
        render.predict_files(_config(), "nightly")


# -- finetune render --predict ---------------------------------------------------------------------


def test_render_predict_prints_the_predict_manifests_and_out_writes_an_applicable_folder(tmp_path, capsys):
    argv = ["render", "--predict", "--config", CLUSTER_CONFIG, *PREDICT]
    assert main([*argv, "--schedule", SCHEDULE]) == 0
    printed = list(yaml.safe_load_all(capsys.readouterr().out))
    config = _config()
    assert printed == [doc for f in render.predict_files(config, SCHEDULE) for doc in f.documents]
    assert {(d["kind"], d["metadata"]["name"]) for d in printed} == {
        ("Namespace", "finetune"),
        ("ServiceAccount", "beans-stage"),
        ("ConfigMap", "beans-predict"),
        ("Job", "beans-predict"),
        ("ConfigMap", "beans-predict-schedule"),
        ("CronJob", "beans-predict-schedule"),
    }  # none of the run's: no driver, Role, Service, stage Jobs
    assert main([*argv, "--out", str(tmp_path)]) == 0
    built = _kustomize_build(tmp_path)
    assert [(d["kind"], d["metadata"]["name"]) for d in built] == [
        ("ServiceAccount", "beans-stage"),
        ("ConfigMap", "beans-predict"),
        ("Job", "beans-predict"),
    ]


def test_render_predict_refuses_what_makes_no_sense(tmp_path, capsys):
    assert (
        main(["render", "--predict", "--config", CLUSTER_CONFIG, *PREDICT, "--kustomize", str(tmp_path)]) == 2
    )
    assert (
        "--kustomize writes the run's base and CPU/GPU overlays (k8s/), not a predict Job"
        in capsys.readouterr().err
    )
    assert not list(tmp_path.iterdir())
    assert main(["render", "--config", CLUSTER_CONFIG, "--model", "registry://beans@production"]) == 2
    assert "--model: only with --predict" in capsys.readouterr().err
    assert main(["render", "--predict", "--config", CLUSTER_CONFIG, *PREDICT[:4], "--output", "out/"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("finetune: error: cannot run predict on a cluster:")
    assert "predict.output: 'out/' must be a gs:// URI on a cluster" in err


# -- the commands reach the cluster through the run's client --------------------------------------


@pytest.fixture
def no_pod(monkeypatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


COMMANDS = [
    ["submit", "--predict", "--config", CLUSTER_CONFIG, *PREDICT],
    ["submit", "--predict", "--config", CLUSTER_CONFIG, *PREDICT, "--wait", "-n", "ml"],
    ["schedule", "--predict", "--config", CLUSTER_CONFIG, *PREDICT, "--cron", SCHEDULE],
    ["unschedule", "beans", "--predict"],
    ["logs", "beans", "--stage", "predict"],
    ["status", "beans"],
]


def test_the_predict_commands_check_the_configuration_then_need_a_kubeconfig(
    tmp_path, monkeypatch, capsys, no_pod
):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none" / "config"))
    for argv in COMMANDS:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("finetune: error: no kubeconfig:") and err.count("\n") == 1, argv
    # a local input is refused before any cluster is looked for
    local = ["submit", "--predict", "--config", CLUSTER_CONFIG, *PREDICT[:2], "--input", "uploads/",
             "--output", "gs://b/o"]  # fmt: skip
    assert main(local) == 2
    assert "predict.input: 'uploads/' must be a gs:// URI on a cluster" in capsys.readouterr().err
    bad_cron = ["schedule", "--predict", "--config", CLUSTER_CONFIG, *PREDICT, "--cron", "0 25 * * *"]
    assert main(bad_cron) == 2
    assert "--cron: '0 25 * * *' is not a cron schedule" in capsys.readouterr().err


def test_an_unreachable_api_server_is_one_line_and_exit_code_1(tmp_path, monkeypatch, capsys, no_pod):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": f"https://127.0.0.1:{port}"}}],
        "users": [{"name": "u", "user": {"token": "not-a-real-token"}}],
        "contexts": [{"name": "dev", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "dev",
    }
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    first_call = ["list Jobs", "list Jobs", "create ServiceAccount beans-stage",
                  "delete CronJob beans-predict-schedule", "list Jobs", "list Jobs"]  # fmt: skip
    for argv, what in zip(COMMANDS, first_call, strict=True):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert f"cannot reach the Kubernetes API server at https://127.0.0.1:{port}" in err, argv
        assert f"to {what}:" in err and "Traceback" not in err and err.count("\n") == 1, argv


# -- what the commands decide on the API's answers ------------------------------------------------

T0 = datetime.datetime(2026, 11, 26, 6, 0, 5, tzinfo=datetime.UTC)


def _job(
    name: str, component: str = "predict", output: str | None = None, created: int = 0, **status
) -> dict:
    """A Job as the API returns it: the client's model, serialized by the client."""
    annotations = None
    if output is not None:
        annotations = {"finetune/predict-model": "registry://beans/3", "finetune/predict-input": "gs://b/in",
                       "finetune/predict-output": output}  # fmt: skip
    meta = client.V1ObjectMeta(
        name=name,
        namespace="finetune",
        labels={"app.kubernetes.io/instance": "beans", "app.kubernetes.io/component": component},
        annotations=annotations,
        creation_timestamp=T0 + datetime.timedelta(seconds=created),
    )
    job = client.V1Job(api_version="batch/v1", kind="Job", metadata=meta, status=client.V1JobStatus(**status))
    return SERIALIZE(job)


def _complete(seconds: int) -> dict:
    end = T0 + datetime.timedelta(seconds=seconds)
    done = client.V1JobCondition(type="Complete", status="True", last_transition_time=end)
    return {"start_time": T0, "completion_time": end, "succeeded": 1, "conditions": [done]}


def test_a_second_job_writing_the_same_output_is_refused_and_a_schedule_keeps_its_configmap_in_use():
    found = [
        _job("beans-predict-x2b4c", output="gs://b/out/", start_time=T0, active=1),
        _job("beans-predict-k9m7p", output="gs://b/other", start_time=T0, active=1),
        _job("beans-predict-q5r6s", output="gs://b/out", **_complete(60)),
        _job("beans-predict-schedule-29411280", output="gs://b/daily", start_time=T0, active=1),
        _job("beans-predict-schedule-29409840", output="gs://b/daily", **_complete(60)),
    ]
    assert predict_jobs.writing_to(found, "gs://b/out") == ["beans-predict-x2b4c"]  # not the finished one
    assert predict_jobs.writing_to(found, "gs://b/new") == []
    assert predict_jobs.started_by(found, "beans-predict-schedule") == ["beans-predict-schedule-29411280"]
    assert predict_jobs.started_by(found[:3], "beans-predict-schedule") == []


def test_status_shows_predict_jobs_with_what_they_predict_and_the_predict_schedule():
    now = T0 + datetime.timedelta(seconds=600)
    found = [
        _job("beans-predict-x2b4c", output="gs://b/out", created=0, start_time=T0, active=1, ready=1),
        _job("beans-predict-schedule-29411280", output="gs://b/daily", created=-60, **_complete(95)),
    ]
    cron = SERIALIZE(to_model(predict_jobs.cron_job(_config(), SCHEDULE)))
    lines = views.status_lines("beans", found, None, now, tuple(driver.JOB_STAGES), cron)
    assert lines[0].split() == ["JOB", "STATUS", "START", "DURATION", "DETAIL"]
    assert lines[1].split()[:2] == ["beans-predict-schedule-29411280", "succeeded"]
    assert lines[1].endswith("registry://beans/3: gs://b/in -> gs://b/daily")
    assert lines[2].split()[:2] == ["beans-predict-x2b4c", "active"]
    assert lines[2].endswith("registry://beans/3: gs://b/in -> gs://b/out; running: 1 pod active, 1 ready")
    assert lines[3] == "schedule beans-predict-schedule: '0 6 * * *' (Etc/UTC), last run never"
    assert len(lines) == 4  # only predict Jobs: no `not created` rows for the run's stages
    with_run = [_job("beans-driver", "driver", created=-30, start_time=T0, active=1), *found]
    lines = views.status_lines("beans", with_run, None, now, tuple(driver.JOB_STAGES), cron)
    assert [line.split()[0] for line in lines[1:-1]] == [
        "beans-driver", "beans-preprocess", "beans-train", "beans-evaluate",
        "beans-predict-schedule-29411280", "beans-predict-x2b4c",
    ]  # fmt: skip


# -- --help --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command, expected",
    [
        (["submit"], ["--predict", "--model REF", "--input SOURCE", "--output URI", "submit --predict"]),
        (["schedule"], ["--predict", "<name>-predict-schedule", "schedule --predict"]),
        (["unschedule"], ["--predict", "NAME-predict-schedule", "unschedule beans --predict"]),
        (["render"], ["--predict", "<name>-predict", "render --predict"]),
        (["logs"], ["{driver,preprocess,train,evaluate,push,predict}", "--stage predict"]),
    ],
)
def test_the_predict_flags_explain_themselves(command, expected, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps descriptions
    for text in expected:
        assert " ".join(text.split()) in out, text
