"""The training stage: ``finetune train``.

Reads ``<run_dir>/preprocess/`` (TFRecords, vocabulary, image size) and trains, from one
backbone, two models under one tf.distribute strategy:

1. ``baseline``: backbone frozen, new head. The backbone's features cannot change, so each
   worker computes them once for its shard and the head trains on the cached features.
2. ``candidate``: the baseline with the top of the backbone unfrozen (BatchNorm frozen),
   recompiled with a lower learning rate, trained on augmented images.

Writes under ``<run_dir>/train/`` (chief only; other workers write temporary copies and
remove them): ``config.yaml``; per phase ``model.keras``, ``history.json`` and
``result.json`` (written last: the phase is done); ``logs/`` for TensorBoard; ``backup/``
for preemption (removed when a phase ends); ``inputs.json`` (the digest of the TFRecords it
reads); and ``summary.json`` last. A restarted run with the same configuration on the same
TFRecords resumes: a finished baseline is loaded, an interrupted phase continues from its
backup. The test split is never read here.
"""

from __future__ import annotations

import json
import time
from typing import Any

import tf_keras

from components.config import Config, resolved_image_size, to_yaml
from components.core import outputs, storage
from components.core.errors import StageError
from components.preprocess.output import PreprocessOutput
from components.train import data, distribute, model, phases, precision
from components.train.phases import Inputs, Run

STAGE = "train"


def output_dir(config: Config) -> str:
    """``<run_dir>/train``."""
    return storage.join(config.run_dir, STAGE)


def read_inputs(config: Config) -> Inputs:
    """Reads ``<run_dir>/preprocess/summary.json`` and lists the train and eval shards.

    Raises:
        StageError: preprocessing has not run or failed, or its image size differs from
            ``model.image_size``.
    """
    prep = PreprocessOutput.read(config.run_dir)
    size = resolved_image_size(config)
    if prep.image_size != size:
        raise StageError(
            f"the TFRecords hold {prep.image_size} px images but model.image_size resolves to {size}; "
            f"set model.image_size={prep.image_size} or re-run `finetune preprocess`"
        )
    return Inputs(
        classes=prep.classes,
        image_size=size,
        train_files=data.record_files(prep.dir, "train"),
        eval_files=data.record_files(prep.dir, "eval") if prep.records.get("eval") else [],
        num_train=prep.records["train"],
        num_eval=prep.records.get("eval", 0),
        digest=prep.records_digest(),
        record_bytes=sum(
            int(f["bytes"])
            for name, f in (prep.shards or {}).items()
            if name.split("/")[0] in ("train", "eval")
        ),
    )


