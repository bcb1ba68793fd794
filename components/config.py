"""The one typed configuration tree.

Loaded in a fixed order: dataclass defaults -> YAML file -> ``--set key=value`` overrides.
Unknown keys and bad values raise :class:`ConfigError` before any work starts, naming the
key, what was received and the valid choices. The resolved tree is passed explicitly to
every stage and saved as ``config.yaml`` beside each stage's outputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import posixpath
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from components.backbones import BACKBONES, check_options, get_backbone
from components.core.errors import ConfigError, did_you_mean

# Beam runners we know by name; a dotted path to a runner class is passed through as well.
KNOWN_RUNNERS = (
    "DirectRunner",
    "BundleBasedDirectRunner",
    "PrismRunner",
    "DataflowRunner",
    "FlinkRunner",
    "SparkRunner",
    "PortableRunner",
)
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# Registry aliases: file names in the registry and TF Serving version labels.
ALIAS_RE = re.compile(r"^[a-z][-a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class SplitConfig:
    """Fractions used when the source has no split folders or manifest column."""

    train: float = 0.8
    eval: float = 0.1
    test: float = 0.1


@dataclass(frozen=True)
class DownloadLimitsConfig:
    """Bounds on what the archives of ``data.download`` may write (see ``components.preprocess.download``).

    Counted from the bytes actually written, never from the archives' headers:
    ``max_total_mb`` (MiB) for all archives together (a download also stops there),
    ``max_ratio`` for each archive's bytes written over its own size (an archive under 1 MiB
    counts as 1 MiB: a decompression bomb), ``max_members`` entries in all archives together.
    """

    max_total_mb: int = 10_000
    max_ratio: int = 100
    max_members: int = 100_000


@dataclass(frozen=True)
class DataConfig:
    """Where the labelled images are.

    ``source`` is a directory of class folders, a directory of split folders, or a CSV or
    JSONL manifest of ``uri,label[,split]``; a local path or a gs:// URI. ``download`` lists
    .zip / .tar / .tar.gz / .tgz archives that fill a local ``source`` directory when it is
    missing or empty (see ``components.preprocess.download``); a ``source`` that holds files is used as it
    is. Each entry is an https:// or gs:// URL or a local path, or ``{url: ..., sha256: ...}``
    with the archive's pinned digest, which http:// needs; ``download_limits`` bound what the
    archives may write. Inputs must lie inside ``source`` (for a manifest: its own folder or
    bucket prefix), after ``..`` and symlinks are resolved, or inside one of
    ``allowed_roots``; others are dead letters.
    """

    source: str = ""
    download: list[str | dict[str, str]] = field(default_factory=list)
    download_limits: DownloadLimitsConfig = field(default_factory=DownloadLimitsConfig)
    allowed_roots: list[str] = field(default_factory=list)
    split: SplitConfig = field(default_factory=SplitConfig)


@dataclass(frozen=True)
class ModelConfig:
    """The backbone, its weights and the new classification head.

    ``image_size`` 0 means the backbone's default. ``weights`` is ``imagenet`` (Keras's own
    download and cache), ``none`` (random initialisation), or the local path / gs:// URI of
    a Keras weights file for the backbone without its top. ``alpha`` is the MobileNet width.
    """

    backbone: str = "mobilenet_v2"
    image_size: int = 0
    weights: str = "imagenet"
    alpha: float = 1.0
    dropout: float = 0.2


@dataclass(frozen=True)
class PreprocessConfig:
    """The Beam + tf.Transform preprocessing stage.

    ``runner`` and ``pipeline_options`` go to Beam unchanged, so the same pipeline runs on
    Dataflow, Flink or Spark. ``image_threads`` is how many threads read and decode images
    in each Beam worker (``0``: one per CPU the worker may use, at most 8); they are
    what uses a machine's cores. ``num_workers`` sets the local runner's worker processes
    (``0``: one, in this process); remote runners ignore it. ``max_file_mb`` bounds the bytes
    read for one input (a larger file is a ``file_too_large`` dead letter, read no further);
    ``max_decoded_mb`` the memory its decoded pixels may take, from its header before any
    decoding (a ``too_large`` dead letter: a small PNG can declare a huge 16-bit canvas).
    """

    runner: str = "DirectRunner"
    pipeline_options: dict[str, Any] = field(default_factory=dict)
    num_workers: int = 0
    image_threads: int = 0
    num_shards: int = 4
    min_image_size: int = 32
    max_bad_fraction: float = 0.1
    jpeg_quality: int = 95
    max_file_mb: int = 64
    max_decoded_mb: int = 256


@dataclass(frozen=True)
class AugmentConfig:
    """Random augmentation in the fine-tuning phase (never in the cached baseline phase).

    ``rotation`` is the largest rotation as a fraction of a full turn; ``crop`` the largest
    fraction of each side cut away before resizing back (a random zoom-in). 0 turns one off.
    """

    flip: bool = True
    rotation: float = 0.05
    crop: float = 0.1


@dataclass(frozen=True)
class TrainConfig:
    """The training stage: frozen-feature baseline, then fine-tuning.

    ``batch_size`` is per replica; the global batch is it times the replicas. With
    ``scale_learning_rate`` the learning rates are multiplied by the replicas.
    ``finetune_learning_rate`` 0 means a tenth of ``baseline_learning_rate``;
    ``finetune_schedule`` ``cosine`` decays it to 0 over the planned fine-tuning steps (so the
    last epochs take small steps, which the eval loss then picks among), ``constant`` keeps it.
    ``unfreeze`` is
    empty for the backbone's default, a fraction of the backbone's layers counted from the
    top, or the name of the first layer to train. ``mixed_precision`` and ``xla`` are
    ``auto`` (on with a GPU or TPU, off on CPU), ``true`` or ``false``.
    ``early_stopping_patience`` 0 trains every epoch; N stops after N epochs without a lower
    eval loss and keeps the best weights. ``backup_every_steps`` 0 backs up for preemption at
    every epoch end, N every N steps (the last epoch's end never: ``fit`` deletes the backup as
    it returns). ``image_cache_mb`` is the memory each worker may spend keeping its decoded
    train and eval images after the first epoch (3 bytes a pixel), so later epochs decode
    nothing; when they need more, or it is 0, only the encoded records are kept and every
    epoch decodes them again.
    """

    batch_size: int = 32
    baseline_epochs: int = 5
    finetune_epochs: int = 5
    baseline_learning_rate: float = 0.001
    finetune_learning_rate: float = 0.0
    finetune_schedule: str = "cosine"
    scale_learning_rate: bool = False
    unfreeze: str = ""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    mixed_precision: str = "auto"
    xla: str = "auto"
    seed: int = 42
    early_stopping_patience: int = 0
    backup_every_steps: int = 0
    shuffle_buffer: int = 2048
    image_cache_mb: int = 1024


@dataclass(frozen=True)
class EvaluateConfig:
    """The evaluation of both models on the test split.

    ``top_k`` is the k of top-k accuracy (at most the number of classes minus one, so it
    never counts every answer right). ``bootstrap_samples`` resamples the paired test
    examples for the confidence interval; ``calibration_bins`` are the bins of the expected
    calibration error; ``misclassified_examples`` thumbnails go into the report.
    """

    top_k: int = 5
    batch_size: int = 64
    bootstrap_samples: int = 2000
    calibration_bins: int = 10
    misclassified_examples: int = 24
    seed: int = 0


@dataclass(frozen=True)
class GateConfig:
    """The rule that blesses the candidate (see ``components.evaluate.gate.decide``).

    The candidate is blessed only when its improvement over the frozen-feature baseline on
    ``metric`` is at least ``min_improvement`` (absolute; negative lets a slightly worse
    candidate through, -1 any candidate on a 0-1 metric) and the lower end of the paired
    bootstrap interval at ``confidence`` is above it too. ``min_value``, when set, is a
    floor (a ceiling for log_loss and ece) on the candidate's own value. With
    ``compare_to_production`` the production model of ``registry.uri`` must not be
    significantly better than the candidate on the same test examples.
    """

    metric: str = "accuracy"
    min_improvement: float = 0.0
    confidence: float = 0.95
    min_value: float | None = None
    compare_to_production: bool = False


@dataclass(frozen=True)
class ExportConfig:
    """The blessed candidate's SavedModel (and TFLite model).

    ``top_k`` classes (0: all) come back as ``class_ids`` and ``class_names``. ``tflite``
    is ``auto`` (MobileNet-family backbones only), ``true`` or ``false``;
    ``tflite_quantization`` is ``none`` (float32), ``dynamic`` (int8 weights) or ``float16``.
    """

    top_k: int = 5
    tflite: str = "auto"
    tflite_quantization: str = "dynamic"


@dataclass(frozen=True)
class RegistryConfig:
    """The serving registry (TF Serving layout: ``<uri>/<name>/<version>/``).

    ``uri`` is a local directory or gs:// prefix (empty: ``finetune push`` refuses, and
    ``finetune run`` stops after evaluate). ``production_alias`` is the alias the gate's
    ``compare_to_production`` reads. ``promote_to`` (empty: none) is the alias that
    ``finetune run`` moves to a newly pushed version.
    """

    uri: str = ""
    production_alias: str = "production"
    promote_to: str = ""


@dataclass(frozen=True)
class ClusterConfig:
    """How ``finetune render`` lays the run out on Kubernetes (see ``pipeline.cluster``).

    Every stage runs as a Job in ``namespace`` from ``image`` (``gpu_image``, when set, for
    every pod once ``gpus_per_worker`` is above 0). Training is an Indexed Job of
    ``workers`` pods, each with ``gpus_per_worker`` GPUs; ``cpu`` and ``memory`` are each
    stage pod's requests (memory is also its limit). ``node_selector`` places every stage
    pod; ``gpu_node_selector`` is added to the training pods when they request GPUs.
    Credentials come from the cluster, never from the image: ``workload_identity`` (a Google
    service account email, annotated on the Kubernetes service accounts) or
    ``credentials_secret`` (a Secret holding ``key.json``, mounted into every pod); with
    neither, pods use the node's identity. ``backoff_limit`` is how often a failed stage is
    retried (for training: how often the driver recreates the whole worker group, which
    resumes from its backup). ``ttl_seconds_after_finished`` removes finished Jobs;
    ``starting_deadline_seconds`` is how late a scheduled run may still start.
    ``stage_timeout_seconds`` bounds each stage Job (its ``activeDeadlineSeconds``: a pod stuck
    Pending or a hung stage fails the Job, and the run, instead of holding it and every later
    scheduled run forever); the driver Job's own deadline follows from it.
    """

    image: str = ""
    gpu_image: str = ""
    namespace: str = "finetune"
    workers: int = 1
    gpus_per_worker: int = 0
    cpu: str = "2"
    memory: str = "8Gi"
    node_selector: dict[str, str] = field(default_factory=dict)
    gpu_node_selector: dict[str, str] = field(default_factory=dict)
    workload_identity: str = ""
    credentials_secret: str = ""
    backoff_limit: int = 2
    ttl_seconds_after_finished: int = 86_400
    starting_deadline_seconds: int = 3600
    stage_timeout_seconds: int = 86_400


@dataclass(frozen=True)
class Config:
    """The whole run: every stage reads its part of this tree."""

    name: str = "model"
    run_dir: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def load_config(path: str | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Builds the validated configuration.

    Args:
        path: A YAML file (local or gs://), or None for defaults only.
        overrides: ``key=value`` strings with dotted keys; values are parsed as YAML.

    Raises:
        ConfigError: on unknown keys, wrong types or invalid values, listing all of them.
    """
    tree = dataclasses.asdict(Config())
    for layer in _read_layers(path, ()) if path else ():
        _merge(tree, layer, Config, prefix="")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set: expected key=value, got '{item}'")
        _merge(tree, _nest(key.strip(), _parse_value(raw)), Config, prefix="")
    return validate(_build(Config, tree, prefix=""))


