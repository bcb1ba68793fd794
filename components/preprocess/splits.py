"""Deterministic split assignment: a pure function of the image bytes' hash.

An image's split never depends on the order of the input, on other images or on the
worker that handled it, so re-runs and added images never move an existing image.
"""

from __future__ import annotations

import hashlib

SPLITS = ("train", "eval", "test")
_SALT = b"finetune-split-v1:"


def bucket(content_hash: str) -> float:
    """Maps a content hash to a uniform number in [0, 1), stable across runs and machines."""
    digest = hashlib.sha256(_SALT + content_hash.encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_split(
    content_hash: str,
    given: str,
    train: float,
    eval: float,
    test: float,
    source_has_eval: bool,
) -> str:
    """Returns ``train``, ``eval`` or ``test`` for one image.

    Args:
        content_hash: SHA-256 hex digest of the image bytes.
        given: The split the source assigned (folder or manifest column), or ``""``.
        train: Fraction for train when the source assigns no split.
        eval: Fraction for eval; also the share carved out of ``train`` when the source has
            splits but no eval split (``eval / (train + eval)`` of the given train images).
        test: Fraction for test when the source assigns no split.
        source_has_eval: Whether the source has its own eval split.
    """
    del test  # the remainder after train and eval
    u = bucket(content_hash)
    if not given:
        if u < train:
            return "train"
        return "eval" if u < train + eval else "test"
    if given == "train" and not source_has_eval and train + eval > 0:
        return "eval" if u < eval / (train + eval) else "train"
    return given