def image_cache(config: Config, inputs: Inputs, num_workers: int) -> tuple[str, float]:
    """What each worker keeps in memory of its train and eval images after the first epoch,
    within ``train.image_cache_mb``: the decoded pixels when they fit, else the encoded
    records when they fit, else nothing (``data.NO_CACHE``: the files are read every epoch,
    and memory stays flat however many images there are); and the MiB the kept (or, with no
    cache, the encoded) images take per worker."""
    budget = config.train.image_cache_mb
    decoded = data.decoded_mib(-(-(inputs.num_train + inputs.num_eval) // num_workers), inputs.image_size)
    encoded = inputs.record_bytes / num_workers / 2**20
    if decoded <= budget:
        return data.DECODED, decoded
    return (data.ENCODED if encoded <= budget else data.NO_CACHE), encoded


def _cache_line(cache: str, mib: float, budget: int) -> str:
    if cache == data.DECODED:
        return f"input: decoded images kept in memory ({mib:.0f} MiB per worker)"
    if cache == data.ENCODED:
        return (
            f"input: encoded images kept in memory ({mib:.0f} MiB per worker) and decoded every epoch "
            f"(decoded they would be over train.image_cache_mb={budget})"
        )
    return (
        f"input: TFRecords read from storage every epoch (even encoded, {mib:.0f} MiB per worker is over "
        f"train.image_cache_mb={budget})"
    )


def run(config: Config, placement: distribute.Placement | None = None) -> dict[str, Any]:
    """Trains the baseline and the candidate; returns the summary (on every worker). The
    process's Keras dtype policy is what it was before, after (``finetune run`` evaluates in
    the same process).

    Args:
        placement: The strategy to train under, as TF Model Garden's ``run_experiment``
            takes one; by default chosen from the environment (``distribute.create_strategy``).
    """
    with model.global_policy(tf_keras.mixed_precision.global_policy().name):
        return _run(config, placement)


def _run(config: Config, placement: distribute.Placement | None) -> dict[str, Any]:
    started = time.perf_counter()
    distribute.ensure_tf_config()  # a pod of the Indexed Job: TF_CONFIG from its index and the hosts
    cluster = distribute.parse_tf_config()
    inputs = read_inputs(config)
    if cluster.is_chief:
        outputs.check_owned(output_dir(config), STAGE)  # before any work: never delete a user's file
    placement = placement or distribute.create_strategy(cluster)  # before any other TensorFlow op
    chosen = precision.choose(
        config.train.mixed_precision, placement.device, config.model.backbone, precision.cpu_features()
    )
    policy = chosen.policy
    tf_keras.mixed_precision.set_global_policy(policy)
    global_batch = config.train.batch_size * placement.replicas
    cache, cache_mib = image_cache(config, inputs, cluster.num_workers)
    ctx = Run(
        config=config,
        cluster=cluster,
        placement=placement,
        inputs=inputs,
        out=output_dir(config),
        global_batch=global_batch,
        steps_per_epoch=max(1, inputs.num_train // global_batch),
        jit_compile=distribute.use_xla(config, placement.device),
        policy=policy,
        cache=cache,
    )
    if cluster.is_chief:
        _prepare_output(ctx)
    distribute.barrier(placement, cluster)
    ctx.say(
        f"{placement.name} ({cluster.describe()}, {placement.replicas} replica(s) on {placement.device}); "
        f"{inputs.num_train} train / {inputs.num_eval} eval images, {len(inputs.classes)} classes; "
        f"global batch {global_batch}, {ctx.steps_per_epoch} steps per epoch; XLA {ctx.jit_compile}"
    )
    ctx.say(f"precision: {policy} ({chosen.reason})")
    ctx.say(_cache_line(cache, cache_mib, config.train.image_cache_mb))
    tf_keras.utils.set_random_seed(config.train.seed)
    with placement.strategy.scope():
        clf = model.build_classifier(
            config.model.backbone,
            inputs.image_size,
            len(inputs.classes),
            weights=config.model.weights,
            alpha=config.model.alpha,
            dropout=config.model.dropout,
            seed=config.train.seed,
            name=config.name,
        )
    baseline = phases.baseline_phase(ctx, clf)
    candidate = phases.candidate_phase(ctx, clf)
    summary = {
        "status": "ok",
        "backbone": config.model.backbone,
        "image_size": inputs.image_size,
        "classes": inputs.classes,
        "records": {"train": inputs.num_train, "eval": inputs.num_eval},
        "inputs_sha256": inputs.digest,
        "strategy": placement.name,
        "device": placement.device,
        "workers": cluster.num_workers,
        "replicas": placement.replicas,
        "per_replica_batch_size": config.train.batch_size,
        "global_batch_size": global_batch,
        "precision_policy": policy,
        "precision_reason": chosen.reason,
        "xla": ctx.jit_compile,
        "image_cache": ctx.cache,
        "baseline": baseline,
        "candidate": candidate,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if cluster.is_chief:
        storage.delete_tree(storage.join(ctx.out, "backup"))  # both phases are done
        summary["models"] = outputs.file_facts(ctx.out, outputs.MODEL_FILES)
        storage.write_text(storage.join(ctx.out, "summary.json"), json.dumps(summary, indent=2) + "\n")
        outputs.mark_owned(ctx.out, STAGE, sealed=True)
        ctx.say(
            f"done in {summary['seconds']} s: baseline eval accuracy {_fmt(baseline['eval'])}, "
            f"candidate eval accuracy {_fmt(candidate['eval'])}; outputs in {ctx.out}"
        )
    return summary


def _fmt(metrics: dict[str, float] | None) -> str:
    return "n/a (no eval split)" if not metrics else f"{metrics['accuracy']:.4f}"


def _prepare_output(ctx: Run) -> None:
    """Chief only, before the first barrier: keeps an unfinished run of the same configuration
    on the same TFRecords (to resume it), otherwise starts ``<run_dir>/train`` afresh.

    The resume key is the configuration's text and ``inputs.json``, the digest of the shards
    it trains on (recorded by preprocessing): a baseline trained on other data is never
    loaded, whatever the configuration says.
    """
    config_path, inputs_path = storage.join(ctx.out, "config.yaml"), storage.join(ctx.out, "inputs.json")
    text = to_yaml(ctx.config)
    inputs = json.dumps({"preprocess_shards_sha256": ctx.inputs.digest}, indent=2) + "\n"
    if storage.exists(storage.join(ctx.out, "summary.json")):
        ctx.say(f"replacing the finished run in {ctx.out}")
        storage.delete_tree(ctx.out)
    elif storage.exists(config_path):
        same_config = storage.read_text(config_path) == text
        same_data = (
            ctx.inputs.digest is not None
            and storage.exists(inputs_path)
            and storage.read_text(inputs_path) == inputs
        )
        if same_config and same_data:
            ctx.say(f"resuming the unfinished run in {ctx.out}")
            return
        if not same_config:
            why = "another configuration"
        elif ctx.inputs.digest is None:
            why = "TFRecords whose digests preprocessing did not record"
        else:
            why = "other TFRecords (preprocessing ran again since)"
        ctx.say(f"the unfinished run in {ctx.out} had {why}; starting over")
        storage.delete_tree(ctx.out)
    outputs.mark_owned(ctx.out, STAGE)  # all of it is this stage's until it finishes
    storage.write_text(inputs_path, inputs)
    storage.write_text(config_path, text)