def _read_layers(path: str, chain: tuple[str, ...]) -> list[dict[str, Any]]:
    """The mappings of ``path`` and of the files it ``extends``, the base first.

    ``extends: <file>`` (relative to the extending file, or absolute, or gs://) makes a file
    a set of changes to another: keys it sets win, the rest come from the base.
    """
    from components.core import storage

    try:
        loaded = yaml.safe_load(storage.read_text(path)) or {}
    except FileNotFoundError:
        where = f" (extended by {chain[-1]})" if chain else ""
        raise ConfigError(f"--config: file not found: {path}{where}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: {path} is not valid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config: {path} must hold a mapping, got {type(loaded).__name__}")
    base = loaded.pop("extends", None)
    if base is None:
        return [loaded]
    if not isinstance(base, str) or not base:
        raise ConfigError(f"extends: in {path} must be a file name, got {base!r}")
    base_path = base if storage.is_absolute(base) else storage.join(posixpath.dirname(path) or ".", base)
    if _canonical(base_path) in {_canonical(p) for p in (*chain, path)}:
        raise ConfigError(
            f"extends: {' -> '.join((*chain, path, base_path))} is a cycle; a file cannot extend itself "
            "or a file that extends it"
        )
    if len(chain) >= MAX_EXTENDS:
        raise ConfigError(f"extends: {' -> '.join((*chain, path))} is more than {MAX_EXTENDS} files deep")
    return [*_read_layers(base_path, (*chain, path)), loaded]


