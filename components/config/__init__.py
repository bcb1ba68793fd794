"""The one typed configuration tree: the root :class:`Config`, composed of one section per module.

Loaded in a fixed order: dataclass defaults -> YAML file -> ``--set key=value`` overrides
(:mod:`components.core.configtree`, which knows no section). Unknown keys and bad values raise
:class:`ConfigError` before any work starts, naming the key, what was received and the valid
choices; :func:`validate` runs every section's checks and reports every problem at once. The
resolved tree is passed explicitly to every stage and saved as ``config.yaml`` beside each
stage's outputs. Each field documents itself; ``finetune config --reference`` prints them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from components.backbones import get_backbone
from components.config import cluster, data, evaluate, model, predict, preprocess, registry, train
from components.config.cluster import ClusterConfig
from components.config.data import DataConfig, DownloadLimitsConfig, SplitConfig
from components.config.evaluate import EvaluateConfig, ExportConfig, GateConfig
from components.config.model import ModelConfig
from components.config.predict import ModelRef, PredictConfig, parse_model_ref
from components.config.preprocess import KNOWN_RUNNERS, PreprocessConfig, secret_option_keys
from components.config.registry import ALIAS_RE, NAME_RE, RegistryConfig
from components.config.train import AugmentConfig, TrainConfig
from components.core import configtree
from components.core.configtree import MAX_EXTENDS, TRI_STATE, option, tri_state
from components.core.errors import ConfigError

__all__ = [
    "ALIAS_RE",
    "KNOWN_RUNNERS",
    "MAX_EXTENDS",
    "NAME_RE",
    "TRI_STATE",
    "AugmentConfig",
    "ClusterConfig",
    "Config",
    "DataConfig",
    "DownloadLimitsConfig",
    "EvaluateConfig",
    "ExportConfig",
    "GateConfig",
    "ModelConfig",
    "ModelRef",
    "PredictConfig",
    "PreprocessConfig",
    "RegistryConfig",
    "SplitConfig",
    "TrainConfig",
    "load_config",
    "parse_model_ref",
    "reference",
    "resolved_image_size",
    "secret_option_keys",
    "to_yaml",
    "tri_state",
    "validate",
]


@dataclass(frozen=True)
class Config:
    """The whole run: every stage reads its part of this tree."""

    name: str = option(
        "model", help="model name (lowercase letters, digits, `-`); names registry entries and Jobs"
    )
    run_dir: str = option("", help="required: local directory or gs:// URI for every stage's outputs")
    data: DataConfig = option(help="where the labelled images are", factory=DataConfig)
    model: ModelConfig = option(help="the backbone and the new head", factory=ModelConfig)
    preprocess: PreprocessConfig = option(help="the Beam + tf.Transform stage", factory=PreprocessConfig)
    train: TrainConfig = option(help="baseline and fine-tuning", factory=TrainConfig)
    evaluate: EvaluateConfig = option(help="both models on the test split", factory=EvaluateConfig)
    gate: GateConfig = option(help="the rule that blesses the candidate", factory=GateConfig)
    export: ExportConfig = option(help="the blessed candidate's SavedModel", factory=ExportConfig)
    registry: RegistryConfig = option(help="the serving registry", factory=RegistryConfig)
    cluster: ClusterConfig = option(help="the run on Kubernetes", factory=ClusterConfig)
    predict: PredictConfig = option(
        help="batch prediction with a registry model (`finetune predict`)", factory=PredictConfig
    )


def load_config(path: str | None = None, overrides: Sequence[str] = (), training: bool = True) -> Config:
    """Builds the validated configuration.

    Args:
        path: A YAML file (local or gs://), or None for defaults only.
        overrides: ``key=value`` strings with dotted keys; values are parsed as YAML.
        training: Whether ``run_dir`` and ``data.source`` are required: every command but
            ``finetune predict``, which reads ``predict.input`` and writes ``predict.output``.

    Raises:
        ConfigError: on unknown keys, wrong types or invalid values, listing all of them.
    """
    return validate(configtree.load_tree(Config, path, overrides), training)


def validate(config: Config, training: bool = True) -> Config:
    """Checks every value; returns the config unchanged or raises one error listing all."""
    problems = registry.check_name(config.name)
    if training and not config.run_dir:
        problems.append("run_dir: required (a local directory or gs:// URI for all outputs)")
    problems += data.check(config.data, needs_source=training)
    problems += model.check(config.model)
    problems += configtree.non_finite(config)
    problems += preprocess.check(config.preprocess)
    problems += train.check(config.train)
    problems += evaluate.check_evaluate(config.evaluate)
    problems += evaluate.check_gate(config.gate, registry_uri=config.registry.uri)
    problems += evaluate.check_export(config.export)
    problems += registry.check(config.registry)
    problems += cluster.check(config.cluster)
    problems += predict.check(config.predict, registry_uri=config.registry.uri)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return config


def to_yaml(config: Config) -> str:
    """Serializes the configuration (the inverse of :func:`load_config`)."""
    return configtree.to_yaml(config)


def resolved_image_size(config: Config) -> int:
    """The input size in pixels: ``model.image_size`` or the backbone's default."""
    return config.model.image_size or get_backbone(config.model.backbone).default_size


def reference() -> str:
    """The Markdown reference of every key (``finetune config --reference``, docs/configuration.md)."""
    return configtree.reference(
        Config,
        title="Configuration reference",
        intro=(
            "Generated by `finetune config --reference` from the fields of `components/config/`; "
            "do not edit by hand. Keys are set in a YAML file (`--config`) or with `--set key=value`."
        ),
    )
