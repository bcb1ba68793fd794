"""A loader for any tree of frozen dataclasses: layers, overrides, coercion, one error for all.

The tree is read in a fixed order: the dataclasses' defaults, then YAML files (a file may
``extends:`` another), then ``key=value`` overrides with dotted keys. Unknown keys raise with
the nearest valid key suggested; each value is coerced to its field's type hint; every problem
found is reported in one :class:`ConfigError`. Nothing here knows which sections a tree has:
the project's tree and its checks are in ``components.config``. Fields carry their
documentation (:func:`option`), from which :func:`reference` writes a Markdown table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import posixpath
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from components.core.errors import ConfigError, did_you_mean

MAX_EXTENDS = 16  # files in one extends chain
TRI_STATE = ("auto", "true", "false")


def option(default: Any = dataclasses.MISSING, *, help: str, factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with its documentation (``metadata["help"]``), read by :func:`reference`.

    Args:
        default: The default value (immutable values only).
        help: One line saying what the field means, for the generated reference.
        factory: Makes the default instead (lists, dicts, nested dataclasses).
    """
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def load_tree(root: type, path: str | None = None, overrides: Sequence[str] = ()) -> Any:
    """Builds an instance of the dataclass ``root``: defaults, then ``path``'s layers, then overrides.

    Args:
        root: A frozen dataclass whose fields are scalars, lists, dicts or nested dataclasses.
        path: A YAML file (local or gs://), or None for defaults only.
        overrides: ``key=value`` strings with dotted keys; values are parsed as YAML.

    Raises:
        ConfigError: on unreadable files, unknown keys or wrong types, listing every one found.
    """
    tree = dataclasses.asdict(root())
    problems: list[str] = []
    for layer in read_layers(path, ()) if path else ():
        _merge(tree, layer, root, "", problems)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            problems.append(f"--set: expected key=value, got '{item}'")
            continue
        _merge(tree, _nest(key.strip(), _parse_value(raw)), root, "", problems)
    raise_all(problems)
    built = _build(root, tree, "", problems)
    raise_all(problems)
    return built


def raise_all(problems: Sequence[str]) -> None:
    """Raises one :class:`ConfigError` listing ``problems`` (one alone is raised as it is)."""
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


def read_layers(path: str, chain: tuple[str, ...]) -> list[dict[str, Any]]:
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
    return [*read_layers(base_path, (*chain, path)), loaded]


def _canonical(path: str) -> str:
    """One spelling per file, for cycle detection: ``a.yaml``, ``./a.yaml`` and a symlink to it
    are the same local file; a gs:// path loses its ``.`` and ``..`` segments."""
    from components.core import storage

    if storage.is_gcs(path):
        bucket_and_path = path[len("gs://") :]
        return "gs://" + posixpath.normpath(bucket_and_path)
    return os.path.realpath(path)


def to_yaml(tree: Any) -> str:
    """Serializes a dataclass tree (the inverse of :func:`load_tree`)."""
    return yaml.safe_dump(dataclasses.asdict(tree), sort_keys=False)


def out_of_range(prefix: str, checks: tuple[tuple[str, float, float, float], ...]) -> list[str]:
    """One problem per ``(key, value, low, high)`` whose value is outside [low, high]."""
    return [
        f"{prefix}{key}: {value} must be between {low} and {high}"
        for key, value, low, high in checks
        if not low <= value <= high
    ]


def non_finite(node: Any, prefix: str = "") -> list[str]:
    """Every float of the tree that is NaN or infinite: such a value passes most range checks
    unnoticed (every comparison with NaN is false) and fails late or silently."""
    if dataclasses.is_dataclass(node):
        return [
            p
            for f in dataclasses.fields(node)
            for p in non_finite(getattr(node, f.name), prefix + f.name + ".")
        ]
    if isinstance(node, float) and not math.isfinite(node):
        return [f"{prefix.rstrip('.')}: {node} must be a finite number"]
    return []