MAX_EXTENDS = 16  # files in one extends chain


def _canonical(path: str) -> str:
    """One spelling per file, for cycle detection: ``a.yaml``, ``./a.yaml`` and a symlink to it
    are the same local file; a gs:// path loses its ``.`` and ``..`` segments."""
    from components.core import storage

    if storage.is_gcs(path):
        bucket_and_path = path[len("gs://") :]
        return "gs://" + posixpath.normpath(bucket_and_path)
    return os.path.realpath(path)


def to_yaml(config: Config) -> str:
    """Serializes the configuration (the inverse of :func:`load_config`)."""
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)


def resolved_image_size(config: Config) -> int:
    """The input size in pixels: ``model.image_size`` or the backbone's default."""
    return config.model.image_size or get_backbone(config.model.backbone).default_size


def validate(config: Config) -> Config:
    """Checks every value; returns the config unchanged or raises one error listing all."""
    problems: list[str] = []
    if not _NAME_RE.fullmatch(config.name):
        problems.append(
            f"name: '{config.name}' must be 1-63 lowercase letters, digits or '-', starting "
            "and ending with a letter or digit (it names registry entries and Kubernetes Jobs)"
        )
    if not config.run_dir:
        problems.append("run_dir: required (a local directory or gs:// URI for all outputs)")
    if not config.data.source:
        problems.append("data.source: required (image folder, split folders, or CSV/JSONL manifest)")
    problems.extend(_validate_download(config.data))
    split = config.data.split
    fractions = {"train": split.train, "eval": split.eval, "test": split.test}
    for key, value in fractions.items():
        if not 0.0 <= value <= 1.0:
            problems.append(f"data.split.{key}: {value} must be between 0 and 1")
    if split.train <= 0:
        problems.append("data.split.train: must be above 0 (the label vocabulary comes from train)")
    if abs(sum(fractions.values()) - 1.0) > 1e-6:
        problems.append(f"data.split: fractions {fractions} must sum to 1")
    if config.model.backbone not in BACKBONES:
        problems.append(
            f"model.backbone: unknown backbone '{config.model.backbone}'"
            f"{did_you_mean(config.model.backbone, BACKBONES)} Valid: {', '.join(BACKBONES)}"
        )
    else:
        minimum = BACKBONES[config.model.backbone].min_size
        if config.model.image_size and config.model.image_size < minimum:
            problems.append(
                f"model.image_size: {config.model.image_size} is below the minimum of "
                f"{minimum} for {config.model.backbone}; use 0 for the backbone's default"
            )
        problems.extend(check_options(config.model.backbone, config.model.weights, config.model.alpha))
    if not 0.0 <= config.model.dropout < 1.0:
        problems.append(f"model.dropout: {config.model.dropout} must be in [0, 1)")
    problems.extend(_non_finite(config))
    if config.model.image_size > MAX_IMAGE_SIZE:
        problems.append(
            f"model.image_size: {config.model.image_size} is above {MAX_IMAGE_SIZE} px (backbones are "
            "pre-trained at 224-600); use 0 for the backbone's default"
        )
    for key, seed in (("train.seed", config.train.seed), ("evaluate.seed", config.evaluate.seed)):
        if not 0 <= seed <= MAX_SEED:
            problems.append(f"{key}: {seed} must be between 0 and {MAX_SEED} (NumPy and TensorFlow seeds)")
    problems.extend(_validate_preprocess(config.preprocess))
    problems.extend(_validate_train(config.train))
    problems.extend(_validate_evaluate(config))
    problems.extend(_validate_cluster(config.cluster))
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return config


