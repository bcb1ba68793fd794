"""The ``predict`` section: batch prediction with a registry model (``finetune predict``)."""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from typing import Any

from components.config.preprocess import runner_problems
from components.config.registry import ALIAS_RE, ALIAS_RULE, NAME_RE, NAME_RULE
from components.core.configtree import option, out_of_range
from components.core.errors import did_you_mean

REGISTRY_SCHEME = "registry://"
OUTPUT_FORMATS = ("jsonl", "parquet")
# registry://NAME@ALIAS or registry://NAME/VERSION
_REF_RE = re.compile(r"^registry://(?P<name>[^@/]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))$")


# Placeholders predict.output may hold, filled in at the start of each run (UTC): a scheduled
# run then writes next to, not over, the last one's predictions.
OUTPUT_PLACEHOLDERS = {"date": "%Y-%m-%d", "time": "%Y%m%dT%H%M%SZ"}
_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")


def expand_output(template: str, now: datetime.datetime) -> str:
    """``predict.output`` with ``{date}`` (``2026-12-06``) and ``{time}``
    (``20261206T020000Z``) filled in from ``now`` (UTC)."""
    utc = now.astimezone(datetime.UTC)
    return _PLACEHOLDER_RE.sub(lambda m: utc.strftime(OUTPUT_PLACEHOLDERS[m[1]]), template)


@dataclass(frozen=True)
class ModelRef:
    """A parsed ``predict.model``: a registry entry (``name`` with ``alias`` or ``version``)
    or the ``uri`` of an exported SavedModel."""

    name: str = ""
    alias: str = ""
    version: int = 0
    uri: str = ""

    @property
    def in_registry(self) -> bool:
        return bool(self.name)


def parse_model_ref(text: str) -> ModelRef:
    """``registry://NAME@ALIAS``, ``registry://NAME/VERSION`` or a SavedModel path/URI.

    Raises:
        ValueError: a ``registry://`` reference that is neither form, or whose name, alias
            or version breaks the registry's rules; the message says which.
    """
    if not text.startswith(REGISTRY_SCHEME):
        return ModelRef(uri=text.rstrip("/") if text not in ("/", "gs://") else text)
    match = _REF_RE.fullmatch(text)
    if not match:
        raise ValueError(
            f"'{text}' is not a registry reference; write registry://NAME@ALIAS (e.g. "
            "registry://beans@production) or registry://NAME/VERSION (e.g. registry://beans/3)"
        )
    name, alias, version = match["name"], match["alias"] or "", match["version"] or ""
    if not NAME_RE.fullmatch(name):
        raise ValueError(f"'{text}': the model name '{name}' must be {NAME_RULE}")
    if alias and not ALIAS_RE.fullmatch(alias):
        raise ValueError(f"'{text}': the alias '{alias}' must be {ALIAS_RULE}")
    if version and not (version.isdigit() and int(version) > 0):
        raise ValueError(f"'{text}': the version '{version}' must be a positive integer")
    return ModelRef(name=name, alias=alias, version=int(version or 0))


@dataclass(frozen=True)
class PredictConfig:
    """Batch prediction (``finetune predict``): a Beam pipeline with Beam's ``RunInference``.

    ``model``, ``input`` and ``output`` are also the command's ``--model``, ``--input`` and
    ``--output``. A registry reference is resolved in ``registry.uri`` once, at the start, and
    the version it named is used throughout (a promotion during the run changes nothing).
    The inputs follow preprocessing's rules: ``data.allowed_roots`` for a manifest's rows,
    and ``preprocess.max_file_mb``, ``max_decoded_mb`` and ``min_image_size`` for each image.
    ``runner``, ``pipeline_options`` and ``num_workers`` work as in ``preprocess``.
    """

    model: str = option(
        "",
        help="required: `registry://NAME@ALIAS`, `registry://NAME/VERSION` (in `registry.uri`), or an "
        "exported SavedModel folder or gs:// URI",
    )
    input: str = option(
        "", help="required: a folder or gs:// prefix of images (recursively), or a .csv/.jsonl manifest"
    )
    output: str = option(
        "",
        help="required: folder or gs:// prefix for the predictions, dead_letter.jsonl and summary.json "
        "(replaced whole, once the run has finished); `{date}` and `{time}` are filled in at the start "
        "(UTC), e.g. gs://bucket/predictions/{date} for a nightly schedule",
    )
    format: str = option("jsonl", help="`jsonl` or `parquet` (pyarrow) prediction files")
    runner: str = option("DirectRunner", help="any Beam runner, as `preprocess.runner`")
    pipeline_options: dict[str, Any] = option(
        help="passed to Beam unchanged, as `preprocess.pipeline_options`", factory=dict
    )
    num_workers: int = option(
        0,
        help="local runner worker processes; 0 = one, in this process (on one machine the fastest: "
        "each process loads TensorFlow and the model, docs/performance.md)",
    )
    batch_size: int = option(64, help="images per model call (RunInference batches up to this many)")
    image_threads: int = option(
        0, help="threads reading and checking images in each Beam worker; 0 = one per CPU, at most 8"
    )
    model_threads: int = option(
        0, help="TensorFlow threads per model call in each worker; 0 = TensorFlow's default (every core)"
    )
    num_shards: int = option(0, help="prediction files; 0 = the runner decides")
    max_bad_fraction: float = option(
        0.1,
        help="exit 1 (the outputs are still published) when more of the inputs than this are dead "
        "letters; 1 = never",
    )


def check(p: PredictConfig, registry_uri: str) -> list[str]:
    """Every problem of the ``predict`` section (empty ``model``/``input``/``output`` are the
    command's to refuse: other commands never read them)."""
    problems = []
    if p.model:
        try:
            ref = parse_model_ref(p.model)
        except ValueError as e:
            problems.append(f"predict.model: {e}")
        else:
            if ref.in_registry and not registry_uri:
                problems.append(
                    f"predict.model: {p.model} needs registry.uri (the registry that holds '{ref.name}'); "
                    "set it, e.g. --set registry.uri=gs://bucket/registry"
                )
    unknown = sorted(set(_PLACEHOLDER_RE.findall(p.output)) - set(OUTPUT_PLACEHOLDERS))
    if unknown:
        problems.append(
            f"predict.output: unknown placeholder {', '.join('{' + u + '}' for u in unknown)} in "
            f"'{p.output}'; valid: {{date}} (2026-12-06), {{time}} (20261206T020000Z)"
        )
    if p.format not in OUTPUT_FORMATS:
        problems.append(
            f"predict.format: '{p.format}'{did_you_mean(p.format, OUTPUT_FORMATS)} "
            f"Valid: {', '.join(OUTPUT_FORMATS)}"
        )
    problems += runner_problems("predict", p.runner, p.pipeline_options)
    problems += out_of_range(
        "predict.",
        (
            ("num_workers", p.num_workers, 0, 1024),
            ("batch_size", p.batch_size, 1, 65_536),
            ("image_threads", p.image_threads, 0, 256),
            ("model_threads", p.model_threads, 0, 1024),
            ("num_shards", p.num_shards, 0, 100_000),
        ),
    )
    if not 0.0 <= p.max_bad_fraction <= 1.0:
        problems.append(f"predict.max_bad_fraction: {p.max_bad_fraction} must be between 0 and 1")
    return problems


def missing(p: PredictConfig) -> list[str]:
    """What ``finetune predict`` needs and was not given."""
    flags = (("model", p.model, "--model"), ("input", p.input, "--input"), ("output", p.output, "--output"))
    return [
        f"predict.{key}: required ({flag} or --set predict.{key}=...)"
        for key, value, flag in flags
        if not value
    ]
