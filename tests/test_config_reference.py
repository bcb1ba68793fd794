"""The configuration reference: generated from the fields, and docs/configuration.md kept equal to it."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml

from components.config import Config, reference
from pipeline.cli import main

DOCS = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
REGENERATE = "finetune config --reference > docs/configuration.md"


def _leaves(cls: type, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every settable key of the tree, dotted, with its field."""
    hints, leaves = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            leaves |= _leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            leaves[f"{prefix}{f.name}"] = f
    return leaves


def _rows(text: str) -> dict[str, list[str]]:
    """The reference's table rows by key: type, default, meaning (cells unescaped)."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [c.strip().replace("\\|", "|") for c in line.strip("|").split(" | ")]
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def test_docs_configuration_md_is_the_generated_reference():
    assert DOCS.read_text() == reference(), f"docs/configuration.md is stale: run `{REGENERATE}`"


def test_every_key_is_documented_once_with_its_default_and_meaning():
    leaves = _leaves(Config)
    text = reference()
    rows = _rows(text)
    assert sorted(rows) == sorted(leaves)  # every key, no stale one
    assert sum(line.startswith("| `") for line in text.splitlines()) == len(leaves)  # each once
    defaults = yaml.safe_load(yaml.safe_dump(dataclasses.asdict(Config())))
    for key, field in leaves.items():
        _type, default, meaning = rows[key]
        assert meaning == field.metadata["help"] and len(meaning) > 10, key
        value = defaults
        for part in key.split("."):
            value = value[part]
        assert yaml.safe_load(default.strip("`")) == value, (key, default, value)


def test_finetune_config_reference_prints_it_without_a_config(capsys):
    assert main(["config", "--reference"]) == 0
    assert capsys.readouterr().out == reference()