MAX_IMAGE_SIZE = 2048
MAX_SEED = 2**32 - 1


def _non_finite(node: Any, prefix: str = "") -> list[str]:
    """Every float of the configuration tree that is NaN or infinite: such a value passes most
    range checks unnoticed (every comparison with NaN is false) and fails late or silently."""
    if dataclasses.is_dataclass(node):
        return [
            p
            for f in dataclasses.fields(node)
            for p in _non_finite(getattr(node, f.name), prefix + f.name + ".")
        ]
    if isinstance(node, float) and not math.isfinite(node):
        return [f"{prefix.rstrip('.')}: {node} must be a finite number"]
    return []


def _validate_download(d: DataConfig) -> list[str]:
    """``data.download``: archive entries (a URL, or ``{url, sha256}``), known suffixes and
    schemes, http:// only with a pinned sha256, only for a local folder; ``download_limits``."""
    problems = _out_of_range(
        "data.download_limits.",
        (
            ("max_total_mb", d.download_limits.max_total_mb, 1, 10**8),
            ("max_ratio", d.download_limits.max_ratio, 1, 10**6),
            ("max_members", d.download_limits.max_members, 1, 10**9),
        ),
    )
    if not d.download:
        return problems
    from components.preprocess.download import url_scheme
    from components.preprocess.sources import MANIFEST_SUFFIXES

    for i, entry in enumerate(d.download):
        problems.extend(_check_archive_entry(f"data.download[{i}]", entry))
    if d.source and (url_scheme(d.source) or d.source.lower().endswith(MANIFEST_SUFFIXES)):
        problems.append(
            f"data.download: only fills a local data.source folder, but data.source is '{d.source}'; "
            "put the extracted images there yourself, or set data.download to []"
        )
    return problems


