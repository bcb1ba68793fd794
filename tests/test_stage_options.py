"""How the stage configures Beam: pass-through options and the local worker count."""

import os

from components.preprocess import stage
from pipeline.config import load_config


def _config(*overrides):
    return load_config(None, ["data.source=/d", "run_dir=/r", *overrides])


def test_auto_workers_use_every_core_only_for_large_inputs():
    config = _config()
    assert stage.local_workers(config, 100) == 1
    assert stage.local_workers(config, stage.PARALLEL_MIN_IMAGES) == (os.cpu_count() or 1)
    assert stage.local_workers(_config("preprocess.num_workers=3"), 100) == 3


def test_pipeline_options_pass_through_and_win():
    options = stage.beam_options(
        _config(
            "preprocess.num_workers=2", "preprocess.pipeline_options={direct_running_mode: multi_threading}"
        ),
        "/tmp/beam",
        10,
    ).get_all_options()
    assert options["runner"] == "DirectRunner"
    assert options["direct_num_workers"] == 2
    assert options["direct_running_mode"] == "multi_threading"
    remote = stage.beam_options(
        _config("preprocess.runner=DataflowRunner", "preprocess.pipeline_options={project: p, region: r}"),
        "gs://b/tmp",
        10,
    ).get_all_options()
    assert (remote["runner"], remote["project"], remote["region"]) == ("DataflowRunner", "p", "r")
    assert remote["temp_location"] == "gs://b/tmp"
