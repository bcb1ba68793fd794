"""The baseline phase's cached features: the frozen backbone's pooled features of a worker's
images, computed once and read every epoch by the head.

They take 4 bytes a feature (MobileNetV2's 1,280: 5 KB an image). When a worker's features fit
``train.image_cache_mb`` they stay in memory and the head's epochs shuffle all of them; beyond
it they go to a file on the worker's local disk, read every epoch through a shuffle buffer of
``train.shuffle_buffer`` features, so the worker's memory does not grow with the data (only
the labels stay in memory: 8 bytes an image). Runs on every worker.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from components.train import data

MEMORY, DISK = "memory", "disk"


def feature_mib(num_images: int, width: int) -> float:
    """MiB that ``num_images`` features of ``width`` floats take."""
    return num_images * width * 4 / 2**20


def placement(num_images: int, width: int, budget_mib: int) -> tuple[bool, str]:
    """Whether a worker's ``num_images`` features go to local disk (over ``budget_mib``,
    ``train.image_cache_mb``), and words for the log."""
    mib = feature_mib(num_images, width)
    if mib > budget_mib:
        return True, f"on local disk: {mib:.0f} MiB per worker is over train.image_cache_mb={budget_mib}"
    return False, f"in memory: {mib:.0f} MiB per worker"


class Features:
    """One worker's features and labels, in memory or in a local file (see the module).

    Build with :meth:`extract`; :meth:`close` removes the file.
    """

    def __init__(
        self, where: str, width: int, labels: np.ndarray, array: np.ndarray | None, folder: str | None
    ):
        self.where, self.width, self.labels = where, width, labels
        self._array, self._folder = array, folder

    @classmethod
    def extract(
        cls,
        extract: Callable[[Any], np.ndarray],
        batches: Iterable[tuple[Any, Any]],
        width: int,
        folder: str | None = None,
    ) -> Features:
        """``extract`` over every ``(images, labels)`` batch: kept in memory, or written to
        ``folder`` (local, made by the caller, removed by :meth:`close`) when it is given."""
        parts, labels = [], []
        with open(_path(folder), "wb") if folder else contextlib.nullcontext() as handle:
            for images, batch_labels in batches:
                features = np.ascontiguousarray(extract(images), dtype=np.float32)
                if handle is None:
                    parts.append(features)
                else:
                    handle.write(features.tobytes())
                labels.append(np.asarray(batch_labels))
        label_array = np.concatenate(labels) if labels else np.zeros([0], np.int64)
        if folder:
            return cls(DISK, width, label_array, None, folder)
        array = np.concatenate(parts) if parts else np.zeros([0, width], np.float32)
        return cls(MEMORY, width, label_array, array, None)

    def __len__(self) -> int:
        return len(self.labels)

    def dataset(
        self,
        batch_size: int,
        *,
        training: bool,
        repeat: bool,
        seed: int = 0,
        shuffle_buffer: int = 2048,
        part: tuple[int, int] = (0, 1),
    ) -> tf.data.Dataset:
        """Batches of ``(features, labels)`` for the head: the ``index``-th of every ``count``
        (``part``), shuffled when training (all of them in memory; through ``shuffle_buffer``
        from disk), repeated and batched."""
        index, count = part
        if self.where == MEMORY:
            pick = slice(index, None, count)
            return data.feature_dataset(
                self._array[pick], self.labels[pick], batch_size, training=training, repeat=repeat, seed=seed
            )
        width = self.width
        features = tf.data.FixedLengthRecordDataset(_path(self._folder), record_bytes=4 * width).map(
            lambda raw: tf.reshape(tf.io.decode_raw(raw, tf.float32), [width]),
            num_parallel_calls=data.AUTOTUNE,
        )
        dataset = tf.data.Dataset.zip((features, tf.data.Dataset.from_tensor_slices(self.labels)))
        # Known, as in memory: Keras's validation needs the size with steps_per_execution > 1.
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(len(self.labels)))
        if count > 1:
            dataset = dataset.shard(count, index)
        if training:
            dataset = dataset.shuffle(shuffle_buffer, seed=seed)
        if repeat:
            dataset = dataset.repeat()
        return data.unsharded(dataset.batch(batch_size, drop_remainder=training).prefetch(data.AUTOTUNE))

    def batches(self, size: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every ``(features, labels)``, in order, ``size`` at a time (the exact evaluation)."""
        if self.where == MEMORY:
            for start in range(0, len(self), size):
                yield self._array[start : start + size], self.labels[start : start + size]
            return
        with open(_path(self._folder), "rb") as f:
            for start in range(0, len(self), size):
                n = min(size, len(self) - start)
                block = np.frombuffer(f.read(4 * self.width * n), np.float32).reshape(n, self.width)
                yield block, self.labels[start : start + n]

    def close(self) -> None:
        if self._folder:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
        self._array = None


def _path(folder: str) -> str:
    return f"{folder}/features.f32"
