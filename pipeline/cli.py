"""The ``finetune`` command line.

Every stage command takes ``--config FILE`` and any number of ``--set key=value``
overrides; the configuration is loaded and validated before any work starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from components.core.errors import ConfigError, FinetuneError
from pipeline import quiet

if TYPE_CHECKING:
    from components.config import Config

EPILOG = """\
examples:
  finetune preprocess --config configs/beans.yaml
  finetune preprocess --config my.yaml --set data.source=gs://bucket/images --set model.image_size=128
  finetune train --config configs/beans.yaml --set train.finetune_epochs=3
  finetune evaluate --config configs/beans.yaml --set gate.min_improvement=0.02
  finetune push --config configs/beans.yaml --set registry.uri=registry
  finetune run --config configs/beans.yaml   # all stages; unchanged ones are skipped
  finetune predict --model registry://beans@production --input gs://bucket/uploads/ \\
      --output gs://bucket/predictions/today --set registry.uri=gs://bucket/registry
  finetune registry list --registry registry
  finetune render --config configs/beans-cluster.yaml            # Kubernetes manifests (dry run)
  finetune submit --config configs/beans-cluster.yaml --wait     # the run on Kubernetes
  finetune status beans                                          # its Jobs; `finetune logs beans -f`
  finetune schedule --config configs/beans-cluster.yaml --cron '0 2 * * *'   # nightly, new data only
  finetune submit --predict --config my-cluster.yaml --model registry://beans@production \\
      --input gs://bucket/uploads --output 'gs://bucket/predictions/{date}'     # predict as a Job
  finetune config --config my.yaml          # print the resolved configuration