DOWNLOAD_ENTRY_KEYS = ("url", "sha256")


def _check_archive_entry(key: str, entry: str | dict[str, Any]) -> list[str]:
    """One ``data.download`` entry: a URL string, or a mapping with ``url`` and ``sha256``."""
    from components.preprocess.download import (
        ARCHIVE_SUFFIXES,
        DOWNLOAD_SCHEMES,
        SHA256_RE,
        archive_suffix,
        url_scheme,
    )

    if isinstance(entry, dict):
        unknown = [str(k) for k in entry if k not in DOWNLOAD_ENTRY_KEYS]
        if unknown:
            return [
                f"{key}: unknown key '{unknown[0]}'{did_you_mean(unknown[0], DOWNLOAD_ENTRY_KEYS)} "
                f"Valid keys: {', '.join(DOWNLOAD_ENTRY_KEYS)}"
            ]
        url, digest = entry.get("url"), entry.get("sha256")
        if not isinstance(url, str) or not url:
            return [f"{key}.url: required, the archive's URL or path (got {url!r})"]
        if digest is None:
            return [f"{key}.sha256: required in a mapping (or give the URL alone, as a string)"]
        if not isinstance(digest, str) or not SHA256_RE.match(digest.lower()):
            return [f"{key}.sha256: {digest!r} must be 64 hexadecimal characters (quote it in YAML)"]
    else:
        url, digest = entry, ""
    if url_scheme(url) not in DOWNLOAD_SCHEMES:
        return [f"{key}: '{url}' must be an https://, http:// or gs:// URL, or a local path"]
    if not archive_suffix(url):
        return [f"{key}: '{url}' is not an archive; expected a name ending in {', '.join(ARCHIVE_SUFFIXES)}"]
    if url_scheme(url) == "http" and not digest:
        return [
            f"{key}: '{url}' is plain http://, which anyone on the way can change: use https://, "
            "or pin the archive as {url: ..., sha256: <its 64-hex sha256>}"
        ]
    return []


def _out_of_range(prefix: str, checks: tuple[tuple[str, float, float, float], ...]) -> list[str]:
    """One problem per ``(key, value, low, high)`` whose value is outside [low, high]."""
    return [
        f"{prefix}{key}: {value} must be between {low} and {high}"
        for key, value, low, high in checks
        if not low <= value <= high
    ]


# pipeline_options keys that hold credentials: they would be copied into every config.yaml, the
# cluster's ConfigMap and the registry's assets.extra. Known harmless keys that match are allowed.
_SECRET_KEY_RE = re.compile(r"secret|password|passwd|token|credential|private|(^|_)key($|_)|apikey", re.I)
SAFE_OPTION_KEYS = frozenset(
    {"dataflow_kms_key", "kms_key_name", "service_account_email", "impersonate_service_account"}
)


