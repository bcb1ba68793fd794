"""The configuration tree: defaults, YAML, overrides, validation, round trip."""

import pytest

from components.config import Config, load_config, resolved_image_size, to_yaml
from components.core.errors import ConfigError


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_minimal_config_gets_defaults(tmp_path):
    config = load_config(_write(tmp_path, "data: {source: /images}\nrun_dir: /runs/x\n"))
    assert config.data.source == "/images"
    assert config.run_dir == "/runs/x"
    assert config.model.backbone == "mobilenet_v2"
    assert resolved_image_size(config) == 224
    assert config.preprocess.runner == "DirectRunner"
    assert (config.data.split.train, config.data.split.eval, config.data.split.test) == (0.8, 0.1, 0.1)


def test_overrides_apply_after_the_file_and_parse_yaml_values(tmp_path):
    path = _write(tmp_path, "data: {source: /a}\nrun_dir: r\nmodel: {image_size: 160}\n")
    config = load_config(
        path,
        [
            "model.image_size=96",
            "data.split={train: 0.7, eval: 0.2, test: 0.1}",
            "preprocess.pipeline_options.temp_location=gs://b/tmp",
        ],
    )
    assert config.model.image_size == 96
    assert config.data.split.eval == 0.2
    assert config.preprocess.pipeline_options == {"temp_location": "gs://b/tmp"}


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.backbon=vgg16", "unknown key 'model.backbon'; did you mean 'backbone'?"),
        ("modle.backbone=vgg16", "unknown key 'modle'; did you mean 'model'?"),
        ("model.backbone=mobilenetv2", "did you mean 'mobilenet_v2'?"),
        ("model.image_size=16", "model.image_size: 16 is below the minimum of 32"),
        ("model.image_size=big", "model.image_size: expected int, got 'big'"),
        ("data.split.train=0.5", "must sum to 1"),
        ("preprocess.runner=DataflowRuner", "did you mean 'DataflowRunner'?"),
        ("preprocess.max_bad_fraction=2", "preprocess.max_bad_fraction: 2.0 must be between 0 and 1"),
        ("preprocess.num_shards=-1", "preprocess.num_shards: -1 must be between 0"),
        ("name=My Model", "name: 'My Model' must be 1-63 lowercase"),
        ("run_dir=", "run_dir: required"),
        ("oops", "--set: expected key=value"),
        (
            "train.finetune_schedule=linear",
            "train.finetune_schedule: 'linear' must be one of cosine, constant",
        ),
        # NaN and infinities pass range checks written as "not below" and fail late or silently
        ("gate.min_value=.nan", "gate.min_value: nan must be a finite number"),
        ("train.finetune_learning_rate=.inf", "train.finetune_learning_rate: inf must be a finite number"),
        ("model.alpha=-.inf", "model.alpha: -inf must be a finite number"),
        ("train.seed=-1", "train.seed: -1 must be between 0 and 4294967295"),
        ("evaluate.seed=4294967296", "evaluate.seed: 4294967296 must be between 0 and 4294967295"),
        ("model.image_size=100000", "model.image_size: 100000 is above 2048 px"),
        # credentials in pipeline_options would be copied into every config.yaml and ConfigMap
        (
            "preprocess.pipeline_options={s3_secret_access_key: abc, project: p}",
            "preprocess.pipeline_options: s3_secret_access_key look like credentials",
        ),
        ("preprocess.pipeline_options={hdfs_token: t}", "hdfs_token look like credentials"),
        ("preprocess.pipeline_options={gcs_api_key: k}", "gcs_api_key look like credentials"),
    ],
)
def test_bad_values_fail_before_work_with_the_key_named(tmp_path, override, message):
    path = _write(tmp_path, "data: {source: /a}\nrun_dir: r\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, [override])
    assert message in str(error.value)


def test_ordinary_pipeline_options_pass():
    options = "{project: p, region: us-east1, temp_location: gs://b/t, dataflow_kms_key: k, num_workers: 8}"
    config = load_config(None, ["data.source=/a", "run_dir=r", f"preprocess.pipeline_options={options}"])
    assert config.preprocess.pipeline_options["dataflow_kms_key"] == "k"


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["model.backbone=nope", "preprocess.jpeg_quality=0"])
    text = str(error.value)
    for part in ("run_dir: required", "data.source: required", "model.backbone", "jpeg_quality"):
        assert part in text


def test_missing_file_and_non_mapping_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(str(tmp_path / "absent.yaml"))
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))


def test_yaml_round_trip_is_identical(tmp_path):
    config = load_config(
        None,
        [
            "data.source=/a",
            "run_dir=/r",
            "model.backbone=resnet50",
            "preprocess.pipeline_options={project: p}",
        ],
    )
    again = load_config(_write(tmp_path, to_yaml(config)))
    assert again == config
    assert isinstance(again, Config)


def test_a_file_can_extend_another_and_override_parts_of_it(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "name: base\ndata: {source: /d}\nmodel: {alpha: 0.35, dropout: 0.3}\ntrain: {seed: 7}\n"
    )
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "run.yaml").write_text("extends: ../base.yaml\nmodel: {dropout: 0.1}\nrun_dir: r\n")
    config = load_config(str(tmp_path / "sub" / "run.yaml"), ["train.seed=9"])
    assert (config.name, config.model.alpha, config.model.dropout) == ("base", 0.35, 0.1)
    assert (config.run_dir, config.train.seed) == ("r", 9)
    assert "extends" not in to_yaml(config)  # the resolved tree: what a pod or a run records


def test_extends_errors_name_the_files(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="a.yaml -> .*b.yaml -> .*a.yaml is a cycle"):
        load_config(str(tmp_path / "a.yaml"))
    # The same file spelt another way is still a cycle, not a RecursionError (exit 2, not 1).
    (tmp_path / "self.yaml").write_text("extends: ./self.yaml\n")
    with pytest.raises(ConfigError, match=r"self.yaml -> .*self.yaml is a cycle"):
        load_config(str(tmp_path / "self.yaml"))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.yaml").write_text("extends: ../e.yaml\n")
    (tmp_path / "e.yaml").write_text(f"extends: {tmp_path / 'sub' / '..' / 'sub' / 'd.yaml'}\n")
    with pytest.raises(ConfigError, match=r"d.yaml -> .*e.yaml -> .*d.yaml is a cycle"):
        load_config(str(tmp_path / "sub" / "d.yaml"))
    (tmp_path / "link.yaml").symlink_to(tmp_path / "f.yaml")
    (tmp_path / "f.yaml").write_text("extends: link.yaml\n")
    with pytest.raises(ConfigError, match="is a cycle"):
        load_config(str(tmp_path / "f.yaml"))
    (tmp_path / "c.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"file not found: .*missing.yaml \(extended by .*c.yaml\)"):
        load_config(str(tmp_path / "c.yaml"))