Configuration is read in this order: built-in defaults, the YAML file, then --set overrides.
A config with only data.source and run_dir works; `finetune config` shows every key.
"""


def _config_args() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--config", metavar="FILE", help="YAML configuration file (local or gs://)")
    parent.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        dest="overrides",
        help="override one key, e.g. --set model.image_size=128 (repeatable; values are YAML)",
    )
    parent.add_argument("-v", "--verbose", action="store_true", help="show Beam and TensorFlow logs")
    return parent


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and documentation)."""
    parser = argparse.ArgumentParser(
        prog="finetune",
        description=(
            "Transfer learning for image classification at scale: preprocess labelled images "
            "with Apache Beam + tf.Transform into TFRecords, then train a frozen-feature "
            "baseline and a fine-tuned candidate under tf.distribute, evaluate both on the test "
            "split, export the candidate only when the gate blesses it, and push it to a versioned "
            "serving registry (TF Serving layout) whose aliases move by compare-and-swap."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _config_args()
    sub.add_parser(
        "preprocess",
        parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="images -> validated, deduplicated, split TFRecords + transform graph",
        description=(
            "Read labelled images (class folders, split folders or a CSV/JSONL manifest; local "
            "or gs://), decode and validate them (bad ones go to dead_letter.jsonl with a "
            "reason), drop duplicates, assign splits deterministically, compute the label "
            "vocabulary and image statistics with tf.Transform, and write sharded TFRecords, "
            "the transform graph and summary.json under <run_dir>/preprocess/."
        ),
    )
    sub.add_parser(
        "train",
        parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="TFRecords -> frozen-feature baseline + fine-tuned candidate (tf.distribute)",
        description=(
            "Train two models from one backbone on <run_dir>/preprocess/: the baseline (backbone "
            "frozen, new head trained on features computed once) and the candidate (top of the "
            "backbone unfrozen, BatchNorm frozen, lower learning rate, augmentation). The "
            "strategy comes from the environment: TPU, MultiWorkerMirroredStrategy when TF_CONFIG "
            "names several workers, MirroredStrategy on several GPUs, else one device. Outputs "
            "(models, histories, TensorBoard logs, summary.json) go to <run_dir>/train/; a "
            "restarted run resumes from its backup."
        ),
    )
    sub.add_parser(
        "evaluate",
        parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="test split -> gate verdict; SavedModel (+ TFLite) export only when blessed; report.html",
        description=(
            "Score the baseline and the candidate of <run_dir>/train/ on the test split (which "
            "no earlier stage read): accuracy, top-k, per-class precision/recall/F1, macro F1, "
            "log loss, calibration error, confusion matrix. The gate blesses the candidate only "
            "when it beats the baseline on gate.metric by gate.min_improvement and the paired "
            "bootstrap interval's lower end is above that margin too (and, with "
            "gate.compare_to_production, the production model is not better). Writes "
            "<run_dir>/evaluate/verdict.json and a BLESSED or NOT_BLESSED marker, the export "
            "under <run_dir>/export/ only when blessed, and <run_dir>/report.html. A candidate "
            "that loses exits 0 with the reason; a missing model or empty test split exits 1."
        ),
    )
    sub.add_parser(
        "push",
        parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="blessed export -> the registry's next version (atomic, infra-validated)",
        description=(
            "Publish <run_dir>/export/saved_model as the next integer version of <name> in "
            "registry.uri (TF Serving's layout). The staged copy gets TF Serving warm-up requests "
            "and is loaded and queried once before it becomes visible; a local registry renames "
            "it into place, a gs:// one uploads saved_model.pb last, then a commit record is "
            "written. Racing pushes get distinct versions. A candidate that was not blessed, or "
            "an export already published (same fingerprint), pushes nothing and exits 0. With "
            "registry.promote_to the alias is moved to the new version."
        ),
    )
    run_parser = sub.add_parser(
        "run",
        parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="the whole pipeline: preprocess, train, evaluate (gate + export), push",
        description=(
            "Run every stage in order and record each stage's status, time and outputs in "
            "<run_dir>/run.json. A stage whose inputs did not change (a content fingerprint of "
            "the input images and of the configuration it depends on) is skipped; a failed "
            "stage stops the run, keeps the earlier outputs, and the next run resumes there. "
            "Push runs when registry.uri is set; with registry.promote_to the new version is "
            "also moved to that alias."
        ),
    )
    run_parser.add_argument("--force", action="store_true", help="re-run every stage, changed or not")
    from pipeline import predict_cli

    predict_cli.add_parser(sub, common)
    from pipeline import registry_cli

    registry_cli.add_parser(sub)
    _add_render(sub, common)
    from pipeline import cluster_cli

    cluster_cli.add_parsers(sub, common)
    config_parser = sub.add_parser(
        "config",
        parents=[common],
        help="print the resolved configuration (defaults + file + overrides) as YAML",
        description="Load, validate and print the configuration without running anything.",
    )
    config_parser.add_argument(
        "--reference",
        action="store_true",
        help="print the Markdown reference of every key (type, default, meaning) instead",
    )
    return parser


RENDER_EPILOG = """\
examples:
  finetune render --config configs/beans-cluster.yaml | kubectl apply --dry-run=server -f -
  finetune render --config my.yaml --set cluster.workers=4 --set cluster.gpus_per_worker=1
  finetune render --config my.yaml --out manifests/ && kubectl apply -k manifests/
  finetune render --config my.yaml --schedule '0 2 * * *'   # also the nightly CronJob
  finetune render --config configs/beans-cluster.yaml --schedule '0 2 * * *' --kustomize k8s
  finetune render --predict --config my.yaml --model registry://beans@production \
      --input gs://BUCKET/uploads/ --output gs://BUCKET/predictions/today   # a predict Job
"""


def _add_render(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from pipeline import cluster_cli

    render = sub.add_parser(
        "render",
        parents=[common, cluster_cli.predict_flags()],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="print or write the Kubernetes manifests of a run (a dry run; no cluster needed)",
        description=(
            "Render every Kubernetes manifest of a run from the configuration: the ConfigMap "
            "holding it, the driver's and the stages' service accounts and the driver's Role, the "
            "headless Service and Indexed Job of the training workers (cluster.workers pods), the "
            "preprocess and evaluate + push Jobs, and the driver Job that runs them in order. "
            "Prints one multi-document YAML stream; --out writes one file per part and a "
            "kustomization.yaml; --kustomize writes base/ and overlays/cpu, overlays/gpu (the "
            "configuration with cluster.gpus_per_worker 0, and at least 1). run_dir, data.source "
            "and registry.uri must be gs:// URIs and cluster.image must be set. With --predict: a "
            "predict Job's manifests instead (the stages' service account, the Job <name>-predict "
            "and its ConfigMap, with --schedule the CronJob <name>-predict-schedule and its own); "
            "predict.model, input and output must be on gs://, run_dir and data.source are not "
            "needed; --out works, --kustomize does not."
        ),
        epilog=RENDER_EPILOG,
    )
    where = render.add_mutually_exclusive_group()
    where.add_argument("--out", metavar="DIR", help="write the files and a kustomization.yaml into DIR")
    where.add_argument(
        "--kustomize", metavar="DIR", help="write a kustomize base and CPU/GPU overlays into DIR"
    )
    render.add_argument(
        "--schedule",
        metavar="CRON",
        help="also the CronJob that starts a run on this schedule, in UTC (e.g. '0 2 * * *')",
    )


def _render(config: Config, args: argparse.Namespace) -> int:
    from pipeline.cluster import render

    if args.predict and args.kustomize:
        raise ConfigError(
            "--kustomize writes the run's base and CPU/GPU overlays (k8s/), not a predict Job; "
            "with --predict use --out DIR (then `kubectl apply -k DIR`) or no flag (YAML to stdout)"
        )
    if args.out:
        for path in render.write_files(config, args.out, args.schedule, args.predict):
            print(f"wrote {path}")
        return 0
    if args.kustomize:
        for path in render.write_kustomize(config, args.kustomize, args.schedule):
            print(f"wrote {path}")
        return 0
    sys.stdout.write(render.render_text(config, args.schedule, args.predict))
    return 0


def _setup_logging(verbose: bool) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "2")
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("apache_beam", "tensorflow", "absl", "tensorflow_transform"):
        logging.getLogger(noisy).setLevel(level)
    for name in ("absl", ""):  # "": the root logger, where Beam's RunInference warns
        logger = logging.getLogger(name)
        if verbose:
            logger.removeFilter(not_instance_dicts_notice)
        else:
            logger.addFilter(not_instance_dicts_notice)


# tf.Transform's notice, at WARNING, each time AnalyzeDataset is given instance dicts (which
# cost per row): preprocessing hands it 7 numbers per image (the label and pixel statistics),
# not the images, and the notice asks nothing of a user. Shown with -v.
TFT_INSTANCE_DICTS = "You are passing instance dicts and DatasetMetadata to TFT"
# Beam's RunInference, at each model load: its `resource` import sits in one try block with a
# module that imports torch, so without torch it says memory cannot be fetched (on Linux,
# where it can). Not the user's to act on; shown with -v.
BEAM_NO_RESOURCE = "Resource module is not available for current platform"
NOTICES = (TFT_INSTANCE_DICTS, BEAM_NO_RESOURCE)


def not_instance_dicts_notice(record: logging.LogRecord) -> bool:
    """The ``absl`` and root loggers' filter without -v: False for the :data:`NOTICES`."""
    return not record.getMessage().startswith(NOTICES)


# The commands that import TensorFlow in this process (the stages, and `run` for them); they
# import it up front, after the configuration is valid (a `run` whose stages are all skipped
# pays the ~3 s too).
TENSORFLOW_COMMANDS = frozenset({"run", "preprocess", "train", "evaluate", "push", "predict"})


# Commands that train or preprocess in this process. TensorFlow turns on oneDNN's CPU kernels
# by default only on CPUs with AVX-512 VNNI/BF16 or AMX; on AVX2 machines (most laptops and
# cloud VMs, AMD EPYC) it leaves them off, and fine-tuning MobileNetV2 runs at half the speed
# (docs/performance.md, bench_cpu_kernels.py). Evaluate and push keep TensorFlow's default,
# what TF Serving runs with, so their latency figures and push's warm-up match serving (oneDNN
# makes one-image calls slower). TensorFlow reads the variable once, when first imported.
TRAINING_COMMANDS = frozenset({"run", "preprocess", "train"})


def tensorflow_options(command: str, environ: dict[str, str] | None = None) -> None:
    """Sets the process-wide TensorFlow options ``command`` runs with, before TensorFlow is
    imported; a value already in the environment (``TF_ENABLE_ONEDNN_OPTS=0``) wins."""
    environ = os.environ if environ is None else environ
    if command in TRAINING_COMMANDS:
        environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``finetune`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    tensorflow_options(args.command)
    _setup_logging(args.verbose)
    try:
        if args.command == "registry":
            from pipeline import registry_cli

            return registry_cli.main(args)
        from pipeline import cluster_cli

        if args.command in cluster_cli.BY_NAME:
            return cluster_cli.by_name(args)
        from components.config import load_config, reference, to_yaml

        if args.command == "config" and args.reference:
            sys.stdout.write(reference())
            return 0
        if args.command == "predict" or cluster_cli.predicts(args):  # also render|submit|schedule --predict
            from pipeline import predict_cli

            config = load_config(args.config, predict_cli.overrides(args), training=False)
        else:
            config = load_config(args.config, args.overrides)
        if args.command == "config":
            sys.stdout.write(to_yaml(config))
            return 0
        if args.command == "render":
            return _render(config, args)
        if args.command in cluster_cli.WITH_CONFIG:
            return cluster_cli.with_config(config, args)
        if args.command in TENSORFLOW_COMMANDS and quiet.quiet_startup():
            quiet.import_tensorflow_quietly()
        if args.command == "predict":
            from components.predict import stage as predict_stage

            predict_stage.run(config)
            return 0
        if args.command == "run":
            from pipeline import run as pipeline_run

            pipeline_run.run(config, force=args.force)
            return 0
        import importlib

        from pipeline.orchestrator import stage  # the one table of stage name -> module

        importlib.import_module(stage(args.command).module).run(config)
        return 0
    except ConfigError as e:
        print(f"finetune: error: {e}", file=sys.stderr)
        return 2
    except FinetuneError as e:
        print(f"finetune {args.command}: failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.command not in ("submit", "logs"):  # following a log: Ctrl-C is how one stops
            raise
        print(f"finetune {args.command}: stopped following (the run goes on in the cluster)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
