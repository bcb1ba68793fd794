"""The ``registry`` section and the rules for model names and aliases, which name files in it."""

from __future__ import annotations

import re
from dataclasses import dataclass

from components.core.configtree import option

# Model names (`name`): a DNS label, since they also name Kubernetes Jobs.
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# Registry aliases: file names in the registry and TF Serving version labels.
ALIAS_RE = re.compile(r"^[a-z][-a-z0-9_]{0,62}$")
# What each rule says, where a config check or the registry refuses a value.
NAME_RULE = "1-63 lowercase letters, digits or '-', starting and ending with a letter or digit"
ALIAS_RULE = "1-63 lowercase letters, digits, '-' or '_', starting with a letter"


@dataclass(frozen=True)
class RegistryConfig:
    """The serving registry (TF Serving layout: ``<uri>/<name>/<version>/``).

    ``uri`` is a local directory or gs:// prefix (empty: ``finetune push`` refuses, and
    ``finetune run`` stops after evaluate). ``production_alias`` is the alias the gate's
    ``compare_to_production`` reads. ``promote_to`` (empty: none) is the alias that
    ``finetune run`` moves to a newly pushed version.
    """

    uri: str = option(
        "",
        help="the serving registry (local directory or gs://), TF Serving layout "
        "`<uri>/<name>/<version>/`; empty: `run` stops after evaluate",
    )
    production_alias: str = option("production", help="the alias `gate.compare_to_production` reads")
    promote_to: str = option(
        "",
        help="an alias (`staging`, `production`, ...) that `push` / `run` move to each newly pushed "
        "version; empty: none",
    )


def check_name(name: str) -> list[str]:
    """The root ``name``: it names registry entries and Kubernetes Jobs."""
    if NAME_RE.fullmatch(name):
        return []
    return [f"name: '{name}' must be {NAME_RULE} (it names registry entries and Kubernetes Jobs)"]


def check(r: RegistryConfig) -> list[str]:
    """Every problem of the ``registry`` section."""
    problems = []
    for key, alias in (
        ("registry.production_alias", r.production_alias),
        ("registry.promote_to", r.promote_to),
    ):
        if alias and not ALIAS_RE.fullmatch(alias):
            problems.append(f"{key}: '{alias}' must be {ALIAS_RULE} (e.g. production, staging)")
    if r.promote_to and not r.uri:
        problems.append("registry.promote_to: needs registry.uri (the registry that holds the alias)")
    return problems
