"""Which model a prediction run uses: the reference resolved once, before any image is read.

Runs in the driver. A registry alias is read here, at the start, and turned into the version
it names; the workers load that version's folder, which the registry never changes, so a
promotion while the run goes on cannot mix two models in one output.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from typing import Any

from components import registry
from components.config import Config, parse_model_ref
from components.core import scratch, storage
from components.core.errors import ConfigError, StageError

SAVED_MODEL_PB = "saved_model.pb"


@dataclass(frozen=True)
class ResolvedModel:
    """The model of one run.

    Attributes:
        reference: What the user gave (``registry://beans@production``, a path, ...).
        uri: The SavedModel folder the workers load (a registry version's own folder).
        name: The registry name, or ``""`` for a path.
        version: The registry version, or None for a path.
        alias: The alias the reference named, or ``""``.
        fingerprint: ``sha256:<hex>`` of the export (the registry's commit record, or the
            folder's content for a path).
    """

    reference: str
    uri: str
    name: str
    version: int | None
    alias: str
    fingerprint: str

    def identity(self) -> dict[str, Any]:
        """What each prediction row records of its model."""
        return {"name": self.name, "version": self.version, "fingerprint": self.fingerprint}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve(config: Config) -> ResolvedModel:
    """Resolves ``predict.model`` (in ``registry.uri`` for a ``registry://`` reference).

    Raises:
        ConfigError: the alias or version does not exist, or the path holds no SavedModel;
            the message says where to look.
        StageError: the registry version is not complete.
    """
    text = config.predict.model
    ref = parse_model_ref(text)
    if not ref.in_registry:
        if not storage.exists(storage.join(ref.uri, SAVED_MODEL_PB)):
            raise ConfigError(
                f"predict.model: no {SAVED_MODEL_PB} in {ref.uri}; give an exported SavedModel folder "
                "(<run_dir>/export/saved_model, a registry version's folder) or registry://NAME@ALIAS"
            )
        return ResolvedModel(text, ref.uri, "", None, "", _folder_fingerprint(ref.uri))
    where = config.registry.uri
    version = ref.version
    if ref.alias:
        found = registry.resolve_alias(where, ref.name, ref.alias)
        if found is None:
            known = registry.aliases_of(where, ref.name)
            shown = ", ".join(f"{a} -> {v}" for a, v in sorted(known.items())) or "none"
            raise ConfigError(
                f"predict.model: '{ref.name}' has no alias '{ref.alias}' in {where} (aliases: {shown}); "
                f"see `finetune registry list {ref.name} --registry {where}`"
            )
        version = found
    try:
        record = registry.get_version(where, ref.name, version)
    except StageError as e:
        raise ConfigError(f"predict.model: {e}") from None
    registry.check_complete(where, ref.name, version, "predict with it")
    uri = registry.version_uri(where, ref.name, version)
    return ResolvedModel(text, uri, ref.name, version, ref.alias, str(record.get("fingerprint", "")))


def _folder_fingerprint(uri: str) -> str:
    """The export's content fingerprint, as evaluate and push compute it (a gs:// folder is
    copied to local scratch first)."""
    from components.evaluate.export import content_fingerprint

    if not storage.is_gcs(uri):
        return content_fingerprint(uri)
    tmp = scratch.mkdtemp("predict-model")
    try:
        storage.copy_tree(uri, tmp)
        return content_fingerprint(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