def secret_option_keys(options: dict[str, Any]) -> list[str]:
    """The ``preprocess.pipeline_options`` keys that look like credentials."""
    return sorted(k for k in options if _SECRET_KEY_RE.search(str(k)) and str(k) not in SAFE_OPTION_KEYS)


def _validate_preprocess(p: PreprocessConfig) -> list[str]:
    problems = []
    secret = secret_option_keys(p.pipeline_options)
    if secret:
        problems.append(
            f"preprocess.pipeline_options: {', '.join(secret)} look like credentials, which would be written "
            "into every config.yaml, the cluster's ConfigMap and the registry; give the workers an identity "
            "instead (Workload Identity, cluster.credentials_secret, or the runner's service account)"
        )
    if p.runner not in KNOWN_RUNNERS and "." not in p.runner:
        problems.append(
            f"preprocess.runner: unknown runner '{p.runner}'{did_you_mean(p.runner, KNOWN_RUNNERS)} "
            f"Valid: {', '.join(KNOWN_RUNNERS)}, or a dotted path to a runner class"
        )
    problems += _out_of_range(
        "preprocess.",
        (
            ("num_workers", p.num_workers, 0, 1024),
            ("image_threads", p.image_threads, 0, 256),
            ("num_shards", p.num_shards, 1, 100_000),
            ("min_image_size", p.min_image_size, 1, 100_000),
            ("jpeg_quality", p.jpeg_quality, 1, 100),
            ("max_file_mb", p.max_file_mb, 1, 100_000),
            ("max_decoded_mb", p.max_decoded_mb, 1, 100_000),
        ),
    )
    if not 0.0 <= p.max_bad_fraction <= 1.0:
        problems.append(f"preprocess.max_bad_fraction: {p.max_bad_fraction} must be between 0 and 1")
    return problems


TRI_STATE = ("auto", "true", "false")
SCHEDULES = ("cosine", "constant")


def tri_state(value: str) -> str:
    """Normalises an ``auto|true|false`` option (YAML booleans arrive as True/False)."""
    return {"on": "true", "off": "false", "yes": "true", "no": "false"}.get(value.lower(), value.lower())


def _validate_train(t: TrainConfig) -> list[str]:
    problems = _out_of_range(
        "train.",
        (
            ("batch_size", t.batch_size, 1, 65_536),
            ("baseline_epochs", t.baseline_epochs, 1, 100_000),
            ("finetune_epochs", t.finetune_epochs, 1, 100_000),
            ("early_stopping_patience", t.early_stopping_patience, 0, 100_000),
            ("backup_every_steps", t.backup_every_steps, 0, 10**9),
            ("shuffle_buffer", t.shuffle_buffer, 1, 10**8),
            ("image_cache_mb", t.image_cache_mb, 0, 10**8),
        ),
    )
    if not t.baseline_learning_rate > 0:
        problems.append(f"train.baseline_learning_rate: {t.baseline_learning_rate} must be above 0")
    if t.finetune_learning_rate < 0:
        problems.append(
            f"train.finetune_learning_rate: {t.finetune_learning_rate} must be >= 0 (0: baseline / 10)"
        )
    if t.finetune_schedule not in SCHEDULES:
        problems.append(
            f"train.finetune_schedule: '{t.finetune_schedule}' must be one of {', '.join(SCHEDULES)}"
        )
    if t.unfreeze:
        try:
            fraction = float(t.unfreeze)
        except ValueError:
            pass  # a layer name, checked against the built backbone
        else:
            if not 0.0 < fraction <= 1.0:
                problems.append(
                    f"train.unfreeze: fraction {fraction} must be in (0, 1], or give a layer name"
                )
    for key in ("mixed_precision", "xla"):
        value = tri_state(getattr(t, key))
        if value not in TRI_STATE:
            problems.append(f"train.{key}: '{getattr(t, key)}' must be one of {', '.join(TRI_STATE)}")
    augment = t.augment
    if not 0.0 <= augment.rotation <= 0.5:
        problems.append(
            f"train.augment.rotation: {augment.rotation} must be between 0 and 0.5 (of a full turn)"
        )
    if not 0.0 <= augment.crop < 1.0:
        problems.append(f"train.augment.crop: {augment.crop} must be in [0, 1)")
    return problems


