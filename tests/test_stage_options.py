"""How the stage configures Beam: pass-through options and the local worker count."""

from components.config import load_config
from components.preprocess import stage
from components.preprocess.transforms import available_cpus


def _config(*overrides):
    return load_config(None, ["data.source=/d", "run_dir=/r", *overrides])


def test_one_in_process_worker_by_default_and_threads_share_the_cores():
    config = _config()
    assert stage.local_workers(config) == 1
    assert stage.image_threads(config) == 0  # resolved on the worker: one per core
    three = _config("preprocess.num_workers=3")
    assert stage.local_workers(three) == 3
    assert stage.image_threads(three) == max(1, available_cpus() // 3)
    assert stage.image_threads(_config("preprocess.num_workers=3", "preprocess.image_threads=5")) == 5
    remote = _config("preprocess.runner=DataflowRunner", "preprocess.num_workers=3")
    assert stage.image_threads(remote) == 0  # a remote worker counts its own cores


def test_pipeline_options_pass_through_and_win():
    options = stage.beam_options(
        _config(
            "preprocess.num_workers=2", "preprocess.pipeline_options={direct_running_mode: multi_threading}"
        ),
        "/tmp/beam",
    ).get_all_options()
    assert options["runner"] == "DirectRunner"
    assert options["direct_num_workers"] == 2
    assert options["direct_running_mode"] == "multi_threading"
    remote = stage.beam_options(
        _config("preprocess.runner=DataflowRunner", "preprocess.pipeline_options={project: p, region: r}"),
        "gs://b/tmp",
    ).get_all_options()
    assert (remote["runner"], remote["project"], remote["region"]) == ("DataflowRunner", "p", "r")
    assert remote["temp_location"] == "gs://b/tmp"