def tri_state(value: str) -> str:
    """Normalises an ``auto|true|false`` option (YAML booleans arrive as True/False)."""
    return {"on": "true", "off": "false", "yes": "true", "no": "false"}.get(value.lower(), value.lower())


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


def _merge(tree: dict[str, Any], update: dict[str, Any], cls: type, prefix: str, problems: list[str]) -> None:
    """Merges ``update`` into ``tree``; keys the dataclass ``cls`` does not have are problems."""
    hints = typing.get_type_hints(cls)
    for key, value in update.items():
        key = str(key)
        if key not in hints:
            problems.append(
                f"unknown key '{prefix}{key}'{did_you_mean(key, hints)} "
                f"Valid keys under '{prefix or '<top>'}': {', '.join(hints)}"
            )
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                problems.append(f"{prefix}{key}: expected a mapping, got {value!r}")
                continue
            _merge(tree[key], value, hint, f"{prefix}{key}.", problems)
        elif typing.get_origin(hint) is dict and isinstance(value, dict):
            tree[key] = {**tree[key], **value}
        else:
            tree[key] = value


def _build(cls: type, tree: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    """Builds the dataclass ``cls`` from a merged dict, coercing and checking each type."""
    kwargs = {}
    for key, hint in typing.get_type_hints(cls).items():
        value, name = tree[key], f"{prefix}{key}"
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{name}.", problems)
            continue
        try:
            kwargs[key] = _coerce(name, value, hint)
        except ConfigError as e:
            problems.append(str(e))
    return None if problems else cls(**kwargs)


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


def reference(root: type, title: str, intro: str) -> str:
    """A Markdown reference of every field of the tree ``root``: key, type, default, help.

    Top-level scalars come first; then one table per top-level dataclass field (a section),
    introduced by the first line of its class docstring, with nested dataclasses flattened
    into dotted keys.
    """
    lines = [f"# {title}", "", intro, ""]
    hints = typing.get_type_hints(root)
    fields = dataclasses.fields(root)
    top = [f for f in fields if not dataclasses.is_dataclass(hints[f.name])]
    if top:
        lines += ["## Top level", "", *_table(root, "", top)]
    for f in fields:
        section = hints[f.name]
        if dataclasses.is_dataclass(section):
            summary = (section.__doc__ or "").strip().splitlines()[0].replace("``", "`")
            lines += [
                f"## `{f.name}`",
                "",
                summary,
                "",
                *_table(section, f"{f.name}.", dataclasses.fields(section)),
            ]
    return "\n".join(lines).rstrip("\n") + "\n"


def _table(cls: type, prefix: str, fields: Sequence[dataclasses.Field]) -> list[str]:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    rows += _rows(cls, prefix, fields)
    return [*rows, ""]


def _rows(cls: type, prefix: str, fields: Sequence[dataclasses.Field]) -> list[str]:
    hints, defaults, rows = typing.get_type_hints(cls), cls(), []
    for f in fields:
        hint, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hint):
            rows += _rows(hint, f"{key}.", dataclasses.fields(hint))
            continue
        help_text = f.metadata.get("help", "")
        if not help_text:
            raise ValueError(f"{cls.__name__}.{f.name} has no help: declare it with option(..., help=...)")
        cells = (
            f"`{key}`",
            f"`{_type_name(hint)}`",
            f"`{_yaml_scalar(getattr(defaults, f.name))}`",
            help_text,
        )
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return rows


def _type_name(hint: Any) -> str:
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _yaml_scalar(value: Any) -> str:
    """A default as it would be written in YAML, on one line."""
    if isinstance(value, str):  # plain when YAML reads it back as this string, else quoted
        try:
            plain = bool(value) and yaml.safe_load(value) == value
        except yaml.YAMLError:
            plain = False
        return value if plain else json.dumps(value)
    return yaml.safe_dump(value, default_flow_style=True, width=1000).removesuffix("\n...\n").strip()