TFLITE_QUANTIZATION = ("none", "dynamic", "float16")


def _validate_evaluate(config: Config) -> list[str]:
    from components.evaluate.metrics import GATE_METRICS

    e, g, x = config.evaluate, config.gate, config.export
    problems = []
    problems += _out_of_range(
        "",
        (
            ("evaluate.top_k", e.top_k, 1, 1000),
            ("evaluate.batch_size", e.batch_size, 1, 65_536),
            ("evaluate.bootstrap_samples", e.bootstrap_samples, 100, 10**6),
            ("evaluate.calibration_bins", e.calibration_bins, 1, 1000),
            ("evaluate.misclassified_examples", e.misclassified_examples, 0, 1000),
            ("export.top_k", x.top_k, 0, 100_000),
        ),
    )
    if g.metric not in GATE_METRICS:
        problems.append(
            f"gate.metric: unknown metric '{g.metric}'{did_you_mean(g.metric, GATE_METRICS)} "
            f"Valid: {', '.join(GATE_METRICS)}"
        )
    if not 0.5 <= g.confidence < 1.0:
        problems.append(f"gate.confidence: {g.confidence} must be in [0.5, 1)")
    if not -1.0 <= g.min_improvement <= 1.0 and g.metric not in ("log_loss",):
        problems.append(f"gate.min_improvement: {g.min_improvement} must be between -1 and 1")
    if g.compare_to_production and not config.registry.uri:
        problems.append(
            "gate.compare_to_production: needs registry.uri (where the production model is published)"
        )
    for key, alias in (
        ("registry.production_alias", config.registry.production_alias),
        ("registry.promote_to", config.registry.promote_to),
    ):
        if alias and not ALIAS_RE.fullmatch(alias):
            problems.append(
                f"{key}: '{alias}' must be 1-63 lowercase letters, digits, '-' or '_', starting "
                "with a letter (e.g. production, staging)"
            )
    if config.registry.promote_to and not config.registry.uri:
        problems.append("registry.promote_to: needs registry.uri (the registry that holds the alias)")
    if tri_state(x.tflite) not in TRI_STATE:
        problems.append(f"export.tflite: '{x.tflite}' must be one of {', '.join(TRI_STATE)}")
    if x.tflite_quantization not in TFLITE_QUANTIZATION:
        problems.append(
            f"export.tflite_quantization: '{x.tflite_quantization}' must be one of "
            f"{', '.join(TFLITE_QUANTIZATION)}"
        )
    return problems


# Kubernetes: resource quantities, label keys (optional DNS prefix + name) and values, Secret names.
_QUANTITY_RE = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_LABEL_KEY_RE = re.compile(rf"^([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_LABEL_NAME}$")
_LABEL_VALUE_RE = re.compile(rf"^({_LABEL_NAME})?$")
_SECRET_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_GSA_RE = re.compile(r"^[^@\s]+@[^@\s]+\.gserviceaccount\.com$")


def _validate_cluster(c: ClusterConfig) -> list[str]:
    """``cluster``: value checks only; what a cluster run needs beyond these (an image,
    gs:// paths) is checked when manifests are rendered (``pipeline.cluster.check``)."""
    problems = []
    problems += _out_of_range(
        "cluster.",
        (
            ("workers", c.workers, 1, 1000),
            ("gpus_per_worker", c.gpus_per_worker, 0, 16),
            ("backoff_limit", c.backoff_limit, 0, 100),
            ("ttl_seconds_after_finished", c.ttl_seconds_after_finished, 0, 10**8),
            ("starting_deadline_seconds", c.starting_deadline_seconds, 10, 10**7),
            ("stage_timeout_seconds", c.stage_timeout_seconds, 60, 10**7),
        ),
    )
    if not _NAME_RE.fullmatch(c.namespace):
        problems.append(
            f"cluster.namespace: '{c.namespace}' must be 1-63 lowercase letters, digits or '-', "
            "starting and ending with a letter or digit"
        )
    for key, value, example in (("cpu", c.cpu, "2 or 500m"), ("memory", c.memory, "8Gi or 512Mi")):
        if not _QUANTITY_RE.match(value):
            problems.append(f"cluster.{key}: '{value}' is not a Kubernetes quantity (e.g. {example})")
    for key in ("image", "gpu_image"):
        if any(ch.isspace() for ch in getattr(c, key)):
            problems.append(f"cluster.{key}: '{getattr(c, key)}' must not contain spaces")
    for key in ("node_selector", "gpu_node_selector"):
        problems.extend(_check_labels(f"cluster.{key}", getattr(c, key)))
    if c.workload_identity and not _GSA_RE.match(c.workload_identity):
        problems.append(
            f"cluster.workload_identity: '{c.workload_identity}' must be a Google service account "
            "email (NAME@PROJECT.iam.gserviceaccount.com)"
        )
    if c.credentials_secret and not _SECRET_RE.match(c.credentials_secret):
        problems.append(
            f"cluster.credentials_secret: '{c.credentials_secret}' is not a Kubernetes Secret name "
            "(lowercase letters, digits, '-' and '.')"
        )
    if c.workload_identity and c.credentials_secret:
        problems.append(
            "cluster: set workload_identity or credentials_secret, not both (Workload Identity "
            "needs no key; a key Secret is for clusters without it)"
        )
    return problems


