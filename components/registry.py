"""The serving registry's layout (TensorFlow Serving's, so a server can watch it directly).

::

    <registry.uri>/<name>/<version>/saved_model.pb ...   integer versions, one SavedModel each
    <registry.uri>/<name>/aliases/<alias>.json           {"version": N, ...}: production, staging, ...

This module reads the layout; publishing and moving aliases belong to the push stage.
"""

from __future__ import annotations

import json

from pipeline import storage
from pipeline.errors import StageError


def model_uri(registry: str, name: str) -> str:
    """``<registry>/<name>``: every version of one model."""
    return storage.join(registry, name)


def version_uri(registry: str, name: str, version: int) -> str:
    """``<registry>/<name>/<version>``: one published SavedModel."""
    return storage.join(registry, name, str(int(version)))


def alias_uri(registry: str, name: str, alias: str) -> str:
    """``<registry>/<name>/aliases/<alias>.json``."""
    return storage.join(registry, name, "aliases", f"{alias}.json")


def resolve_alias(registry: str, name: str, alias: str) -> int | None:
    """The version ``alias`` points at, or None when the alias was never set.

    Raises:
        StageError: the alias file is unreadable, or points at a version that is not there.
    """
    path = alias_uri(registry, name, alias)
    if not storage.exists(path):
        return None
    try:
        version = int(json.loads(storage.read_text(path))["version"])
    except (ValueError, KeyError, TypeError) as e:
        raise StageError(f"registry alias {path} is not valid JSON with an integer 'version': {e}") from None
    if not storage.exists(storage.join(version_uri(registry, name, version), "saved_model.pb")):
        raise StageError(f"registry alias {path} points at version {version}, which has no saved_model.pb")
    return version
