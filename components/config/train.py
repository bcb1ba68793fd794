"""The ``train`` section: the frozen-feature baseline, fine-tuning and its augmentation."""

from __future__ import annotations

from dataclasses import dataclass

from components.core.configtree import TRI_STATE, option, out_of_range, tri_state

SCHEDULES = ("cosine", "constant")
MAX_SEED = 2**32 - 1  # NumPy and TensorFlow seeds


@dataclass(frozen=True)
class AugmentConfig:
    """Random augmentation in the fine-tuning phase (never in the cached baseline phase).

    ``rotation`` is the largest rotation as a fraction of a full turn; ``crop`` the largest
    fraction of each side cut away before resizing back (a random zoom-in). 0 turns one off.
    """

    flip: bool = option(True, help="candidate phase only: random horizontal flip")
    rotation: float = option(0.05, help="candidate phase only: largest rotation, as a fraction of a turn")
    crop: float = option(
        0.1, help="candidate phase only: largest fraction of each side cut away (a random zoom-in crop)"
    )


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
    top, or the name of the first layer to train. ``mixed_precision`` ``auto`` is float16
    on GPU, bfloat16 on TPU, and on CPU bfloat16 only for the backbones where it was measured
    to pay on CPUs with bfloat16 units, AMX or AVX-512 BF16 (components/train/precision.py),
    float32 otherwise; ``true`` or ``false`` force it. ``xla`` is ``auto`` (on with a GPU or
    TPU, off on CPU), ``true`` or ``false``. Whatever it trains in, the stage saves float32
    models.
    ``early_stopping_patience`` 0 trains every epoch; N stops after N epochs without a lower
    eval loss and keeps the best weights. ``backup_every_steps`` 0 backs up for preemption at
    every epoch end, N every N steps (the last epoch's end never: ``fit`` deletes the backup as
    it returns). ``image_cache_mb`` is the memory each worker may spend keeping its decoded
    train and eval images after the first epoch (3 bytes a pixel), so later epochs decode
    nothing; when they need more, the encoded records are kept if they fit (every epoch decodes
    them again); when those need more too, or it is 0, every epoch reads the TFRecords again,
    and the worker's memory no longer grows with the number of images. The baseline phase's
    features follow the same budget: in memory when they fit, else in a local file.
    """

    batch_size: int = option(32, help="per replica; the global batch is this times the replicas")
    baseline_epochs: int = option(5, help="epochs of the frozen-feature baseline phase (at least 1)")
    finetune_epochs: int = option(5, help="epochs of the fine-tuning phase (at least 1)")
    baseline_learning_rate: float = option(0.001, help="Adam, head on cached features")
    finetune_learning_rate: float = option(0.0, help="0 = a tenth of the baseline rate")
    finetune_schedule: str = option(
        "cosine",
        help="`cosine`: the fine-tuning rate decays to 0 along a half cosine over the planned steps; "
        "`constant`",
    )
    scale_learning_rate: bool = option(False, help="multiply both rates by the number of replicas")
    unfreeze: str = option(
        "",
        help='where fine-tuning starts: "" = the backbone\'s default layer, a fraction of layers from '
        "the top (`0.2`), or a layer name",
    )
    augment: AugmentConfig = option(help="candidate phase only", factory=AugmentConfig)
    mixed_precision: str = option(
        "auto",
        help="`auto` (float16 on GPU, bfloat16 on TPU; on CPU bfloat16 where the backbone gains from "
        "it on a CPU with AMX or AVX-512 BF16, else float32), `true`, `false`",
    )
    xla: str = option("auto", help="`auto` (on with GPU/TPU), `true`, `false`")
    seed: int = option(
        42,
        help="initial weights, dropout, shuffling, augmentation: one seed gives the same batches in "
        "the same order with the same augmentation in every run",
    )
    early_stopping_patience: int = option(
        0, help="0 = every epoch; N = stop after N epochs without a lower eval loss, keep the best weights"
    )
    backup_every_steps: int = option(
        0, help="preemption backups: 0 = every epoch but the last, N = every N steps"
    )
    shuffle_buffer: int = option(2048, help="records in the shuffle buffer (per worker)")
    image_cache_mb: int = option(
        1024,
        help="memory (MiB, per worker) for keeping the decoded train and eval images after the first "
        "epoch, so later epochs decode nothing; when they need more (3 bytes a pixel), the encoded "
        "records are kept if they fit and decoded every epoch; else (or at 0) the TFRecords are read "
        "again every epoch. The baseline's features (5 KB an image for MobileNetV2) stay in memory "
        "within it too, else on local disk",
    )


def check_seed(key: str, seed: int) -> list[str]:
    """A seed NumPy and TensorFlow both accept."""
    if 0 <= seed <= MAX_SEED:
        return []
    return [f"{key}: {seed} must be between 0 and {MAX_SEED} (NumPy and TensorFlow seeds)"]


def check(t: TrainConfig) -> list[str]:
    """Every problem of the ``train`` section."""
    problems = check_seed("train.seed", t.seed)
    problems += out_of_range(
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
    problems += _check_unfreeze(t.unfreeze)
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


def _check_unfreeze(unfreeze: str) -> list[str]:
    if not unfreeze:
        return []
    try:
        fraction = float(unfreeze)
    except ValueError:
        return []  # a layer name, checked against the built backbone
    if 0.0 < fraction <= 1.0:
        return []
    return [f"train.unfreeze: fraction {fraction} must be in (0, 1], or give a layer name"]