def _check_labels(key: str, labels: dict[str, Any]) -> list[str]:
    """Node selector entries: label keys and string values Kubernetes accepts."""
    problems = []
    for name, value in labels.items():
        if not isinstance(name, str) or not _LABEL_KEY_RE.match(name):
            problems.append(
                f"{key}: '{name}' is not a Kubernetes label key (e.g. cloud.google.com/gke-nodepool)"
            )
        elif not isinstance(value, str):
            problems.append(f"{key}.{name}: {value!r} must be a string (quote it in YAML)")
        elif not _LABEL_VALUE_RE.match(value):
            problems.append(
                f"{key}.{name}: '{value}' is not a Kubernetes label value (up to 63 letters, digits, -_.)"
            )
    return problems


def _parse_value(raw: str) -> Any:
    if not raw.strip():
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


def _merge(tree: dict[str, Any], update: dict[str, Any], cls: type, prefix: str) -> None:
    """Merges ``update`` into ``tree``, rejecting keys the dataclass ``cls`` does not have."""
    hints = typing.get_type_hints(cls)
    for key, value in update.items():
        key = str(key)
        if key not in hints:
            raise ConfigError(
                f"unknown key '{prefix}{key}'{did_you_mean(key, hints)} "
                f"Valid keys under '{prefix or '<top>'}': {', '.join(hints)}"
            )
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{key}: expected a mapping, got {value!r}")
            _merge(tree[key], value, hint, prefix=f"{prefix}{key}.")
        elif typing.get_origin(hint) is dict and isinstance(value, dict):
            tree[key] = {**tree[key], **value}
        else:
            tree[key] = value


def _build(cls: type, tree: dict[str, Any], prefix: str) -> Any:
    """Builds the dataclass ``cls`` from a merged dict, coercing and checking each type."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, hint in hints.items():
        value = tree[key]
        name = f"{prefix}{key}"
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, prefix=f"{name}.")
        else:
            kwargs[key] = _coerce(name, value, hint)
    return cls(**kwargs)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    args = typing.get_args(hint)
    if type(None) in args:  # `float | None`: null (YAML `~` or `null`) means unset
        if value is None:
            return None
        (hint,) = [a for a in args if a is not type(None)]
    elif isinstance(hint, types.UnionType):  # `str | dict[str, str]`: the first type that fits
        for choice in args:
            with contextlib.suppress(ConfigError):
                return _coerce(name, value, choice)
        raise ConfigError(f"{name}: expected {' or '.join(a.__name__ for a in args)}, got {value!r}")
    if typing.get_origin(hint) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if typing.get_origin(hint) is list:
        return _coerce_list(name, value, hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, bool):  # YAML reads `true` as a bool: auto|true|false options
            return "true" if value else "false"
        if isinstance(value, (str, int, float)):
            return str(value)
    raise ConfigError(f"{name}: expected {hint.__name__}, got {value!r}")


def _coerce_list(name: str, value: Any, hint: Any) -> list[Any]:
    """A YAML list whose items have the element type; a lone scalar is an error, not a list."""
    if not isinstance(value, list):
        raise ConfigError(f"{name}: expected a list (YAML: [a, b] or one '- item' per line), got {value!r}")
    (item_hint,) = typing.get_args(hint)
    return [_coerce(f"{name}[{i}]", item, item_hint) for i, item in enumerate(value)]
