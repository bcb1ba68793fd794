"""``finetune predict``'s arguments: the flags that are ``predict.model``, ``predict.input``
and ``predict.output`` (the stage itself is :mod:`components.predict.stage`)."""

from __future__ import annotations

import argparse
import json

PREDICT_EPILOG = """\
examples:
  finetune predict --model registry://beans@production --input new_images/ --output predictions/ \\
      --set registry.uri=registry
  finetune predict --model registry://beans/3 --input gs://bucket/uploads.csv --output gs://bucket/out \\
      --config my.yaml --set predict.format=parquet
  finetune predict --model runs/beans/export/saved_model --input new_images/ --output predictions/

outputs, under --output (replaced whole once the run has finished):
  predictions-SSSSS-of-NNNNN.jsonl   {uri, class_name, class_id, probability, top_k, model}
  dead_letter.jsonl                  {uri, stage, reason, detail} for each image not classified
  summary.json                       counts per class and reason, images/s, the model resolved
"""


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    predict = sub.add_parser(
        "predict",
        parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="classify a folder, bucket or manifest of images with a registry model (Beam RunInference)",
        description=(
            "Classify every image of --input (a folder or gs:// prefix, recursively, or a CSV/JSONL "
            "manifest) with --model, as a Beam pipeline (predict.runner: the local runner, Dataflow, "
            "Flink, Spark) using Beam's RunInference and the SavedModel's own serving_default "
            "signature, so each prediction is what TF Serving would answer. A registry alias is "
            "resolved once, at the start, and the version it named is used throughout. Images "
            "preprocessing would refuse (unreadable, not an image, too large, ...) and images the "
            "model cannot decode go to dead_letter.jsonl with their reason. No run_dir or "
            "data.source is needed."
        ),
        epilog=PREDICT_EPILOG,
    )
    predict.add_argument(
        "--model",
        metavar="REF",
        help="registry://NAME@ALIAS, registry://NAME/VERSION (in registry.uri), or a SavedModel "
        "folder or gs:// URI (predict.model)",
    )
    predict.add_argument(
        "--input", metavar="SOURCE", help="folder, gs:// prefix or .csv/.jsonl manifest (predict.input)"
    )
    predict.add_argument("--output", metavar="URI", help="output folder or gs:// prefix (predict.output)")


def overrides(args: argparse.Namespace) -> list[str]:
    """The command's flags as ``--set`` overrides, after the user's own (the flags win)."""
    flags = (("model", args.model), ("input", args.input), ("output", args.output))
    return [*args.overrides, *(f"predict.{key}={json.dumps(value)}" for key, value in flags if value)]
